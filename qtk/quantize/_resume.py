"""Resume an interrupted GPTQ/AWQ run with GPTQModel's own checkpointing (7.6: ``CheckpointConfig``).

GPTQModel publishes, after every decoder layer, the packed layers finished so far and the next layer's
inputs (content-addressed, fsync'd, ``CURRENT`` swapped atomically); a re-run with the same checkpoint
directory restores them and continues at the next layer. Its identity covers the source shards'
sha256, the full quantization config, the calibration tensors, torch/transformers versions and the
device topology; a mismatch is refused there.

qtk puts that directory under the run's ``work_dir`` (``.<output>.qtk-work/``, beside the output, kept
after a crash or Ctrl-C and removed after success) and adds its own identity in front of it (qtk
options, calibration token ids, source files, versions, torch's thread count: GPTQ's bytes on the CPU
depend on it, and a run killed under one count and finished under another wrote layers that match
neither): a changed input or option discards the old checkpoint and starts afresh instead of failing;
so does a checkpoint GPTQModel refuses to restore.
Where GPTQModel cannot checkpoint (an architecture without a state adapter, e.g. anything but
llama/qwen3_moe in 7.6), the run goes on without one and the provenance says why. While a checkpointed
run is in flight, GPTQModel turns Ctrl-C/SIGTERM into a stop at the next layer boundary; qtk then exits
as interrupted (130) and the same command resumes.

Two defects of GPTQModel 7.6's checkpointing are fixed here, for the duration of one run and only when
the installed functions are the ones the fixes were written against (version and source digests; else
the run goes on without a checkpoint and the provenance says why):

- **Sources that link elsewhere** (every HF-cache snapshot: ``snapshots/<rev>/x -> ../../blobs/<oid>``).
  GPTQModel's source identity resolves each file and refuses one whose real path leaves the model
  directory ("source shard escapes the model directory"). What it records is the files' content sha256,
  so where the bytes live changes nothing; qtk's version keeps the containment check on the *name*
  (no absolute path, no ``..``: the guard against a crafted ``model.safetensors.index.json``), follows
  the link to a regular file and hashes the same bytes: the identity is the one a plain copy of the
  directory gets. Nothing is copied or linked, so a read-only, shared (NFS) or other-filesystem cache
  works as it is, and the model loads from the snapshot exactly as a run without a checkpoint does.
- **AWQ restore** ("checkpoint tensor schema differs: model.layers.0.self_attn.q_proj"). The restore
  path rebuilds each packed layer with the kernel's constructor defaults, whose ``scales`` (and
  ``bias``) are float16, while AWQ packs them in the weights' dtype (bfloat16 for a BF16 model); the
  schema check then refuses its own checkpoint. qtk rebuilds those two buffers (still on the meta
  device) in the dtype the checkpoint's bundle holds, when that is float16 or bfloat16 (the only dtypes
  AWQ's pack writes); every other check of the restore path runs unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from ._cadence import cadence_from_env, cadenced_config
from ._patch import gptqmodel_version, patched, source_digest
from .base import RunContext
from .source import file_sha256, safetensors_header

__all__ = ["checkpointing", "discard", "run_identity"]

_IDENTITY = "qtk-identity.json"
_STORE = "gptqmodel-checkpoint"
_FIXED_FOR = "7.6.0"
# sha256 of inspect.getsource(...) in GPTQModel 7.6.0 of what the fixes above replace or wrap
_KNOWN_SOURCES = {
    "_source_identity": "d163ebcee5acd44a4e68a69bd0e111edf50c448f23120fc278004e32982f3692",
    "restore_packed_module": "5937fbbe31c78ec77335efe635f6c49740fac709e6d5c9571b231f02a08931cb",
    "QuantizationCheckpointAdapter.restore": "cadb6e094607ff689e37774e9a6c8165ea024725ca1a44ba94b20bd276bc8223",
}
_PACKED_FLOATS = {"F16": "float16", "BF16": "bfloat16"}  # safetensors dtype -> torch, as AWQ's pack writes


def _qtk_code() -> dict:
    """What selects qtk's own quantization code: its version, a digest of the quantize package's sources (a
    changed search in ``_awq_clip.py`` must not finish a half-run of the old one) and the environment
    switches that pick a search path (``QTK_AWQ_*``, ``QTK_GPTQ_*``)."""
    from .. import __version__

    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("QTK_AWQ_", "QTK_GPTQ_"))}
    return {"version": __version__, "quantize_sources_sha256": digest.hexdigest(), "env": env}


def torch_threads() -> int:
    """torch's intra-op thread count: GPTQ's bytes depend on it on the CPU (measured on SmolLM2's first 2
    layers: 1 thread vs 2 changed 28 of 62 tensors; matrix products split their sums by thread), so a
    checkpoint written under one count must not be finished under another (the layers after the resume
    would match neither run)."""
    import torch

    return torch.get_num_threads()


def run_identity(ctx: RunContext, method: str, run_args: dict | None = None) -> dict:
    """What must be equal for a checkpoint to be resumed: method and options, the calibration token ids,
    the source weight files (name, size, mtime), the library versions, qtk's own code, the arguments of
    GPTQModel's ``quantize`` (``run_args``: batch size, backend) and torch's thread count."""
    ids = hashlib.sha256(json.dumps(ctx.samples.input_ids if ctx.samples else None).encode()).hexdigest()
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in ctx.model.weight_files]
    versions = {}
    for dist in ("gptqmodel", "torch", "transformers"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    identity = {"method": method, "options": ctx.options.to_dict(), "device": ctx.device, "calibration_ids": ids,
                "source": {"path": str(ctx.model.path), "files": files}, "versions": versions,
                "qtk": _qtk_code(), "run_args": {k: str(v) for k, v in sorted((run_args or {}).items())},
                "torch_threads": torch_threads()}
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


def _unfixable(name: str) -> str | None:
    """Why qtk's fix of GPTQModel's ``gptq_checkpoint.<name>`` cannot be applied here (None: it can)."""
    version = gptqmodel_version()
    if version is None:
        return "gptqmodel is not installed"
    if version != _FIXED_FOR:
        return f"it is written for gptqmodel {_FIXED_FOR}, this is {version}"
    from gptqmodel.looper import gptq_checkpoint

    obj = gptq_checkpoint
    for part in name.split("."):
        obj = getattr(obj, part, None)
    if source_digest(obj) != _KNOWN_SOURCES[name]:
        return f"gptqmodel {version}'s {name} is not the code it was checked against"
    return None


def _names_a_file_inside(name: str) -> bool:
    """Whether ``name`` (from ``model.safetensors.index.json``) names a path below the model directory by
    its spelling: relative, no ``..``, not the directory itself."""
    rel = Path(name)
    return isinstance(name, str) and not rel.is_absolute() and ".." not in rel.parts and bool(rel.parts)


def source_identity(model) -> dict:
    """GPTQModel 7.6's checkpoint source identity (``gptq_checkpoint._source_identity``: name -> sha256 of
    config.json and every weight shard), with its containment check on the names instead of the resolved
    paths, so that a file may link out of the model directory (an HF-cache snapshot into ``blobs/``).
    Same result as the stock function on a plain copy of the directory."""
    from gptqmodel.looper.checkpoint_store import CheckpointError

    root = Path(model.model_local_path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise NotImplementedError("checkpoint requires a local safetensors source model")
    result = {}
    for name in ["config.json", *shards]:
        if not _names_a_file_inside(name):
            raise CheckpointError("source shard escapes the model directory")
        result[name] = file_sha256(root / name)
    return result


def _source_links_followed():
    from gptqmodel.looper import gptq_checkpoint

    return patched(gptq_checkpoint, _source_identity=source_identity)


@contextlib.contextmanager
def _awq_restored_in_packed_dtype() -> Iterator[None]:
    """While it runs, GPTQModel's restore rebuilds an AWQ layer's ``scales``/``bias`` (meta tensors) in
    the dtype its checkpoint bundle holds instead of the constructor's float16."""
    import torch
    from gptqmodel.looper import gptq_checkpoint
    from gptqmodel.nn_modules.qlinear import AWQuantLinear

    adapter = gptq_checkpoint.QuantizationCheckpointAdapter
    stock_restore, stock_build = adapter.restore, gptq_checkpoint.restore_packed_module
    held: dict[str, dict] = {}  # layer name -> its bundle's safetensors header, during one restore

    def restore(self, state, artifacts):
        held.update({name: safetensors_header(Path(bundle)) for name, bundle in artifacts.items()})
        try:
            return stock_restore(self, state, artifacts)
        finally:
            held.clear()

    def build(spec, *, name, **kwargs):
        module = stock_build(spec, name=name, **kwargs)
        if isinstance(module, AWQuantLinear):
            for key in ("scales", "bias"):
                buf = module._buffers.get(key)
                dtype = _PACKED_FLOATS.get((held.get(name, {}).get(key) or {}).get("dtype"))
                if buf is not None and dtype and buf.device.type == "meta" and buf.dtype != getattr(torch, dtype):
                    module.register_buffer(key, torch.empty(buf.shape, dtype=getattr(torch, dtype), device="meta"))
        return module

    with patched(adapter, restore=restore), patched(gptq_checkpoint, restore_packed_module=build):
        yield


