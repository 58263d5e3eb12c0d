"""One interface for every quantization method.

A method is one module that subclasses :class:`Method` and declares what it supports as class
attributes, plus one entry in :mod:`qtk.methods` (CLI name, output format, the options its
output depends on, memory model). Adding a method (llm-compressor W4A16, FP8, GGUF k-quants...) is
that module and that entry: the CLI, the planner and provision read the registry, and the pipeline
(validation, calibration, atomic output, model card, provenance) is shared. ``tests/toy_method.py``
is the smallest example.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import errors
from .calibration import Samples
from .source import SourceModel, check_group_size

__all__ = ["QuantizeOptions", "Method", "RunContext"]


@dataclass(frozen=True)
class QuantizeOptions:
    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool | None = None  # None: the method's default (AWQ: asymmetric, as AutoAWQ GEMM checkpoints)
    desc_act: bool = False
    calibration: str = "chat"
    samples: int = 128
    seq_len: int = 512
    seed: int = 0
    chat_template: bool | None = None  # None: when the tokenizer has one and the set is chat
    text_field: str | None = None
    allow_fewer: bool = False
    device: str = "auto"
    smooth: bool = True  # W8A8: SmoothQuant smoothing from the calibration set (--no-smooth: off)
    smooth_alpha: float = 0.5  # W8A8: SmoothQuant's migration strength, 0..1
    gguf_type: tuple[str, ...] = ()  # GGUF: the file types to make (Q4_K_M...); a string is one type
    imatrix: bool = True  # GGUF: quantize with an importance matrix from the calibration set (--no-imatrix: off)

    def __post_init__(self) -> None:
        # one spelling of the GGUF types whatever the source (CLI tuple, manifest string or list): upper case,
        # first occurrence kept, so that provision's keys and the file names agree
        types = (self.gguf_type,) if isinstance(self.gguf_type, str) else tuple(self.gguf_type or ())
        object.__setattr__(self, "gguf_type", tuple(dict.fromkeys(str(t).strip().upper() for t in types)))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunContext:
    model: SourceModel
    options: QuantizeOptions
    samples: Samples | None
    device: str  # resolved: "cuda" or "cpu"
    out: Path  # a temporary directory; the pipeline renames it into place
    # survives an interrupted run (same -o), removed after success: a method's resume checkpoint
    work_dir: Path | None = None
    # progress(stage, done, total, peak bytes) for a method that reports its own steps (reports_progress)
    progress: Callable[[str, int, int, int | None], None] | None = None


class Method(ABC):
    name: str
    description: str
    bits: tuple[int, ...] = (4,)
    needs_calibration: bool = True
    uses_group_size: bool = True
    default_sym: bool = True
    distribution: str  # the pip distribution that does the work (for versions and install hints)
    modules: tuple[str, ...]  # import names that must be present
    extra: str  # qtk extra that installs them
    devices: tuple[str, ...] = ("cuda", "cpu")
    # True: run() reports its own stages through ctx.progress (GGUF: conversion, imatrix batches, each type);
    # False: the pipeline reports decoder layers i/N as they first run
    reports_progress: bool = False
    # True: run() writes a transformers checkpoint (config.json with the standard quantization_config, which the
    # pipeline checks, tokenizer files copied beside it); False: files of the method's own format (GGUF)
    writes_checkpoint: bool = True

    def unavailable_reason(self) -> str | None:
        missing = [m for m in self.modules if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install 'qtk[{self.extra}]')"
        return None

    def check_available(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise errors.BackendUnavailableError(
                f"Method {self.name!r} needs {self.distribution}: {reason}.",
                hint=f"Install it with: pip install 'qtk[{self.extra}]' (after torch).",
            )

    def versions(self) -> dict[str, str]:
        out = {}
        for dist in (self.distribution, "torch", "transformers"):
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
        return out

    def sym(self, options: QuantizeOptions) -> bool:
        return self.default_sym if options.sym is None else options.sym

    def label(self, options: QuantizeOptions) -> str:
        """What this run makes, for the pipeline's log line (``4-bit, group 128, sym``)."""
        group = f", group {options.group_size}" if self.uses_group_size else ""
        return f"{options.bits}-bit{group}, {'sym' if self.sym(options) else 'asym'}"

    def model_card(self, model: SourceModel, provenance: dict) -> str | None:
        """The output's README.md when the method has its own (GGUF: how to run it in llama.cpp and Ollama);
        None: the pipeline's card for a transformers checkpoint."""
        return None

    def calibrates(self, options: QuantizeOptions) -> bool:
        """Whether this run reads calibration samples (W8A8 only when it smooths); the pipeline builds
        them, and records the set in provenance, only then."""
        return self.needs_calibration

    def option_problems(self, options: QuantizeOptions) -> dict[str, str]:
        """What this method refuses in ``options`` whatever the model: option -> why (empty: nothing). The
        allowed values are this class's (``bits``, ``uses_group_size``, ``needs_calibration``); read by
        :meth:`validate` and by ``qtk provision`` when it loads a manifest (a recipe fails at load, not after
        the downloads)."""
        from .calibration import MIN_SEQ_LEN
        from .source import group_size_problem

        out = {}
        if options.bits not in self.bits:
            out["bits"] = f"{self.name} supports {' or '.join(map(str, self.bits))} bits, not {options.bits}"
        if self.uses_group_size and (why := group_size_problem(options.group_size)):
            out["group_size"] = why
        if self.needs_calibration and options.samples < 1:
            out["samples"] = f"must be at least 1 (got {options.samples})"
        if self.needs_calibration and options.seq_len < MIN_SEQ_LEN:
            out["seq_len"] = f"must be at least {MIN_SEQ_LEN} tokens (got {options.seq_len})"
        return out

    def validate(self, model: SourceModel, options: QuantizeOptions, device: str) -> None:
        """Refuse early what the method cannot do. Subclasses extend it."""
        for option, why in self.option_problems(options).items():
            raise errors.UnsupportedConfigError(f"--{option.replace('_', '-')}: {why}.")
        if device not in self.devices:
            raise errors.UnsupportedConfigError(f"{self.name} does not run on {device}.")
        if self.uses_group_size:
            check_group_size(model, options.group_size)

    @abstractmethod
    def expected_config(self, options: QuantizeOptions) -> dict:
        """The standard ``quantization_config`` the output must carry (checked after the run)."""

    @abstractmethod
    def run(self, ctx: RunContext) -> dict | None:
        """Quantize ``ctx.model`` and write the checkpoint (weights + config.json) into ``ctx.out``.
        May return details of how it ran (backend paths chosen, resume): provenance ``method_details``."""

    def describe(self) -> dict:
        return {"name": self.name, "description": self.description, "bits": list(self.bits),
                "needs_calibration": self.needs_calibration, "default_sym": self.default_sym,
                "library": self.distribution, "extra": self.extra, "devices": list(self.devices),
                "available": self.unavailable_reason() is None, "why_not": self.unavailable_reason()}
