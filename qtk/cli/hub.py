"""``qtk login / whoami / logout / pull / serve``: thin wrappers over :mod:`qtk.hub`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click
from rich.table import Table

from .. import errors
from ..hub import auth
from ..hub._errors import public_url
from ..hub._fetch import DEFAULT_CONNECTIONS
from ..hub.download import PullPlan, free_bytes, human_bytes, plan_pull, pull
from ..settings import Settings
from ._options import json_option, quiet_option
from ._output import get_output, stdin_is_tty
from ._progress import RichDownloadProgress

__all__ = ["login", "whoami", "logout", "pull_cmd", "serve"]


# ----------------------------------------------------------------------------- auth


@click.command()
@click.option("--token", "token_opt", metavar="TOKEN|-", help="The token, or '-' to read it from stdin. "
              "Without it qtk asks for it (hidden input).")
@json_option
def login(token_opt: str | None) -> None:
    """Validate a Hub token and store it where huggingface_hub, `hf` and transformers find it.

    The token is checked against the endpoint's /api/whoami-v2 first; only a valid token is saved,
    to $HF_HOME/token (or HF_TOKEN_PATH) with file mode 0600. HF_TOKEN, when set, still wins.

    \b
    Examples:
      qtk login                          # prompts, input hidden
      echo "$TOKEN" | qtk login --token -
      HF_ENDPOINT=http://mirror:8080 qtk login --token -  < token.txt
    """
    out = get_output()
    settings = Settings.from_env()
    if token_opt == "-":
        value = sys.stdin.readline().strip()
    elif token_opt:
        value = token_opt
    elif stdin_is_tty():
        value = click.prompt(f"Token for {public_url(settings.endpoint)} (input hidden)", hide_input=True)
    else:
        raise errors.UsageError(
            "No token given and stdin is not a terminal.", hint="Use `--token -` and pipe the token in."
        )
    ident = auth.login(settings, value)
    if out.json_mode:
        out.json({"logged_in": True, "token_path": str(settings.token_path), **ident.to_dict()})
        return
    out.info(f"Logged in to {public_url(settings.endpoint)} as [bold]{ident.name}[/bold] (token role: {ident.role or '?'}).")
    out.info(f"Token saved to {settings.token_path} (mode 0600).")
    if settings.env_token:
        out.warn("HF_TOKEN is set in the environment and takes precedence over the saved token.")


@click.command()
@json_option
def whoami() -> None:
    """Show who the current token belongs to (never the token). Exit 10 when not logged in."""
    out = get_output()
    ident = auth.whoami(Settings.from_env())
    if out.json_mode:
        out.json(ident.to_dict())
        return
    out.result(ident.name)
    out.info(f"  token role: {ident.role or '?'}  (from {ident.token_source})")
    if ident.orgs:
        out.info(f"  orgs: {', '.join(ident.orgs)}")
    out.info(f"  endpoint: {ident.endpoint}")


@click.command()
@json_option
def logout() -> None:
    """Delete the saved token ($HF_HOME/token)."""
    out = get_output()
    settings = Settings.from_env()
    removed = auth.logout(settings)
    if out.json_mode:
        out.json({"removed": removed, "token_path": str(settings.token_path), "hf_token_env_set": bool(settings.env_token)})
        return
    out.info(f"Removed {settings.token_path}." if removed else f"No saved token at {settings.token_path}.")
    if settings.env_token:
        out.warn("HF_TOKEN is still set in the environment: unset it to log out completely.")


# ----------------------------------------------------------------------------- pull


def _plan_table(plan: PullPlan) -> Table:
    table = Table(show_edge=False, pad_edge=False, box=None)
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("status")
    for p in plan.files:
        if p.present:
            status = "[green]present[/green]"
        elif p.damaged:
            status = "[red]damaged: fetch again[/red]"
        elif p.resumable:
            status = f"[yellow]resume ({human_bytes(p.resumable)} done)[/yellow]"
        else:
            status = "download"
        table.add_row(p.file.path, human_bytes(p.file.size), status)
    return table


@click.command("pull")
@click.argument("repo_id")
@click.option("--revision", help="Branch, tag or commit sha (default: main). Resolved once, pinned for the pull.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only files matching GLOB (repeatable; '*' crosses '/').")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Skip files matching GLOB (repeatable).")
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Place files here as plain files instead of the HF cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="HF cache to use (default: HF_HUB_CACHE, else $HF_HOME/hub).")
@click.option("--repo-type", type=click.Choice(["model", "dataset"]), default="model", show_default=True)
@click.option("--connections", type=click.IntRange(1, 64), default=DEFAULT_CONNECTIONS, show_default=True,
              help="Parallel HTTP connections (Range requests) shared by all files.")
@click.option("--dry-run", is_flag=True, help="Show the files, sizes and what is already present; download nothing.")
@click.option("--verify", is_flag=True, help="Re-hash the files the cache already holds for this pull and re-fetch any "
              "that do not match (without it, blobs qtk verified before are trusted).")
@click.option("--lock-timeout", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Give up (exit 22) after waiting SECONDS for another process that downloads the same file. "
              "Default: wait as long as it takes.")
@json_option
@quiet_option
def pull_cmd(repo_id, revision, include, exclude, local_dir, cache_dir, repo_type, connections, dry_run, verify,
             lock_timeout) -> None:
    """Download a repo (or selected files) from the Hub into the HF cache: parallel, resumable, verified.

    Every file is checked against the Hub's sha256 (LFS) or git sha1 before it is moved into place; an
    interrupted pull (Ctrl-C, kill -9, network loss, reboot) resumes from what was finished. A second
    identical pull transfers nothing and writes nothing (it works on a read-only cache). Files with the
    same content share one blob. Prints the snapshot path on stdout.

    \b
    Shared caches (NFS, Lustre, GPFS, BeeGFS): where file locks do not work, qtk says so once and uses
    lock files with a heartbeat instead; a holder silent for 60 s is taken over.

    \b
    Examples:
      qtk pull meta-llama/Llama-3.1-8B-Instruct --include '*.safetensors' --include '*.json'
      qtk pull Qwen/Qwen2.5-0.5B-Instruct --revision v1.0 --dry-run
      qtk pull org/model --local-dir ./model --connections 32
      qtk pull org/model --verify          # re-hash what is cached, repair what is wrong
      HF_ENDPOINT=http://mirror:8080 qtk pull org/model --json

    Honours HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE (offline: report what is
    cached, no network).
    """
    out = get_output()
    settings = Settings.from_env(hub_cache=cache_dir)
    plan = plan_pull(repo_id, revision=revision, include=include, exclude=exclude, local_dir=local_dir,
                     repo_type=repo_type, settings=settings, verify=verify)
    damaged = [p.file.path for p in plan.files if p.damaged]
    if damaged and not out.json_mode:
        out.warn(f"{len(damaged)} local file(s) do not match their hash and will be fetched again: "
                 + ", ".join(damaged[:10]) + (" ..." if len(damaged) > 10 else ""))
    rev = f"@{revision}" if revision else ""
    summary = (
        f"{repo_id}{rev} -> commit {plan.commit[:12]}: {len(plan.files)} file(s), {human_bytes(plan.total_bytes)}; "
        f"{human_bytes(plan.present_bytes)} present, {human_bytes(plan.bytes_to_transfer)} to download"
    )
    if dry_run:
        if out.json_mode:
            doc = plan.to_dict()
            doc["dry_run"] = True
            with contextlib.suppress(OSError):
                doc["free_bytes"] = free_bytes(plan.root)
            out.json(doc)
            return
        out.info(summary + ("  (offline: from the cache)" if plan.offline else ""))
        out.table(_plan_table(plan))  # the dry run's result: stdout
        out.info(f"free disk at destination: {human_bytes(free_bytes(plan.root))}; "
                 f"needed: {human_bytes(plan.disk_bytes_needed)}")
        return
    if plan.offline:
        out.info(f"Offline (HF_HUB_OFFLINE): {summary.split(';')[0]} in the cache.")
    elif plan.missing:
        out.info(summary)
    if out.interactive and plan.missing and not plan.offline:
        already = sum(g[0].resumable for g in plan.missing_blobs.values())
        total = sum(g[0].file.size for g in plan.missing_blobs.values())
        with RichDownloadProgress(out.err, total, already) as progress:
            result = pull(plan, connections=connections, progress=progress, lock_timeout=lock_timeout)
    else:
        result = pull(plan, connections=connections, lock_timeout=lock_timeout)
    stats = result.stats
    if out.json_mode:
        out.json(result.to_dict())
        return
    if not plan.missing:
        out.info(f"Already up to date: {len(plan.files)} file(s), 0 bytes transferred.")
    else:
        speed = stats.bytes_downloaded / stats.wall_s / 1e6 if stats.wall_s > 0 else 0.0
        resumed = f", {human_bytes(stats.bytes_resumed)} resumed from an earlier run" if stats.bytes_resumed else ""
        out.info(
            f"Downloaded {human_bytes(stats.bytes_downloaded)} in {stats.wall_s:.2f} s ({speed:.0f} MB/s){resumed}; "
            f"{stats.files_fetched} file(s) verified"
            + (f", {stats.retries} retried range(s)" if stats.retries else "")
            + (f", {stats.refetches} re-fetch(es) after a hash mismatch" if stats.refetches else "")
            + "."
        )
    out.result(str(result.path))


# ----------------------------------------------------------------------------- serve


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port (0 picks a free one).")
@click.option("--access", "access_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML file with users (tokens), private and gated repos. Without it, everything is public.")
@click.option("--access-log", is_flag=True, help="Log every request to stderr.")
@click.option("--index", "index_only", is_flag=True, help="Hash every file into the index, then exit (no server).")
@click.option("--index-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the persistent hash index lives (default: DIR/.qtk-serve, or the user cache when DIR "
                   "is read-only).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Serve HTTPS with this PEM certificate (chain).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The PEM private key of --tls-cert (if not inside it).")
@click.option("--trusted-proxy", multiple=True, metavar="IP|CIDR",
              help="Honour X-Forwarded-Proto/Host (in the URLs the mirror builds) only from these peers. Repeatable.")
@click.option("--workers", type=click.IntRange(1, 512), default=32, show_default=True,
              help="Worker threads: requests answered at the same time.")
@click.option("--max-connections", type=click.IntRange(16, 65536), default=2048, show_default=True,
              help="Open connections; past it new ones get 503 + Retry-After.")
@click.option("--max-pending", type=click.IntRange(1, 65536), default=1024, show_default=True,
              help="Complete requests waiting for a worker; past it 503 + Retry-After.")
@click.option("--max-per-client", type=click.IntRange(0, 65536), default=128, show_default=True,  # server.MAX_PER_CLIENT
              help="Open connections from one client address (an IPv6 /64); past it 503 + Retry-After. "
                   "--trusted-proxy peers are not counted. 0: no bound.")
@click.option("--timeout", "io_timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds a connection may stay idle between requests; a client reading an answer slower "
                   "than 8 KiB/s over such a window is cut.")
@click.option("--header-timeout", type=click.FloatRange(1, 600), default=20.0, show_default=True,
              help="Seconds a client has to send a complete request, head and body, from its first byte "
                   "(slowloris guard).")
def serve(directory: Path, host: str, port: int, access_file: Path | None, access_log: bool, index_only: bool,
          index_dir: Path | None, tls_cert: Path | None, tls_key: Path | None, trusted_proxy: tuple[str, ...],
          workers: int, max_connections: int, max_pending: int, max_per_client: int, io_timeout: float,
          header_timeout: float) -> None:
    """Serve a directory of model repos as a Hub-compatible endpoint (for air-gapped clusters).

    DIRECTORY holds repos as plain folders (DIR/<ns>/<name>/..., datasets under DIR/datasets/), is a
    `qtk provision` store (every kept version under its own commit) or an HF cache (DIR/models--ns--name/,
    e.g. ~/.cache/huggingface/hub: every cached revision is served). Point clients at it with
    HF_ENDPOINT: `qtk pull`, `hf download`, transformers and vLLM all work.

    Every file is hashed once into a persistent index (at start, with a progress bar); restarts reuse it.
    Names starting with a dot, the access file, symlinks leading out of a repo and special files are never
    served.

    \b
    Examples:
      qtk serve /srv/models --host 0.0.0.0 --port 8080
      qtk serve /srv/models --index                    # hash ahead of time, then exit
      qtk serve ~/.cache/huggingface/hub --access access.toml --tls-cert m.pem --tls-key m.key
      HF_ENDPOINT=http://mirror:8080 qtk pull acme/llama-awq
    """
    import gc
    import signal

    from ..mirror import service
    from ..provision.store import ProvisionStore

    out = get_output()
    service.log_to_stderr()
    if tls_key and not tls_cert:
        raise errors.UsageError("--tls-key needs --tls-cert.")
    access = service.read_access(access_file)
    tls = service.tls_context(tls_cert, tls_key) if tls_cert else None
    # a provision store's published and kept versions: its view, passed in (the mirror never imports provision)
    store = service.open_store(directory, index_dir=index_dir, access=access, versions=ProvisionStore(directory))
    for warning in service.exposure_warnings(directory, host, access_file, tls is not None):
        out.warn(warning)
    server = None
    if not index_only:  # bind first: a taken port fails before minutes of hashing
        server = service.make_server(store, host, port, access=access, access_log=access_log, tls=tls,
                                     trusted_proxies=trusted_proxy,
                                     options=service.ServeOptions(workers, max_connections, max_pending,
                                                                  header_timeout, io_timeout, io_timeout,
                                                                  max_per_client))
    try:
        stats = _index_with_progress(out, store)
        gc.freeze()  # the listings built at start live as long as the server: keep them out of GC passes
        repos = store.list_repos()
        out.err.print(f"Indexed {len(repos)} repo(s), {stats.files} file(s) from {directory}: hashed "
                      f"{stats.hashed_files} new file(s) ({human_bytes(stats.hashed_bytes)})"
                      + (f", forgot {stats.dropped} replaced or deleted" if stats.dropped else "") + "; index at "
                      f"{store.index.path or 'memory'}")
        if server is None:
            return
        out.err.print(f"Serving at [bold]{server.url}[/bold] ({workers} workers)")
        for kind, rid in repos[:20]:
            out.err.print(f"  {kind + 's/' if kind != 'model' else ''}{rid}")
        if access:
            out.err.print(f"  access control: {len(access.users)} user(s), {len(access.repos)} repo rule(s)"
                          + (", token required" if access.require_token else ""))
        out.err.print(f"Use it with: export HF_ENDPOINT={server.url}")
        click.echo(server.url)
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        server.serve_forever()
    except KeyboardInterrupt:
        out.err.print("Stopped.")
    finally:
        if server is not None:
            server.server_close()
            out.err.print(f"Served {server.requests} request(s), {human_bytes(server.bytes_sent)}; answered 503: "
                          f"{server.rejected_busy} (all workers busy), {server.rejected_connections} (connection "
                          f"limit), {server.rejected_per_client} (per-client limit); 500: {server.errors_500}.")
        store.index.close()


def _stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # a service manager's stop: close cleanly, print the counts


def _index_with_progress(out, store):
    """Hash what the index lacks, with a progress bar on a terminal."""
    if not out.interactive:
        def announce(n: int, total: int) -> None:
            if n:
                out.err.print(f"Indexing {n} file(s), {human_bytes(total)} (hashed once, kept across restarts)...")

        return store.index_all(on_total=announce)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("indexing"), BarColumn(bar_width=None), DownloadColumn(binary_units=False),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=out.err, transient=True) as bar:
        task = bar.add_task("index", total=None)
        return store.index_all(on_total=lambda n, total: bar.update(task, total=total),
                               progress=lambda n: bar.update(task, advance=n))
