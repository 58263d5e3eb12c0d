"""The importance matrix of llama.cpp: per input column of every block matmul, the sum of the squared
input activations over the calibration tokens, and the token count.

Collected on the HF model with forward pre-hooks (one per ``nn.Linear`` whose weight the converter
wrote as a ``blk.*`` tensor), over qtk's calibration samples, and written in llama-imatrix's GGUF
format (tools/imatrix/imatrix.cpp at the vendored commit), so that ``llama-quantize --imatrix FILE``
reads it too:

- KV ``general.type = "imatrix"``, ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count``
  and ``imatrix.chunk_size`` (u32: samples, and tokens per sample);
- per weight, sorted by name: ``<name>.in_sum2`` (F32, ne = [columns, 1], the raw sums) and
  ``<name>.counts`` (F32, ne = [1, 1], the tokens summed).

The quantizer takes ``in_sum2 / counts`` (mean x²) per column, as llama-quantize computes it when it
loads such a file. A row permutation of a weight (the converter permutes Llama's Q/K rows for its
RoPE layout) leaves its input columns, and so its imatrix, unchanged.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._fs import write_atomic

__all__ = ["Imatrix", "collect_imatrix", "write_gguf_imatrix"]

_ALIGN = 32
_U32, _STR, _ARR = 4, 8, 9  # gguf_type: UINT32, STRING, ARRAY
_F32 = 0  # ggml_type F32


@dataclass
class Imatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # GGUF tensor name -> float64 [columns]
    counts: dict[str, int] = field(default_factory=dict)  # GGUF tensor name -> tokens summed
    chunk_count: int = 0  # calibration samples seen
    chunk_size: int = 0  # tokens per sample
    datasets: list[str] = field(default_factory=list)

    def means(self) -> dict[str, np.ndarray]:
        """What the quantizer takes: mean x² per column (float32)."""
        return {n: (s / max(self.counts[n], 1)).astype(np.float32) for n, s in self.sums.items()}

    def write(self, path: Path) -> str:
        """Write the GGUF imatrix file; returns its sha256."""
        return write_gguf_imatrix(path, self)


def _gguf_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def write_gguf_imatrix(path: Path, im: Imatrix) -> str:
    """A GGUF v3 file as llama-imatrix writes it (see the module docstring); returns its sha256."""
    kv = [
        _gguf_str("general.type") + struct.pack("<I", _STR) + _gguf_str("imatrix"),
        _gguf_str("imatrix.datasets") + struct.pack("<IIQ", _ARR, _STR, len(im.datasets))
        + b"".join(_gguf_str(d) for d in im.datasets),
        _gguf_str("imatrix.chunk_count") + struct.pack("<II", _U32, im.chunk_count),
        _gguf_str("imatrix.chunk_size") + struct.pack("<II", _U32, im.chunk_size),
    ]
    tensors: list[tuple[str, tuple[int, ...], bytes]] = []
    for name in sorted(im.sums):
        sums = np.ascontiguousarray(im.sums[name], dtype="<f4")
        tensors.append((f"{name}.in_sum2", (sums.size, 1), sums.tobytes()))
        tensors.append((f"{name}.counts", (1, 1), np.array([im.counts[name]], dtype="<f4").tobytes()))
    infos, offset = [], 0
    for name, shape, data in tensors:
        infos.append(_gguf_str(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
                     + struct.pack("<IQ", _F32, offset))
        offset += len(data) + _pad(len(data))
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + b"".join(infos)
    data = b"".join((head, b"\0" * _pad(len(head)), *(d + b"\0" * _pad(len(d)) for _, _, d in tensors)))
    write_atomic(path, data, durable=False)  # made durable with the rest of the output when it is sealed
    return hashlib.sha256(data).hexdigest()


def _batches(samples: list[list[int]], tokens_per_forward: int) -> Iterable[list[list[int]]]:
    per = max(1, tokens_per_forward // max(len(samples[0]), 1))
    for i in range(0, len(samples), per):
        yield samples[i : i + per]


def collect_imatrix(model, samples: list[list[int]], targets: dict[str, list[str]], *,
                    progress: Callable[[int, int], None] = lambda done, total: None,
                    tokens_per_forward: int = 4096) -> Imatrix:
    """Run ``samples`` (equal-length token windows, no padding) through ``model``'s decoder (the LM
    head's whole-vocabulary logits are never computed: no matmul of it is in the matrix) and sum x²
    per input column of every module in ``targets`` (HF module name -> the GGUF tensor names its weight
    became; one HF weight may become several). ``progress(done, total)`` after each forward batch."""
    import torch

    modules = dict(model.named_modules())
    missing = sorted(set(targets) - set(modules))
    if missing:
        raise KeyError(f"modules not in the model: {', '.join(missing[:5])}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    last: list = [None, None]  # the last input seen and its column sums: q/k/v, and gate/up, share one input

    def hook(name: str):
        def pre(_module, args):
            x = args[0]
            if x is not last[0]:  # float32 per batch (2e-7 relative to float64 here; 2.4x faster), float64 across
                last[0], last[1] = x, torch.square(x.detach().reshape(-1, x.shape[-1]).float()).sum(dim=0).double()
            sums[name] = sums[name] + last[1] if name in sums else last[1].clone()
            counts[name] = counts.get(name, 0) + x.numel() // x.shape[-1]
        return pre

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in targets]
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    batches = list(_batches(samples, tokens_per_forward))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                decoder(input_ids=torch.tensor(batch, device=device), use_cache=False)
                progress(i + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
        last.clear()
    im = Imatrix(chunk_count=len(samples), chunk_size=len(samples[0]) if samples else 0)
    for hf_name, gguf_names in targets.items():
        if hf_name in sums:
            for g in gguf_names:
                im.sums[g] = sums[hf_name].cpu().numpy()
                im.counts[g] = counts[hf_name]
    return im
