"""Resume an interrupted GPTQ/AWQ run with GPTQModel's own checkpointing (7.6: ``CheckpointConfig``).

GPTQModel publishes, after every decoder layer, the packed layers finished so far and the next layer's
inputs (content-addressed, fsync'd, ``CURRENT`` swapped atomically); a re-run with the same checkpoint
directory restores them and continues at the next layer. Its identity covers the source shards'
sha256, the full quantization config, the calibration tensors, torch/transformers versions and the
device topology; a mismatch is refused there.

qtk puts that directory under the run's ``work_dir`` (``.<output>.qtk-work/``, beside the output, kept
after a crash or Ctrl-C and removed after success) and adds its own identity in front of it (qtk
options, calibration token ids, source files, versions): a changed input or option discards the old
checkpoint and starts afresh instead of failing; so does a checkpoint GPTQModel refuses to restore.
AWQ is not checkpointed: GPTQModel 7.6 cannot restore its own AWQ checkpoints. Where GPTQModel cannot checkpoint (an architecture
without a state adapter, e.g. anything but llama/qwen3_moe in 7.6), the run goes on without one and the
provenance says why. While a checkpointed run is in flight, GPTQModel turns Ctrl-C/SIGTERM into a stop at
the next layer boundary; qtk then exits as interrupted (130) and the same command resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from .base import RunContext

__all__ = ["checkpointing", "discard", "run_identity"]

_IDENTITY = "qtk-identity.json"
# Measured (SmolLM2, CPU): GPTQModel 7.6 writes AWQ checkpoints, but restoring one fails
# ("CheckpointError: checkpoint tensor schema differs: model.layers.0.self_attn.q_proj"), so an AWQ
# re-run would only pay for the checkpoint writes and then start over: AWQ runs without one.
_RESTORE_BROKEN = {"awq": "gptqmodel 7.6 cannot restore its AWQ checkpoints (tensor schema differs)"}
_STORE = "gptqmodel-checkpoint"


def run_identity(ctx: RunContext, method: str) -> dict:
    """What must be equal for a checkpoint to be resumed: method and options, the calibration token ids,
    the source weight files (name, size, mtime) and the library versions."""
    import importlib.metadata as md

    ids = hashlib.sha256(json.dumps(ctx.samples.input_ids if ctx.samples else None).encode()).hexdigest()
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in ctx.model.weight_files]
    versions = {}
    for dist in ("gptqmodel", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    identity = {"method": method, "options": ctx.options.to_dict(), "device": ctx.device, "calibration_ids": ids,
                "source": {"path": str(ctx.model.path), "files": files}, "versions": versions}
    return json.loads(json.dumps(identity))  # as it reads back from disk (tuples -> lists)


def _prepare(work: Path, identity: dict) -> str:
    """Keep the checkpoint if its identity matches; else discard it. Returns 'resumed', 'fresh' or
    'discarded (...)'."""
    ident = work / _IDENTITY
    state = "fresh"
    if ident.is_file():
        try:
            old = json.loads(ident.read_text())
        except ValueError:
            old = None
        if old == identity:
            return "resumed" if (work / _STORE / "CURRENT").is_file() else "fresh"
        changed = sorted(k for k in identity if not isinstance(old, dict) or old.get(k) != identity[k])
        state = f"discarded (changed: {', '.join(changed) or 'unreadable identity'})"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tmp = work / (_IDENTITY + ".tmp")
    tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
    tmp.replace(ident)
    return state


def _links_out_of(root: Path, names: list[str]) -> str | None:
    """The first of ``names`` whose real path lies outside ``root`` (HF-cache snapshots link into blobs/)."""
    real_root = root.resolve()
    for name in names:
        if (root / name).exists() and not (root / name).resolve().is_relative_to(real_root):
            return name
    return None


def discard(ctx: RunContext) -> None:
    if ctx.work_dir is not None:
        shutil.rmtree(ctx.work_dir, ignore_errors=True)


@contextlib.contextmanager
def checkpointing(ctx: RunContext, model, method: str) -> Iterator[tuple[object | None, dict]]:
    """Yields ``(checkpoint, details)``: pass ``checkpoint`` to ``model.quantize(checkpoint=...)`` (None:
    no checkpointing), and put ``details`` in the method's provenance details."""
    if ctx.work_dir is None:
        yield None, {"resume": "off"}
        return
    if threading.current_thread() is not threading.main_thread():  # GPTQModel's checkpoint needs signals
        yield None, {"resume": "off: not on the main thread"}
        return
    if method in _RESTORE_BROKEN:
        yield None, {"resume": f"off: {_RESTORE_BROKEN[method]}"}
        return
    from gptqmodel.looper.checkpoint_store import CheckpointConfig

    try:
        from gptqmodel.looper.gptq_checkpoint import validate_checkpoint_support

        validate_checkpoint_support(model)
    except (NotImplementedError, ValueError, ImportError) as exc:
        yield None, {"resume": f"unsupported by gptqmodel here: {exc}"}
        return
    escaped = _links_out_of(Path(ctx.model.path), ["config.json", *(f.name for f in ctx.model.weight_files)])
    if escaped:  # GPTQModel's identity refuses them ("source shard escapes the model directory")
        yield None, {"resume": f"off: gptqmodel 7.6 checkpoints need the weights inside the model directory; "
                               f"{escaped} links outside it (an HF-cache snapshot)"}
        return
    state = _prepare(Path(ctx.work_dir), run_identity(ctx, method))
    cfg = CheckpointConfig(path=str(Path(ctx.work_dir) / _STORE), resume="auto", interval="layer:1", keep_last=2)
    yield cfg, {"resume": state}
