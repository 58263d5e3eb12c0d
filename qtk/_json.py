"""qtk's one JSON writer: strict JSON (RFC 8259) that every parser reads.

A metric that is not finite (an fp16 overflow's NaN perplexity, an infinite KL) is written as ``null``:
Python's ``json`` would write the bare tokens ``NaN``/``Infinity``, which strict parsers (jq, JavaScript,
Go) refuse. The gate that such a metric fails says so in words (``perplexity nan``), so nothing is lost.
Objects JSON has no type for (paths, dates) are written as their ``str``.
"""

from __future__ import annotations

import json
import math

__all__ = ["dumps", "finite_or_none"]


def finite_or_none(obj):
    """``obj`` with every float that is not finite replaced by ``None`` (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _default(obj):
    import numbers

    if isinstance(obj, numbers.Real) and not isinstance(obj, bool):  # numpy/torch scalars
        value = float(obj)
        if value.is_integer() and isinstance(obj, numbers.Integral):
            return int(obj)
        return value if math.isfinite(value) else None
    return str(obj)


def dumps(obj, **kw) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (non-finite floats become ``null``)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, default=_default, **kw)
