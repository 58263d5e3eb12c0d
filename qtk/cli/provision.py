"""``qtk provision MANIFEST`` and ``qtk provision status``: thin wrappers over :mod:`qtk.provision`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from .. import errors
from ._options import json_option, quiet_option
from ._output import get_output

__all__ = ["provision_group"]

_STYLE = {"done": "green", "passed": "green", "cached": "dim", "FAILED": "bold red", "ERROR": "bold red",
          "blocked": "yellow", "to run": "cyan", "to check": "cyan"}


class _DefaultRun(click.Group):
    """`qtk provision MANIFEST ...` means `qtk provision run MANIFEST ...`; `status` is a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("provision", cls=_DefaultRun)
def provision_group() -> None:
    """Provision models from a TOML manifest: pull -> quantize -> verify -> gate -> publish into a
    model store that `qtk serve STORE` exposes as a Hub mirror. Re-runs skip finished work.

    \b
      qtk provision models.toml [--dry-run] [--keep-going] [--json]   (= qtk provision run ...)
      qtk provision status models.toml|STORE [--json]

    \b
    Exit codes: 0 all published; 3 gates failed (nothing failing was published); 60 --keep-going
    and some models failed with errors; otherwise the failing step's own code (`qtk exit-codes`).
    """


def _cell(v: str) -> str:
    style = _STYLE.get(v)
    return f"[{style}]{v}[/{style}]" if style else v


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _summary_table(summary) -> Table:
    t = Table(title=f"qtk provision {'plan (dry run)' if summary.dry_run else 'summary'} — store {summary.store}",
              box=None, title_justify="left")
    for col in ("artifact", "pull", "quantize", "verify", "gate", "publish", "ppl Δ", "KLD", "top-1", "time"):
        t.add_column(col, justify="right" if col in ("ppl Δ", "KLD", "top-1", "time") else "left")
    for r in summary.rows:
        m = r.metrics
        t.add_row(r.repo_id, *(_cell(r.steps[s]) for s in ("pull", "quantize", "verify", "gate", "publish")),
                  _fmt(m.get("ppl_increase_pct"), "+.1f", "%"), _fmt(m.get("kld_mean"), ".3f"),
                  _fmt(m.get("top1_pct"), ".1f", "%"), f"{r.seconds:.0f} s" if r.seconds else "-")
    return t


def _memory_table(summary) -> Table:
    t = Table(title="memory plan (planner estimates; GB = 10^9 bytes)", box=None, title_justify="left")
    for col in ("artifact", "params", "bf16", "output", "quantize (device)", "verify", "free", "fits"):
        t.add_column(col, justify="left" if col == "artifact" else "right")
    for r in summary.rows:
        m = r.memory
        if not m:
            t.add_row(r.repo_id, *["?"] * 7)
            continue
        fits = "-" if m["fits"] is None else ("[green]yes[/green]" if m["fits"] else "[bold red]NO[/bold red]")
        t.add_row(r.repo_id, f"{m['params'] / 1e6:,.0f}M", f"{m['bf16_GB']:.2f}", f"{m['output_GB']:.2f}",
                  f"{m['quantize_device_GB']:.2f} ({m['device']})", f"{m['verify_GB']:.2f}",
                  _fmt(m["free_GB"], ".1f"), fits)
    return t


@provision_group.command("run")
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), envvar="QTK_STORE",
              help="Model store directory [default: the manifest's `store`; env QTK_STORE].")
@click.option("--dry-run", is_flag=True, help="Show what would run and the memory plan; change nothing.")
@click.option("--keep-going", is_flag=True, help="Go on with the other models after a failure (exit 60 / 3 at the end).")
@click.option("--only", multiple=True, metavar="NAME", help="Provision only these models (name or repo; repeatable).")
@click.option("--lock-timeout", type=float, default=None, metavar="SECONDS",
              help="Give up (exit 22) when another provisioner holds a model's lock longer [default: wait].")
