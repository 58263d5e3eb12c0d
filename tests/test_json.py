"""qtk's one JSON writer: strict JSON whatever the metrics hold (a NaN perplexity, an infinite KL)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qtk import _json


def strict_loads(text: str):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("value, expect", [
    (float("nan"), None),
    (float("inf"), None),
    (float("-inf"), None),
    ({"ppl": float("nan"), "kl": {"mean": float("inf"), "top1": 0.9}}, {"ppl": None, "kl": {"mean": None, "top1": 0.9}}),
    ([1.5, float("nan"), (2, float("-inf"))], [1.5, None, [2, None]]),
    ({"n": 3, "ok": True, "s": "NaN"}, {"n": 3, "ok": True, "s": "NaN"}),  # a string "NaN" stays a string
])
def test_non_finite_floats_are_written_as_null(value, expect):
    assert strict_loads(_json.dumps(value)) == expect


def test_numpy_and_other_scalars():
    np = pytest.importorskip("numpy")
    doc = {"a": np.float32("nan"), "b": np.float64(2.5), "c": np.int64(7), "d": np.bool_(True)}
    out = strict_loads(_json.dumps(doc))
    assert out["a"] is None and out["b"] == 2.5 and out["c"] == 7


def test_paths_and_unknown_objects_become_strings(tmp_path):
    assert strict_loads(_json.dumps({"p": tmp_path})) == {"p": str(tmp_path)}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


@given(json_values)
def test_any_document_is_strict_json_and_keeps_every_finite_value(doc):
    out = strict_loads(_json.dumps(doc))

    def same(a, b):
        if isinstance(a, float) and not math.isfinite(a):
            return b is None
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(map(same, a, b))
        return a == b

    assert same(doc, out)


def test_qtk_writes_go_through_it(tmp_path):
    """The files and stdout documents qtk writes (provision records, events, --json) are strict."""
    from qtk import _fs

    _fs.write_json(tmp_path / "r.json", {"ppl": float("nan")})
    assert strict_loads((tmp_path / "r.json").read_text()) == {"ppl": None}
