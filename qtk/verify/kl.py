"""KL divergence of a candidate's next-token distribution from the reference's, on the same tokens,
accumulated window by window (whole-vocab logits are never held for the whole text)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .perplexity import Window, log_softmax

__all__ = ["KLAccumulator", "KLResult"]


@dataclass(frozen=True)
class KLResult:
    mean: float
    median: float
    p99: float
    top1_agreement: float  # fraction of scored positions whose argmax token is the same
    positions: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class KLAccumulator:
    values: list[np.ndarray] = field(default_factory=list)  # per-position KL, float32: small
    same_top1: int = 0
    positions: int = 0

    def add(self, ref_logits: np.ndarray, cand_logits: np.ndarray, w: Window) -> None:
        """Both logits from position ``w.first`` on (``Model.logits(ids, start=w.first)``)."""
        n = len(w.ids) - 1 - w.first
        vocab = min(ref_logits.shape[-1], cand_logits.shape[-1])  # padded vocabularies: compare the shared part
        p = log_softmax(ref_logits[:n, :vocab])
        q = log_softmax(cand_logits[:n, :vocab])
        kl = (np.exp(p) * (p - q)).sum(axis=-1, dtype=np.float64)
        self.values.append(np.maximum(kl, 0.0).astype(np.float32))
        self.same_top1 += int((p.argmax(-1) == q.argmax(-1)).sum())
        self.positions += len(kl)

    def result(self) -> KLResult:
        v = np.concatenate(self.values) if self.values else np.zeros(1, np.float32)
        return KLResult(float(v.mean()), float(np.median(v)), float(np.percentile(v, 99)),
                        self.same_top1 / max(self.positions, 1), self.positions)