@click.option("--push/--no-push", default=None, help="Override the manifest's publish.push_to_hub for every model.")
@click.option("--no-prune", is_flag=True, help="Keep every published version (default: the current and previous one).")
@click.option("--summary-json", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Also write the JSON summary to FILE (atomically), whatever the output mode.")
@click.option("--shard", metavar="I/N", default=None, envvar="QTK_SHARD",
              help="Provision only shard I (0-based) of N: a deterministic split of the (model, recipe) pairs "
                   "for Kubernetes Indexed Jobs and Slurm arrays [env QTK_SHARD].")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: the steps one after another here. ray: each (model, recipe) a Ray task (one GPU, or one "
                   "CPU slot), the store and HF cache on storage every node sees (pip install 'qtk[ray]').")
@click.option("--address", "ray_address", metavar="ADDR", default=None,
              help="With --executor ray: the cluster to join (ray://host:10001, host:6379, auto) "
                   "[default: $RAY_ADDRESS, else a Ray started on this machine for the run].")
@click.option("--ray-task-cpus", type=click.IntRange(min=1), default=1, show_default=True, metavar="N",
              help="With --executor ray: CPU cores each task asks for and computes with (torch threads). 1 suits "
                   "GPU nodes; on a CPU-only cluster, give a quantize more cores (at most a node's).")
@click.option("-v", "--verbose", is_flag=True,
              help="Show the backends' output here instead of in STORE/.qtk-provision/logs/ (one file per step).")
@json_option
@quiet_option
def run_cmd(manifest, store, dry_run, keep_going, only, lock_timeout, push, no_prune, summary_json, shard,
            executor, ray_address, ray_task_cpus, verbose) -> None:
    """Provision the models in MANIFEST into the model store.

    For each model: pull the selected files (resumable, hash-verified, into the HF cache), quantize
    each recipe, verify it against the source (perplexity, KL, smoke), apply the gates, and publish
    the ones that pass as STORE/<org>/<model>-<recipe> with qtk_provenance.json, qtk_verify_report.json
    and qtk_provision.json. Every step is keyed by the hash of its inputs: a re-run skips what is done,
    a changed recipe redoes only that recipe's steps. Events: STORE/.qtk-provision/events/<run>--*.jsonl.

    \b
    Examples:
      qtk provision scripts/provision-example.toml --dry-run
      qtk provision models.toml --keep-going --json > summary.json
      qtk provision models.toml --executor ray --address auto   # one Ray task per (model, recipe)
      qtk serve STORE   # nodes: HF_ENDPOINT=http://host:port qtk pull qtk/<model>-gptq
    """
    from ..provision import ProvisionOptions, load_manifest, provision
    from ..provision.shard import parse_shard

    out = get_output()
    shard_ix = parse_shard(shard) if shard is not None else None
    if ray_address and executor != "ray":
        raise errors.UsageError("--address is the Ray cluster of --executor ray.", hint="Add --executor ray.")
    if ray_task_cpus != 1 and executor != "ray":
        raise errors.UsageError("--ray-task-cpus sizes the tasks of --executor ray.", hint="Add --executor ray.")
    m = load_manifest(manifest, store=store)
    opts = ProvisionOptions(dry_run=dry_run, keep_going=keep_going, lock_timeout=lock_timeout, only=tuple(only),
                            push=push, prune=not no_prune, backend_output=verbose, shard=shard_ix,
                            executor=executor, ray_address=ray_address, ray_task_cpus=ray_task_cpus)

    def on_event(e: dict) -> None:
        if e["result"] in ("start", "error", "waiting") or e["step"] == "gate" or e["result"] == "done" and e["step"] == "pull":
            what = e.get("artifact") or e["model"]
            extra = f" ({e['reason']})" if e.get("reason") and e["result"] == "start" else ""
            if e["step"] == "gate":
                mt = e.get("metrics") or {}
                extra = f" (ppl {mt.get('ppl_increase_pct', 0):+.1f}%, KLD {_fmt(mt.get('kld_mean'), '.3f')})"
                if e["result"] == "failed":
                    extra += ": " + "; ".join(e.get("failures", []))
            elif e["result"] == "error":
                extra = ": " + e["error"]["message"].splitlines()[0]
            out.info(f"[{e['ts'][11:19]}] {what}: {e['step']} {e['result']}{extra}")

    log = out.info if verbose else (lambda s: None)
    summary = provision(m, opts, on_event=on_event, log=log, warn=out.warn)
    code = summary.exit_code
    if summary_json:
        from .._fs import write_json

        write_json(summary_json, summary.to_dict())
    if out.json_mode:
        out.json(summary.to_dict())
    else:
        if dry_run:
            out.err.print(_memory_table(summary))
        out.err.print(_summary_table(summary))
        if dry_run:  # what each step would do, and why
            for r in summary.rows:
                why = "; ".join(f"{s} {r.steps[s]} ({r.reasons[s]})" for s in ("quantize", "verify", "publish")
                                if s in r.reasons)
                out.err.print(f"  {r.repo_id}: {why}", markup=False, highlight=False, soft_wrap=True)
        for r in summary.rows:
            if r.error:
                out.err.print(f"[bold red]{r.repo_id}[/bold red]: {errors.redact(r.error['message'])}"
                              + (f"\n  [dim]Hint:[/dim] {errors.redact(r.error['hint'])}" if r.error.get("hint") else ""))
        for e in summary.model_errors:
            out.err.print(f"[bold red]{e['model']}[/bold red]: {errors.redact(e['message'])}"
                          + (f"\n  [dim]Hint:[/dim] {errors.redact(e['hint'])}" if e.get("hint") else ""))
        if not dry_run:
            out.info(f"{summary.bytes_downloaded / 1e6:.1f} MB downloaded in {summary.seconds:.0f} s; "
                     f"events: {summary.store / '.qtk-provision' / 'events' / (summary.run_id + '--*.jsonl')}")
        out.result(str(summary.store))
    if code:
        raise click.exceptions.Exit(code)


@provision_group.command("status")
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@json_option
def status_cmd(target: Path) -> None:
    """Show the model store: each published repo, its source, metrics and the last run's outcome.

    TARGET is a manifest (its store is shown) or a store directory.
    """
    from ..provision import ProvisionStore, load_manifest

    out = get_output()
    root = load_manifest(target).store if target.is_file() else target
    store = ProvisionStore(root)
    if not store.state.is_dir():
        raise errors.UsageError(f"{root} is not a qtk provision store (no .qtk-provision/).",
                                hint="Run `qtk provision MANIFEST` first, or pass the store directory.")
    rows = []
    for rec in store.records_all():
        key = store.published_key(rec["repo_id"])
        pub = rec.get("published") or {}
        last = rec.get("last_run") or {}
        rows.append({"repo_id": rec["repo_id"], "model": rec.get("model"), "method": rec.get("method"),
                     "source": rec.get("source"), "published_key": key, "published_at": pub.get("at") if key else None,
                     "metrics": pub.get("metrics") if key else None,
                     "size_bytes": store.disk_usage(store.artifacts / key) if key else None,
                     "last_result": last.get("result"), "last_at": last.get("at"),
                     "last_detail": last.get("gate_failures") or (last.get("error") or {}).get("message"),
                     "pushed": rec.get("pushed")})
    if out.json_mode:
        out.json({"store": str(store.root), "repos": rows})
        return
    t = Table(title=f"model store {store.root}", box=None, title_justify="left")
    for col in ("repo", "source", "published", "size", "ppl Δ", "KLD", "top-1", "last run"):
        t.add_column(col)
    for r in rows:
        mt = r["metrics"] or {}
        last = r["last_result"] or "-"
        if r["last_detail"]:
            detail = r["last_detail"] if isinstance(r["last_detail"], str) else "; ".join(r["last_detail"])
            last += f": {detail.splitlines()[0]}"
        t.add_row(r["repo_id"], r["source"] or "-", (r["published_at"] or "[yellow]not published[/yellow]"),
                  f"{r['size_bytes'] / 1e6:.1f} MB" if r["size_bytes"] else "-",
                  _fmt(mt.get("ppl_increase_pct"), "+.1f", "%"), _fmt(mt.get("kld_mean"), ".3f"),
                  _fmt(mt.get("top1_pct"), ".1f", "%"), last)
    out.table(t)
    out.info(f"Serve it: qtk serve {store.root}")
