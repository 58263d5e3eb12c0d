"""How often a GPTQ/AWQ run publishes its resume checkpoint (:mod:`qtk.quantize._resume`).

GPTQModel 7.6 publishes one after every decoder layer by default (``CheckpointConfig(interval="layer:1")``),
and each costs more the further the run is: it serializes every materialized dense tensor (the
embeddings) and the next layer's inputs again, and its integrity checks re-hash every finished layer's
packed bundle several times per commit (the manifest's artifacts, the retained generation's, and again in
the clean-up), so the total grows with the square of the depth. Written after every layer, that was
~8-10 CPU s of ~60 on SmolLM2-135M (30 layers, 16 x 256 tokens; 3,255 bundle copies and 18,487 bundle
hashes in one run; BENCHMARKS.md), and more wall time where fsync is slow.

qtk keeps GPTQModel's checkpoint and picks the layer boundaries that publish one (``QTK_RESUME_EVERY``):

- default: a boundary publishes one once both ``60 s`` have passed since the previous one ended (since
  the run started, for the first) and that gap is at least 19 times what the previous one took. Every
  checkpoint is thus followed by >= 19 times its own duration of work before the next, so an uninterrupted
  run spends at most 5 % of its time on them, apart from the last one before the end and the one GPTQModel
  always writes after the last layer. A run killed loses at most max(60 s, 19 checkpoint-times) of work
  plus one layer;
- ``QTK_RESUME_EVERY=<seconds>`` (``30``, ``2.5s``; ``0``: only the 5 % rule) sets that minimum gap;
- ``QTK_RESUME_EVERY=layer``: after every layer (GPTQModel's own default; for tests of resume itself).

The cadence never changes the bytes a run writes, so it is not part of the run's identity: a run may be
resumed under another cadence. It works through GPTQModel 7.6.0's ``CheckpointExtension.on_boundary``,
which asks ``store.config.interval_layers`` once per boundary: qtk's config answers 1 (due) or "not
yet", and a wrapper times each commit. On other GPTQModel code (source digest) every layer publishes
one, as GPTQModel does, and the provenance says why.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from .. import errors
from ._patch import gptqmodel_version, patched, source_digest

__all__ = ["Cadence", "cadence_from_env", "cadenced_config", "ENV"]

ENV = "QTK_RESUME_EVERY"
DEFAULT_MIN_GAP_S = 60.0
SHARE = 0.05  # at most this share of an uninterrupted run goes to checkpoints
_NOT_YET = 1 << 62  # an interval no run reaches: GPTQModel commits only at the last layer or on a stop
_WRITTEN_FOR = "7.6.0"
_ON_BOUNDARY_SHA256 = "c43f4258e9936936eccf542abd359e31e38b62ae845ea6143f82de33216bfce1"


@dataclass
class Cadence:
    """Decides, at each layer boundary, whether it publishes a checkpoint, and counts what they cost.

    ``due()`` is asked once per boundary; ``record(started, ended, committed)`` is told how long the
    boundary took and whether it published one (GPTQModel also publishes after the last layer and on a
    stop request, whatever ``due()`` said)."""

    min_gap_s: float = DEFAULT_MIN_GAP_S
    every_layer: bool = False
    share: float = SHARE
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    written: int = 0
    seconds: float = 0.0
    _since: float = field(default=0.0, repr=False)
    _last_cost: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._since = self.clock()

    def due(self) -> bool:
        if self.every_layer:
            return True
        gap = self.clock() - self._since
        return gap >= max(self.min_gap_s, self._last_cost * (1 - self.share) / self.share)

    def record(self, started: float, ended: float, committed: bool) -> None:
        if committed:
            self.written += 1
            self.seconds += ended - started
            self._last_cost = ended - started
            self._since = ended

    def policy(self) -> str:
        if self.every_layer:
            return "after every layer"
        return (f"at a layer boundary once >= {self.min_gap_s:g} s and >= {(1 - self.share) / self.share:g}x "
                f"the previous checkpoint's time have passed (<= {self.share:.0%} of the run), and after the last layer")

    def summary(self, why_not: str | None = None) -> dict:
        """For provenance: the policy, checkpoints written and seconds they took; or, where ``cadence`` could
        not drive GPTQModel (``why_not``), GPTQModel's own every-layer policy and why."""
        if why_not:
            return {"every": "after every layer (GPTQModel's default)", "why": why_not}
        return {"every": self.policy(), "written": self.written, "seconds": round(self.seconds, 2)}


def cadence_from_env(environ: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> Cadence:
    """The cadence ``QTK_RESUME_EVERY`` asks for: unset or empty -> the default; ``layer``; a number of
    seconds, optionally with an ``s`` (finite, >= 0). Anything else is refused (UsageError)."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return Cadence(clock=clock)
    if raw == "layer":
        return Cadence(every_layer=True, clock=clock)
    match = re.fullmatch(r"(\d{1,9}(?:\.\d*)?|\.\d+)s?", raw, re.ASCII)
    if match is None:
        raise errors.UsageError(
            f"{ENV}={raw!r} is not a cadence for resume checkpoints.",
            hint=f"Use a number of seconds between checkpoints (e.g. {ENV}=60, the default; 0: only the 5% rule), "
                 f"or {ENV}=layer for one after every layer.")
    return Cadence(min_gap_s=float(match.group(1)), clock=clock)


def _why_not() -> str | None:
    """Why qtk's cadence cannot drive the installed GPTQModel (None: it can)."""
    version = gptqmodel_version()
    if version != _WRITTEN_FOR:
        return f"qtk's checkpoint cadence is written for gptqmodel {_WRITTEN_FOR}, this is {version}"
    from gptqmodel.looper.checkpoint import CheckpointExtension

    if source_digest(getattr(CheckpointExtension, "on_boundary", None)) != _ON_BOUNDARY_SHA256:
        return f"gptqmodel {version}'s CheckpointExtension.on_boundary is not the code qtk's cadence was checked against"
    return None


def cadenced_config(path: str, cadence: Cadence):
    """``(config, timed, why_not)``: the ``CheckpointConfig`` to pass to ``model.quantize(checkpoint=...)``;
    a context manager to hold while it runs (it times each checkpoint for ``cadence``); and None, or why
    ``cadence`` is not used and every layer publishes one (another GPTQModel)."""
    from gptqmodel.looper.checkpoint_store import CheckpointConfig

    why = _why_not()
    if why:
        return CheckpointConfig(path=path, resume="auto", interval="layer:1", keep_last=2), contextlib.nullcontext, why

    class CadencedCheckpointConfig(CheckpointConfig):
        """GPTQModel's config whose layer interval is 1 when ``cadence`` says a checkpoint is due."""

        @property
        def interval_layers(self) -> int:
            return 1 if cadence.due() else _NOT_YET

    @contextlib.contextmanager
    def timed() -> Iterator[None]:
        from gptqmodel.looper.checkpoint import CheckpointExtension

        stock = CheckpointExtension.on_boundary

        def on_boundary(self, boundary):
            before, started = getattr(self, "_committed_cursor", None), cadence.clock()
            try:
                return stock(self, boundary)
            finally:
                cadence.record(started, cadence.clock(), getattr(self, "_committed_cursor", None) != before)

        with patched(CheckpointExtension, on_boundary=on_boundary):
            yield

    return CadencedCheckpointConfig(path=path, resume="auto", interval="layer:1", keep_last=2), timed, None
