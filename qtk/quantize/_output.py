"""Where a quantize run writes, and how a killed one is cleaned up, on a disk other hosts may share.

Beside the output ``DIR/NAME`` a run uses, with a random ``<id>``:

    .NAME.qtk-run-<id>.json     its owner record (:class:`qtk._proc.Owner`), written durably first,
                                removed last
    .NAME.qtk-tmp-<id>/         the new output while it is written; sealed (every file fsynced, then
                                ``qtk_provenance.json`` written durably, last) before it is put in place
    .NAME.qtk-old-<id>/         the previous output, set aside by ``--overwrite`` where the file system
                                cannot swap two directories in one step (NFS)

Putting the output in place is :func:`qtk._fs.install_dir`: an atomic exchange where supported, else
rename aside + rename in; the old one is removed only after the new one is durably in place.

A run that starts looks at the records of earlier runs of the same output (:func:`recover`). Those whose
owner is provably dead (:func:`qtk._proc.is_provably_dead`: same host, boot and PID namespace, pid gone
or reused) are settled: if the output is missing and an aside copy exists (killed between the two
renames), the aside copy is renamed back: the output is the one the killed run started from; then the
temporary and the aside copy are removed, and the record last. A run of another host (or another PID
namespace) is never judged dead by its pid: its files are left alone and reported, whoever removes them
has to know that run is gone. Names of qtk before these records (``.NAME.qtk-tmp-<pid>``,
``.NAME.qtk-old-<pid>``: no host) are removed only once untouched for a day (the file system's clock).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import _fs
from .._proc import Owner, is_provably_dead

__all__ = ["OutputRun", "recover", "LEGACY_TTL_S"]

LEGACY_TTL_S = 24 * 3600.0
_ID = r"[0-9a-f]{16}"


@dataclass(frozen=True)
class OutputRun:
    """The files of one run writing ``out``."""

    out: Path
    id: str

    @property
    def record(self) -> Path:
        return self.out.parent / f".{self.out.name}.qtk-run-{self.id}.json"

    @property
    def tmp(self) -> Path:
        return self.out.parent / f".{self.out.name}.qtk-tmp-{self.id}"

    @property
    def aside(self) -> Path:
        return self.out.parent / f".{self.out.name}.qtk-old-{self.id}"

    @classmethod
    def start(cls, out: Path) -> OutputRun:
        """Record this process as the owner (durably), then create the empty temporary."""
        run = cls(out, secrets.token_hex(8))
        _fs.write_json(run.record, {**Owner.current().to_dict(), "created": time.time()})
        try:
            run.tmp.mkdir()
        except BaseException:
            run.record.unlink(missing_ok=True)
            raise
        return run

    def install(self, *, overwrite: bool) -> str:
        """Put the (sealed) temporary in place of the output; then the record goes."""
        how = _fs.install_dir(self.tmp, self.out, aside=self.aside, overwrite=overwrite)
        self.record.unlink(missing_ok=True)
        return how

    def abandon(self) -> None:
        """A failed run (an exception, Ctrl-C, even between the steps of :meth:`install`): an output set
        aside comes back if none is in place; the temporary and the aside copy go, the record last."""
        if not os.path.lexists(self.out) and self.aside.is_dir():
            with contextlib.suppress(OSError):
                _fs.rename_noreplace(self.aside, self.out)
                _fs.fsync_dir(self.out.parent)
        _fs.remove(self.tmp)
        _fs.remove(self.aside)
        self.record.unlink(missing_ok=True)


def _owner(record: Path) -> Owner | None:
    try:
        return Owner.from_dict(json.loads(record.read_bytes()))
    except (OSError, ValueError):
        return None  # being written, or unreadable: never a proof of anything


def _fs_age(path: Path, now: float) -> float:
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def recover(out: Path, *, note: Callable[[str], None] = lambda s: None, now: float | None = None) -> list[str]:
    """Settle what killed runs of ``out`` left (see the module docstring). Returns what was done."""
    parent, name = out.parent, out.name
    if not parent.is_dir():
        return []
    done: list[str] = []
    runs = re.compile(rf"^\.{re.escape(name)}\.qtk-run-({_ID})\.json$")
    for entry in sorted(parent.iterdir()):
        m = runs.match(entry.name)
        if not m:
            continue
        run, owner = OutputRun(out, m.group(1)), _owner(entry)
        if owner is None or not is_provably_dead(owner):
            if owner is not None and not owner.same_machine(Owner.current()):
                note(f"left {run.tmp.name} alone: it belongs to a run of {owner.describe()}, which this host "
                     "cannot check (remove it by hand once that run is gone)")
            continue
        if not os.path.lexists(out) and run.aside.is_dir():
            with contextlib.suppress(FileNotFoundError, FileExistsError, OSError):
                _fs.rename_noreplace(run.aside, out)
                _fs.fsync_dir(parent)
                done.append(f"restored {out.name} from {run.aside.name} (a run killed while replacing it)")
        for leftover in (run.tmp, run.aside):
            if os.path.lexists(leftover):
                _fs.remove(leftover)
                done.append(f"removed {leftover.name} (its run, {owner.describe()}, is gone)")
        entry.unlink(missing_ok=True)
    done += _legacy(out, now)
    for line in done:
        note(line)
    return done


def _legacy(out: Path, now: float | None) -> list[str]:
    """Temporaries named by pid only (qtk before owner records): removed when untouched for a day; an
    aside copy is restored first if the output is missing."""
    legacy = re.compile(rf"^\.{re.escape(out.name)}\.qtk-(tmp|old)-\d+$")
    found = sorted((p for p in out.parent.iterdir() if legacy.match(p.name)), key=lambda p: "tmp" in p.name)
    if not found:
        return []
    now = _fs.fs_now(out.parent) if now is None else now
    done = []
    for p in found:
        if _fs_age(p, now) < LEGACY_TTL_S:
            continue
        if "-old-" in p.name and not os.path.lexists(out) and p.is_dir():
            with contextlib.suppress(OSError):
                _fs.rename_noreplace(p, out)
                _fs.fsync_dir(out.parent)
                done.append(f"restored {out.name} from {p.name}")
                continue
        _fs.remove(p)
        done.append(f"removed {p.name} (untouched for a day)")
    return done

