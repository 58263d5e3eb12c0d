"""``--shard I/N``: one manifest split deterministically over N workers (Kubernetes Indexed Jobs,
Slurm job arrays), without a scheduler.

The unit of work is one artifact, a (model, recipe) pair, named by its published repo id. Shard I
(0-based) of N takes the I-th of N contiguous, near-equal blocks of the repo ids *sorted*: every
artifact lands in exactly one shard, the split does not depend on the order of the manifest's
entries, and a model's recipes (adjacent when sorted) mostly share a shard, so most models are
pulled by one worker only. Workers share the store (and the HF cache) on a filesystem all of them
see; the store's locks and input-hash keys make an overlap (two runs of one shard) harmless.
"""

from __future__ import annotations

import re

from .. import errors

__all__ = ["parse_shard", "shard_of", "select"]

_RE = re.compile(r"^\s*(\d{1,6})\s*/\s*(\d{1,6})\s*$", re.ASCII)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with 0 <= I < N."""
    m = _RE.match(text or "")
    if not m:
        raise errors.UsageError(f"--shard {text!r}: expected I/N (e.g. 0/4: the first of 4 shards).",
                                hint="I is 0-based: a Kubernetes Indexed Job's JOB_COMPLETION_INDEX; for a Slurm "
                                     "array, SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN.")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise errors.UsageError(f"--shard {text!r}: the index must be in 0..N-1 and N at least 1.",
                                hint="I is 0-based: 0/4, 1/4, 2/4, 3/4 cover a manifest.")
    return i, n


def select(units: list[str] | tuple[str, ...], index: int, count: int) -> list[str]:
    """The units of shard ``index`` of ``count`` (sorted, contiguous block)."""
    ordered = sorted(set(units))
    lo, hi = index * len(ordered) // count, (index + 1) * len(ordered) // count
    return ordered[lo:hi]


def shard_of(unit: str, units: list[str] | tuple[str, ...], count: int) -> int:
    """Which shard ``unit`` belongs to (for messages and tests)."""
    for i in range(count):
        if unit in select(units, i, count):
            return i
    raise ValueError(f"{unit!r} is not one of the units")
