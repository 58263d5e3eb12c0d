"""The one device resolver: ``--device auto|cuda|cpu`` -> "cuda" or "cpu", for quantize, verify and
provision alike. ``cuda`` without a GPU torch can see is refused before anything loads."""

from __future__ import annotations

from . import errors

__all__ = ["DEVICES", "resolve_device"]

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise errors.UsageError(f"--device must be auto, cuda or cpu (got {device!r}).")
    if device == "cpu":
        return "cpu"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # GGUF-only verify runs without torch
        has_cuda = False
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if not has_cuda:
        raise errors.UnsupportedConfigError("--device cuda, but torch sees no CUDA GPU.",
                                            hint="Use --device cpu (small models) or install a CUDA build of torch.")
    return "cuda"
