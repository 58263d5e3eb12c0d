"""Method names -> implementations. A plain dict is enough until third-party methods exist."""

from __future__ import annotations

from .. import errors
from .base import Method

__all__ = ["get_method", "list_methods", "METHOD_NAMES"]


def _methods() -> dict[str, Method]:
    from .awq import AWQ
    from .gptq import GPTQ
    from .nf4 import NF4

    return {m.name: m for m in (GPTQ(), AWQ(), NF4())}


METHOD_NAMES = ("gptq", "awq", "nf4")


def get_method(name: str) -> Method:
    methods = _methods()
    if name not in methods:
        raise errors.UsageError(f"Unknown method {name!r}.", hint=f"Choose one of: {', '.join(methods)}.")
    return methods[name]


def list_methods() -> list[Method]:
    return list(_methods().values())
