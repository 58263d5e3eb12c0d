"""Range planning: how a file is cut into HTTP ``Range`` requests, and how the bytes an earlier run recorded
map onto a new cut.

Pure functions over integers: no I/O, no threads. A file of ``size`` bytes cut at ``chunk`` bytes has the
ranges ``[k * chunk, min(size, (k + 1) * chunk))``; a run records what it wrote as ranges done and the written
head of the others (see :mod:`.state`), which this module turns into *spans* (sorted, merged ``[start, end)``
intervals) and maps onto whatever cut the next run uses. A range is resumed only from its own start: the bytes
a layout can reuse are the covered heads of its ranges (:func:`prefix_covered`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = ["DEFAULT_CHUNK", "MIN_CHUNK", "MAX_CHUNK", "RANGES_PER_CONNECTION", "ALIGN", "Span", "Layout",
           "chunk_size_for", "cut", "merge", "prefix_covered", "layout_keeps", "resume_layout", "choose_chunk",
           "plan"]

DEFAULT_CHUNK = 16 * 1024 * 1024  # the fixed range size of earlier versions (their state files say so)
MIN_CHUNK = 2 * 1024 * 1024
MAX_CHUNK = 64 * 1024 * 1024
RANGES_PER_CONNECTION = 4
ALIGN = 64 * 1024  # range boundaries stay page-aligned (the hasher's madvise needs it)

Span = tuple[int, int]


def chunk_size_for(size: int, connections: int) -> int:
    """The range size for a file: up to ``RANGES_PER_CONNECTION`` full rounds of ranges over the
    connections (so the last round does not leave connections idle), each between ``MIN_CHUNK`` and
    ``MAX_CHUNK``, 64 KiB-aligned. With 16 connections: a 160 MB file gets 63 ranges of 2.4 MiB (it
    got 10 x 16 MiB before: 6 connections idle), a 1 GiB file 64 x 16 MiB, a 10 GB shard 64 MiB ranges."""
    connections = max(connections, 1)
    rounds = max(1, min(RANGES_PER_CONNECTION, size // (connections * MIN_CHUNK)))
    want = -(-max(size, 1) // (connections * rounds))
    want = -(-want // ALIGN) * ALIGN
    return max(MIN_CHUNK, min(MAX_CHUNK, want))


def cut(size: int, chunk: int) -> list[Span]:
    """The ranges of a ``size``-byte file cut every ``chunk`` bytes (none for an empty file)."""
    return [(s, min(s + chunk, size)) for s in range(0, size, chunk)]


def merge(spans: Iterable[Span]) -> list[Span]:
    """``spans`` sorted, with overlapping or touching ones joined."""
    merged: list[Span] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def prefix_covered(spans: list[Span], start: int, end: int) -> int:
    """How many bytes from ``start`` on (up to ``end``) the sorted, merged ``spans`` cover without a gap."""
    k = bisect.bisect_right(spans, (start, float("inf"))) - 1
    if k >= 0 and spans[k][0] <= start < spans[k][1]:
        return min(spans[k][1], end) - start
    return 0


def layout_keeps(spans: list[Span], size: int, chunk: int) -> int:
    """How many of the written bytes ``spans`` a layout of ``chunk``-byte ranges can reuse (range heads)."""
    return sum(prefix_covered(spans, s, e) for s, e in cut(size, chunk))


def resume_layout(spans: list[Span], size: int, wanted: int, recorded: int | None) -> int:
    """The range size to resume with: ``wanted`` if it reuses every byte the state records, else the
    state's own ``recorded`` size (a run with other connections or an older qtk), so that a resume
    never re-downloads what is on disk. A recorded size below 64 KiB (a hand-made state) is not used."""
    if not spans or recorded is None or recorded == wanted or recorded < ALIGN:
        return wanted
    written = sum(e - s for s, e in spans)
    return wanted if layout_keeps(spans, size, wanted) >= written else recorded


def choose_chunk(size: int, connections: int, fixed: int | None, spans: list[Span], recorded: int | None) -> int:
    """The range size of a file: ``fixed`` when the caller set one, else sized from the file and the
    connections, or the recorded size where only that one keeps every recorded byte."""
    if fixed:
        return fixed
    return resume_layout(spans, size, chunk_size_for(size, connections), recorded)


@dataclass(frozen=True)
class Layout:
    """A file cut into ranges, with what is already written: ``done`` ranges, and ``partial`` heads
    (range index -> bytes written from its start)."""

    chunk: int
    ranges: tuple[Span, ...]
    done: frozenset[int]
    partial: Mapping[int, int]

    def covered(self) -> int:
        return sum(e - s for i, (s, e) in enumerate(self.ranges) if i in self.done) + sum(self.partial.values())


def plan(size: int, chunk: int, spans: list[Span]) -> Layout:
    """Cut ``size`` bytes at ``chunk`` and map the written ``spans`` onto the ranges."""
    ranges = tuple(cut(size, chunk))
    done, partial = set(), {}
    for i, (s, e) in enumerate(ranges):
        n = prefix_covered(spans, s, e)
        if n >= e - s:
            done.add(i)
        elif n > 0:
            partial[i] = n
    return Layout(chunk, ranges, frozenset(done), partial)