def discard(ctx: RunContext) -> None:
    if ctx.work_dir is not None:
        shutil.rmtree(ctx.work_dir, ignore_errors=True)


def _fixes(ctx: RunContext, method: str) -> tuple[dict, str | None]:
    """The fixes of GPTQModel's checkpointing this run needs ({name: context manager factory}), or why
    it cannot be checkpointed here."""
    fixes = {}
    if method == "awq":
        why = _unfixable("restore_packed_module") or _unfixable("QuantizationCheckpointAdapter.restore")
        if why:
            return {}, f"gptqmodel cannot restore its AWQ checkpoints without qtk's fix, and {why}"
        fixes["awq restore in the packed dtype"] = _awq_restored_in_packed_dtype
    escaped = _links_out_of(Path(ctx.model.path), ["config.json", *(f.name for f in ctx.model.weight_files)])
    if escaped:
        why = _unfixable("_source_identity")
        if why:
            return {}, (f"gptqmodel refuses sources whose files link outside the model directory ({escaped} "
                        f"does: an HF-cache snapshot) without qtk's fix, and {why}")
        fixes["source links followed"] = _source_links_followed
    return fixes, None


@contextlib.contextmanager
def checkpointing(ctx: RunContext, model, method: str, run_args: dict | None = None
                  ) -> Iterator[tuple[object | None, dict]]:
    """Yields ``(checkpoint, details)``: pass ``checkpoint`` to ``model.quantize(checkpoint=..., **run_args)``
    (None: no checkpointing), and put ``details`` in the method's provenance details. How often a checkpoint
    is published is :mod:`._cadence`'s (``QTK_RESUME_EVERY``); after the block, ``details`` says how many
    were written and what they cost (``resume_checkpoints``)."""
    if ctx.work_dir is None:
        yield None, {"resume": "off"}
        return
    if threading.current_thread() is not threading.main_thread():  # GPTQModel's checkpoint needs signals
        yield None, {"resume": "off: not on the main thread"}
        return
    fixes, why_not = _fixes(ctx, method)
    if why_not:
        yield None, {"resume": f"off: {why_not}"}
        return
    try:
        from gptqmodel.looper.gptq_checkpoint import validate_checkpoint_support

        validate_checkpoint_support(model)
    except (NotImplementedError, ValueError, ImportError) as exc:
        yield None, {"resume": f"unsupported by gptqmodel here: {exc}"}
        return
    state = _prepare(Path(ctx.work_dir), run_identity(ctx, method, run_args))
    cadence = cadence_from_env()
    cfg, timed, why_not = cadenced_config(str(Path(ctx.work_dir) / _STORE), cadence)
    details = {"resume": state, **({"resume_gptqmodel_fixes": sorted(fixes)} if fixes else {})}
    with contextlib.ExitStack() as stack:
        for fix in fixes.values():
            stack.enter_context(fix())
        stack.enter_context(timed())
        yield cfg, details
    details["resume_checkpoints"] = cadence.summary(why_not)
