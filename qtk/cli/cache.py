"""``qtk cache ls / verify / prune``: thin wrappers over :mod:`qtk.hub.scan`."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from .. import errors
from ..hub.download import human_bytes
from ..settings import Settings
from ._options import json_option, quiet_option
from ._output import get_output

__all__ = ["cache_group"]

_cache_dir_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False, path_type=Path),
    help="HF cache to use (default: HF_HUB_CACHE, else $HF_HOME/hub).")


def _cache_dir(cache_dir: Path | None) -> Path:
    return Settings.from_env(hub_cache=cache_dir).hub_cache


@click.group("cache")
def cache_group() -> None:
    """Inspect, re-hash and clean the HF cache (the one `hf`, transformers and vLLM read).

    \b
      qtk cache ls [REPO_ID...] [--json]         repos, revisions, sizes, partial downloads
      qtk cache verify [REPO_ID...] [--repair]   re-hash every blob (exit 20 on a mismatch)
      qtk cache prune [--dry-run]                stale partials and locks, unreferenced blobs

    Reads the same layout as `hf cache ls` (huggingface_hub's scan_cache_dir) and adds what qtk knows:
    resumable *.qtk-part downloads (and huggingface_hub's *.incomplete ones), verified records, locks.
    """


@cache_group.command("ls")
@click.argument("repo_ids", nargs=-1, metavar="[REPO_ID]...")
@_cache_dir_option
@json_option
def ls_cmd(repo_ids: tuple[str, ...], cache_dir: Path | None) -> None:
    """List cached repos (revisions, refs, files, size on disk) and partial downloads with their
    resumable bytes.

    \b
    Examples:
      qtk cache ls
      qtk cache ls meta-llama/Llama-3.1-8B-Instruct --json
    """
    from ..hub.scan import list_cache

    out = get_output()
    listing = list_cache(_cache_dir(cache_dir), repo_ids)
    if out.json_mode:
        out.json(listing.to_dict())
        return
    table = Table(show_edge=False, pad_edge=False, box=None)
    for col, just in (("repo", "left"), ("type", "left"), ("revision", "left"), ("refs", "left"),
                      ("files", "right"), ("size", "right")):
        table.add_column(col, justify=just)
    for repo in listing.repos:
        for i, rev in enumerate(repo.revisions or (None,)):
            table.add_row(repo.repo_id if i == 0 else "", repo.repo_type if i == 0 else "",
                          rev.commit[:12] if rev else "-", ", ".join(rev.refs) if rev else "",
                          str(rev.nb_files) if rev else "0", human_bytes(rev.size_on_disk) if rev else "0 B")
    out.err.print(f"{listing.cache_dir}: {len(listing.repos)} repo(s), {human_bytes(listing.size_on_disk)} on disk")
    if listing.repos:
        out.table(table)
    if listing.partials:
        parts = Table(show_edge=False, pad_edge=False, box=None)
        for col, just in (("repo", "left"), ("blob", "left"), ("resumable", "right"), ("size", "right"),
                          ("kind", "left"), ("state", "left")):
            parts.add_column(col, justify=just)
        for p in listing.partials:
            state = "downloading now" if p.in_use else f"idle {_ago(p.age_s)}"
            parts.add_row(p.repo_id, p.oid[:12], human_bytes(p.resumable_bytes), human_bytes(p.size),
                          "qtk (resumable)" if p.kind == "qtk" else "hf (not resumable)", state)
        out.err.print(f"\n{len(listing.partials)} partial download(s); `qtk pull` resumes the qtk ones:")
        out.table(parts)
    for w in listing.warnings:
        out.warn(w)


def _ago(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"


@cache_group.command("verify")
@click.argument("repo_ids", nargs=-1, metavar="[REPO_ID]...")
@_cache_dir_option
@click.option("--repair", is_flag=True, help="Remove blobs that do not match and download those files again.")
@json_option
@quiet_option
def verify_cmd(repo_ids: tuple[str, ...], cache_dir: Path | None, repair: bool) -> None:
    """Re-hash every cached blob a snapshot uses (sha256 for LFS files, git blob sha1 for the others).

    Exit 0 when all match (or --repair fixed them), 20 when a blob does not match its name. Blobs that
    match get qtk's verified record, so the next `qtk pull` trusts them without hashing again.

    \b
    Examples:
      qtk cache verify
      qtk cache verify acme/llama --repair
    """
    from ..hub.scan import verify_cache

    out = get_output()
    t0 = time.monotonic()
    show = None if (out.quiet or out.json_mode) else (lambda text: out.err.print(f"  hashing {text}", highlight=False))
    report = verify_cache(_cache_dir(cache_dir), repo_ids, repair=repair, progress=show)
    secs = time.monotonic() - t0
    if out.json_mode:
        doc = report.to_dict()
        if report.bad:
            doc.update(_mismatch_error(report).to_dict())
        out.json(doc)
    else:
        out.info(f"Hashed {len(report.checked)} blob(s), {human_bytes(report.bytes_hashed)} in {secs:.1f} s.")
        for c in report.checked:
            if not c.ok:
                where = ", ".join(f"{p} @{commit[:12]}" for commit, p in c.paths[:3])
                fate = "repaired" if c.repaired else "MISMATCH"
                out.err.print(f"  [{'green' if c.repaired else 'bold red'}]{fate}[/] {c.repo_id}: {where} "
                              f"(blob {c.oid[:12]}, content hashes to {(c.actual or '?')[:12]})")
        for e in report.repair_errors:
            out.warn(e)
    if report.bad:
        if not out.json_mode:
            exc = _mismatch_error(report)
            out.error(exc.message)
            out.err.print(f"[dim]Hint:[/dim] {exc.hint}")
        raise click.exceptions.Exit(errors.IntegrityError.exit_code)
    if not out.json_mode:
        out.result("ok")


def _mismatch_error(report) -> errors.IntegrityError:
    return errors.IntegrityError(
        f"{len(report.bad)} cached blob(s) do not match their hash.",
        hint="Run `qtk cache verify --repair` (or `qtk pull REPO --verify`) to fetch them again.",
    )


@cache_group.command("prune")
@_cache_dir_option
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--partials-older-than", default="7d", show_default=True, metavar="DURATION",
              help="Remove resumable qtk partial downloads untouched this long (e.g. 12h, 7d).")
@json_option
def prune_cmd(cache_dir: Path | None, dry_run: bool, partials_older_than: str) -> None:
    """Remove what no pull needs: stale partial downloads (qtk's idle past --partials-older-than, or
    useless; huggingface_hub's *.incomplete idle for an hour), lock files no process holds, blobs no
    snapshot links to (idle for an hour), and verified records of deleted blobs.

    Prune takes each partial's (and blob's) lock, without waiting, before removing it: anything a running
    pull holds, or a process on another host may hold, is kept. Detached revisions are `hf cache prune`'s job.

    \b
    Examples:
      qtk cache prune --dry-run
      qtk cache prune --partials-older-than 1d --json
    """
    from ..hub.scan import parse_duration, prune_cache

    out = get_output()
    actions = prune_cache(_cache_dir(cache_dir), dry_run=dry_run, partials_older_than=parse_duration(partials_older_than))
    freed = sum(a.bytes for a in actions)
    if out.json_mode:
        out.json({"dry_run": dry_run, "removed": [a.to_dict() for a in actions], "bytes_freed": freed})
        return
    verb = "Would remove" if dry_run else "Removed"
    for a in actions:  # the result (stdout): what was, or would be, removed
        out.result(f"  {a.kind:<18} {a.path}  ({human_bytes(a.bytes)}: {a.reason})")
    out.info(f"{verb} {len(actions)} item(s), {human_bytes(freed)}." if actions else "Nothing to prune.")
