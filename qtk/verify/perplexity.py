"""Perplexity with llama.cpp's protocol, the same for HF and GGUF models.

The text is tokenized once with the model's own tokenizer (no special tokens) and cut into
non-overlapping windows of ``ctx`` tokens. When the model's tokenizer adds BOS, the first token of
each window is replaced by BOS (as llama.cpp's perplexity tool does). In each window only the second
half is scored: logits at positions ``ctx/2 .. ctx-2`` predict tokens ``ctx/2+1 .. ctx-1``, so every
scored token has at least ctx/2 tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .. import errors

__all__ = ["Window", "windows", "token_nll", "PerplexityResult", "summarize"]


@dataclass(frozen=True)
class Window:
    index: int
    ids: list[int]  # what the model sees (BOS substituted when the model adds one)
    first: int  # first scored logit position


def windows(ids: list[int], ctx: int, *, bos_id: int | None, add_bos: bool, max_tokens: int | None = None) -> Iterator[Window]:
    if ctx < 16 or ctx % 2:
        raise errors.UsageError(f"--ctx must be an even number >= 16 (got {ctx}).")
    n = len(ids) // ctx
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // ctx))
    if n == 0:
        raise errors.UsageError(
            f"The text has {len(ids)} tokens; one window needs --ctx {ctx}.",
            hint="Use a longer text or a smaller --ctx.",
        )
    for i in range(n):
        w = list(ids[i * ctx : (i + 1) * ctx])
        if add_bos and bos_id is not None:
            w[0] = bos_id
        yield Window(i, w, ctx // 2)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (stable: max subtracted; float64 cost 4x for no visible gain)."""
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, w: Window) -> np.ndarray:
    """Negative log-likelihood of each scored token of the window.

    ``logits`` are the model's logits from position ``w.first`` on (``Model.logits(ids, start=w.first)``).
    """
    scored = logits[: len(w.ids) - 1 - w.first]
    lp = log_softmax(scored)
    targets = np.asarray(w.ids[w.first + 1 :])
    return -lp[np.arange(len(targets)), targets].astype(np.float64)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    stderr: float  # of the perplexity (delta method on the mean NLL), as llama.cpp reports it
    mean_nll: float
    tokens_scored: int
    windows: int
    tokens_in_text: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def summarize(nlls: list[np.ndarray], tokens_in_text: int) -> PerplexityResult:
    """Perplexity = exp(mean NLL). A model whose logits overflowed (fp16) gives a NaN or infinite NLL, and
    a mean NLL above ~709 overflows exp(): the perplexity is then NaN or infinity, never an exception, and
    the gates fail it (:mod:`qtk.verify.gates`)."""
    allv = np.concatenate(nlls) if nlls else np.zeros(0)
    n = len(allv)
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf in the variance: NaN, as it should be
        mean = float(allv.mean()) if n else float("nan")
        sd = float(allv.std(ddof=1)) if n > 1 else 0.0
    ppl = _exp(mean)
    return PerplexityResult(ppl, ppl * sd / math.sqrt(n) if n else float("nan"), mean, n, len(nlls), tokens_in_text)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
