"""One GGUF file type from the converted BF16 GGUF, through ``llama_model_quantize`` in llama-cpp-python's
bindings (the library llama-quantize is a front end to; no binary needed).

The importance matrix goes in as llama-quantize passes it: ``params.imatrix`` points at an array of
``llama_model_imatrix_data {name, data, size}`` ended by a NULL name, ``data`` being the per-input-column
mean of x² (sum / count) of the GGUF tensor ``name``. llama.cpp copies the arrays at the start of the
call; qtk keeps them (and the names' bytes) referenced until it returns all the same. The metadata
llama-quantize records about the matrix (``quantize.imatrix.*``) is added the same way, as KV overrides.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from .. import errors
from ..gguf_types import FileType

__all__ = ["quantize_gguf"]

# llama.h: enum llama_model_kv_override_type
_KV_INT, _KV_STR = 0, 3


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _imatrix_array(means: dict[str, np.ndarray], keep: list):
    import llama_cpp

    arr = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    for i, (name, values) in enumerate(sorted(means.items())):
        data = np.ascontiguousarray(values, dtype=np.float32)
        raw = name.encode()
        keep += [data, raw]
        arr[i].name = raw
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    arr[len(means)].name = None  # the terminator
    keep.append(arr)
    return arr


def _kv_overrides(kv: dict[str, int | str], keep: list):
    import llama_cpp

    arr = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
    for i, (key, value) in enumerate(kv.items()):
        arr[i].key = key.encode()[:127]
        if isinstance(value, int):
            arr[i].tag = _KV_INT
            arr[i].value.val_i64 = value
        else:
            arr[i].tag = _KV_STR
            arr[i].value.val_str = str(value).encode()[:127]
    arr[len(kv)].key = b""  # the terminator: key[0] == 0
    keep.append(arr)
    return arr


def quantize_gguf(src: Path, dst: Path, ft: FileType, *, imatrix: dict[str, np.ndarray] | None = None,
                  metadata: dict[str, int | str] | None = None, threads: int | None = None) -> None:
    """Write ``dst`` (``ft``) from ``src`` (a BF16/F16/F32 GGUF). ``imatrix``: GGUF tensor name -> mean
    x² per input column; ``metadata``: KV pairs to add (ints and strings)."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ft.ftype
    params.nthread = threads or _cpus()
    keep: list = []  # everything the C side points into stays referenced until the call returns
    if imatrix:
        params.imatrix = ctypes.cast(_imatrix_array(imatrix, keep), ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if metadata:
        params.kv_overrides = ctypes.cast(_kv_overrides(metadata, keep),
                                          ctypes.POINTER(llama_cpp.llama_model_kv_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        dst.unlink(missing_ok=True)
        raise errors.QuantizeError(
            f"llama.cpp could not quantize {src.name} to {ft.name} (llama_model_quantize returned {rc}).",
            hint="The backend output names the tensor and the reason.")
