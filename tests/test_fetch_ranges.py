"""qtk/hub/_fetch/ranges.py: how files are cut into ranges and how recorded bytes map onto a new cut."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from qtk.hub._fetch import ranges
from qtk.hub._fetch.ranges import ALIGN, MAX_CHUNK, MIN_CHUNK, chunk_size_for, choose_chunk, cut, merge, plan, \
    prefix_covered

KiB = 1024
MiB = 1024 * KiB

sizes = st.integers(0, 2**36)
connections = st.integers(1, 64)


@settings(max_examples=300, deadline=None)
@given(size=sizes, conns=connections)
def test_the_ranges_cover_the_file_exactly_and_are_aligned(size, conns):
    cs = chunk_size_for(size, conns)
    rs = cut(size, cs)
    assert cs % ALIGN == 0 and MIN_CHUNK <= cs <= MAX_CHUNK
    if size == 0:
        assert rs == []
        return
    assert rs[0][0] == 0 and rs[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(rs, rs[1:]))  # contiguous: no gap, no overlap
    assert all(s % cs == 0 and s % ALIGN == 0 for s, _ in rs)  # every start page-aligned
    assert all(e - s == cs for s, e in rs[:-1]) and 0 < rs[-1][1] - rs[-1][0] <= cs


def _recorded(size: int, old_cs: int, data) -> list[tuple[int, int]]:
    """The spans a state written with ``old_cs``-byte ranges records: ranges done + written heads."""
    n = len(cut(size, old_cs))
    done = data.draw(st.sets(st.integers(0, n - 1)))
    spans = [(i * old_cs, min(size, (i + 1) * old_cs)) for i in done]
    for i in data.draw(st.sets(st.integers(0, n - 1))) - done:
        head = data.draw(st.integers(1, min(size, (i + 1) * old_cs) - i * old_cs))
        spans.append((i * old_cs, i * old_cs + head))
    return merge(spans)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 300 * MiB), old_cs=st.sampled_from([64 * KiB, MiB, 2 * MiB, 3 * MiB, 16 * MiB, 64 * MiB]),
       conns=connections, data=st.data())
def test_a_resume_keeps_every_recorded_byte_whatever_the_new_connections(size, old_cs, conns, data):
    spans = _recorded(size, old_cs, data)
    chunk = choose_chunk(size, conns, None, spans, old_cs)
    layout = plan(size, chunk, spans)
    assert layout.covered() == sum(e - s for s, e in spans)
    for i, (s, e) in enumerate(layout.ranges):  # nothing claimed that the state did not record
        head = (e - s) if i in layout.done else layout.partial.get(i, 0)
        assert head == 0 or prefix_covered(spans, s, s + head) == head
        assert i not in layout.partial or 0 < layout.partial[i] < e - s


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 500)), max_size=30))
def test_merge_keeps_the_union_and_leaves_no_overlap_or_touching_spans(raw):
    spans = [(s, s + n) for s, n in raw if n > 0]
    merged = merge(spans)
    assert all(a[1] < b[0] for a, b in zip(merged, merged[1:]))
    union = {b for s, e in spans for b in range(s, e)}
    assert union == {b for s, e in merged for b in range(s, e)}


@pytest.mark.parametrize(
    "spans,start,end,covered",
    [
        ([], 0, 10, 0),
        ([(0, 10)], 0, 10, 10),
        ([(0, 10)], 0, 4, 4),  # never past the range
        ([(0, 10)], 5, 20, 5),
        ([(2, 10)], 0, 10, 0),  # a gap at the start: nothing usable
        ([(0, 4), (6, 10)], 0, 10, 4),  # up to the first gap only
        ([(0, 4), (6, 10)], 6, 10, 4),
        ([(0, 10)], 10, 20, 0),
    ],
)
def test_prefix_covered(spans, start, end, covered):
    assert prefix_covered(spans, start, end) == covered


@pytest.mark.parametrize(
    "size,conns,fixed,spans,recorded,expect",
    [
        (100 * MiB, 16, None, [], None, 34 * 64 * KiB),  # sized per file: 3 rounds of 16
        (100 * MiB, 16, 5 * MiB, [(0, 16 * MiB)], 16 * MiB, 5 * MiB),  # a fixed size always wins
        (100 * MiB, 16, None, [(0, 37 * MiB)], 16 * MiB, 34 * 64 * KiB),  # one head: the new cut keeps it
        (100 * MiB, 16, None, [(16 * MiB, 20 * MiB)], 16 * MiB, 16 * MiB),  # a head after a gap: only the old cut
        (100 * MiB, 16, None, [(0, 1024)], 1024, 34 * 64 * KiB),  # a tiny recorded size is never adopted
    ],
)
def test_choose_chunk(size, conns, fixed, spans, recorded, expect):
    assert choose_chunk(size, conns, fixed, spans, recorded) == expect


def test_plan_of_an_empty_file_has_no_ranges():
    layout = plan(0, MIN_CHUNK, [])
    assert layout.ranges == () and layout.covered() == 0


def test_plan_maps_done_and_partial_ranges():
    layout = plan(10 * MiB, 4 * MiB, [(0, 5 * MiB), (8 * MiB, 9 * MiB)])
    assert layout.ranges == ((0, 4 * MiB), (4 * MiB, 8 * MiB), (8 * MiB, 10 * MiB))
    assert layout.done == {0} and layout.partial == {1: MiB, 2: MiB}
    assert layout.covered() == 6 * MiB
    assert ranges.layout_keeps([(0, 5 * MiB), (8 * MiB, 9 * MiB)], 10 * MiB, 4 * MiB) == 6 * MiB
