"""GPTQ (and AWQ, in awq.py) through GPTQModel, the maintained successor of AutoGPTQ.

Output: a ``checkpoint_format: gptq`` checkpoint whose config.json carries the standard
``quantization_config`` (quant_method gptq, bits, group_size, desc_act, sym) that transformers
(through gptqmodel + optimum) and vLLM load.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Iterator

from .base import Method, QuantizeOptions, RunContext

__all__ = ["GPTQ"]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def prepare_gptqmodel_env() -> None:
    """Before GPTQModel loads anything: refuse a bad ``QTK_RESUME_EVERY`` (the resume checkpoints' cadence,
    :mod:`._cadence`) and size GPTQModel's CPU worker pool."""
    from ._cadence import cadence_from_env

    cadence_from_env()
    # GPTQModel's CPU worker pool asks for 2 workers even on small machines ("Virtual pool ...
    # requests 2 workers" on <= 2 cores); give it what it asks for.
    if (os.cpu_count() or 1) <= 2:
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@contextlib.contextmanager
def gptqmodel_logs_elsewhere() -> Iterator[None]:
    """GPTQModel writes a per-layer log into ``./logs`` of whatever directory the user is in;
    point it at a temporary directory instead, so qtk leaves nothing behind in the cwd."""
    from gptqmodel.looper import loop_processor

    saved = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    if saved is None:  # another GPTQModel version: nothing to redirect
        yield
        return
    with tempfile.TemporaryDirectory(prefix="qtk-gptqmodel-logs-") as tmp:
        loop_processor._PROJECT_LOG_DIR = type(saved)(tmp)
        try:
            yield
        finally:
            loop_processor._PROJECT_LOG_DIR = saved


def _malloc_trim():
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def heap_trimmed_per_layer() -> Iterator[str]:
    """Hand freed heap memory back to the OS each time a new decoder layer starts.

    GPTQModel frees each layer's working tensors (dequantized copies, Hessians, activations) after the
    layer, but glibc keeps most of those pages in its arenas, so peak RSS grew by ~0.6-0.8 of a layer's
    BF16 size per layer (SmolLM2 width, 8 -> 32 layers). ``malloc_trim(0)`` at each layer boundary
    keeps RSS flat (measured: 517 -> 601 MB anon over 32 layers without, 496 -> 468 MB with; peak
    842 -> 788 MB); it costs milliseconds per layer. Yields what ran ("malloc_trim per layer" or "off")."""
    import torch

    trim = _malloc_trim()
    if trim is None:
        yield "off (no glibc malloc_trim)"
        return
    seen: set[int] = set()

    def hook(module, _args):
        if id(module) not in seen and type(module).__name__.endswith("DecoderLayer"):
            seen.add(id(module))
            trim(0)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield "malloc_trim per layer"
    finally:
        handle.remove()
        trim(0)  # before the save, which packs and writes the whole quantized model


def forward_batch(ctx: RunContext, tokens_per_forward: int = 8192) -> int:
    """Calibration samples per forward pass in GPTQModel's loops (its ``batch_size``).

    qtk's samples all have the same length, so batching needs no padding and changes no result (AWQ's
    output on SmolLM2 is byte-identical for 1, 4 and 16); it only turns one-sample matrix products into
    bigger, faster ones. ~8k tokens per forward keeps the activations of even Llama-70B's MLP
    (8k x 28672 x 2 bytes = 470 MB per tensor) small next to a layer's weights."""
    n = len(ctx.samples.input_ids) if ctx.samples is not None else 1
    return max(1, min(n, tokens_per_forward // max(ctx.options.seq_len, 1)))


def quantize_resumable(ctx: RunContext, model, method: str, **kwargs) -> dict:
    """``model.quantize(calibration, **kwargs)`` with GPTQModel's per-layer checkpoint under
    ``ctx.work_dir`` (see :mod:`qtk.quantize._resume`); returns the resume details for provenance."""
    from ._resume import checkpointing, discard

    rows = calibration_rows(ctx)
    with checkpointing(ctx, model, method, kwargs) as (checkpoint, details):
        try:
            model.quantize(rows, checkpoint=checkpoint, **kwargs) if checkpoint else model.quantize(rows, **kwargs)
        except Exception as exc:  # GPTQModel refused the checkpoint (identity, schema): start afresh once
            from gptqmodel.looper.checkpoint import CheckpointStopped
            from gptqmodel.looper.checkpoint_store import CheckpointError

            if isinstance(exc, CheckpointStopped):  # Ctrl-C/SIGTERM, honoured at a layer boundary: resumable
                raise KeyboardInterrupt from exc

            refused = isinstance(exc, CheckpointError) and any(
                k in str(exc) for k in ("identity", "schema", "corrupt", "checksum", "missing checkpoint object"))
            if checkpoint is None or not refused:  # e.g. "another writer owns this checkpoint directory": not ours
                raise
            discard(ctx)
            with checkpointing(ctx, model, method, kwargs) as (checkpoint, again):
                model.quantize(rows, checkpoint=checkpoint, **kwargs)
            details = {**again, "resume": f"discarded (gptqmodel: {exc})"}
    return details


def calibration_rows(ctx: RunContext) -> list[dict]:
    assert ctx.samples is not None
    return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in ctx.samples.input_ids]


class GPTQ(Method):
    name = "gptq"
    description = "GPTQ weight-only int4/int8 with group scales (GPTQModel); transformers + vLLM load it"
    bits = (4, 8)
    default_sym = True
    distribution = "gptqmodel"
    modules = ("gptqmodel", "optimum")
    extra = "gptq"

    def expected_config(self, options: QuantizeOptions) -> dict:
        return {"quant_method": "gptq", "bits": options.bits, "group_size": options.group_size,
                "desc_act": options.desc_act, "sym": self.sym(options), "checkpoint_format": "gptq"}

    def run(self, ctx: RunContext) -> dict:
        prepare_gptqmodel_env()
        from gptqmodel import GPTQConfig, GPTQModel

        o = ctx.options
        cfg = GPTQConfig(bits=o.bits, group_size=o.group_size, desc_act=o.desc_act, sym=self.sym(o))
        seed_everything(o.seed)
        model = GPTQModel.load(str(ctx.model.path), cfg, device=ctx.device)
        with gptqmodel_logs_elsewhere(), heap_trimmed_per_layer() as heap:
            # batch 1: GPTQ's Hessian sums depend on the batching (not byte-identical across batch sizes)
            details = quantize_resumable(ctx, model, "gptq", batch_size=1)
        model.save(str(ctx.out))
        return {**details, "host_heap": heap}
