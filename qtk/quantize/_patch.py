"""Changing GPTQModel's code for the duration of one run, and only where it is the code qtk checked.

Shared by the AWQ searches (:mod:`._awq_clip`, :mod:`._awq_scale`) and the checkpoint fixes
(:mod:`._resume`): the installed version, the sha256 of a function's source, and a context manager that
puts replacements in place and always restores what was there.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
from collections.abc import Iterator

__all__ = ["gptqmodel_version", "patched", "source_digest", "why_not_replaceable"]

_ABSENT = object()


def gptqmodel_version() -> str | None:
    try:
        return importlib.metadata.version("gptqmodel")
    except importlib.metadata.PackageNotFoundError:
        return None


def source_digest(obj) -> str | None:
    """sha256 of ``inspect.getsource(obj)`` (None where the source cannot be read)."""
    try:
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
    except (OSError, TypeError):
        return None


@contextlib.contextmanager
def patched(owner, **replacements) -> Iterator[None]:
    """Set ``owner.<name> = value`` for each replacement while the block runs; then put back exactly what
    ``owner`` itself held (an attribute it only inherited is removed again), even when the block raises."""
    saved = {name: vars(owner).get(name, _ABSENT) for name in replacements}
    for name, value in replacements.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def why_not_replaceable(processor_cls, name: str, signature: tuple, known: dict[str, str],
                        needs: tuple[str, ...] = (), what: str = "") -> str | None:
    """None when ``processor_cls.<name>`` in the installed GPTQModel is the function qtk's replacement
    reproduces: a version in ``known`` whose source has that sha256, with ``signature``, and the
    methods in ``needs`` that the replacement calls. Otherwise, why not (for the user's warning)."""
    version = gptqmodel_version()
    if version is None:
        return "gptqmodel is not installed"
    fn = getattr(processor_cls, name, None)
    missing = [m for m in (name, *needs) if not hasattr(processor_cls, m)]
    if fn is None or missing:
        return f"gptqmodel {version}'s AWQProcessor has no {'/'.join(missing)}"
    params = tuple(inspect.signature(fn).parameters)
    if params != signature:
        return f"gptqmodel {version}'s {name} takes {params}, expected {signature}"
    want = known.get(version)
    if want is None:
        return f"gptqmodel {version} is not a version qtk's {what or name} was checked against ({', '.join(known)})"
    got = source_digest(fn)
    if got is None:
        return f"cannot read gptqmodel's {name} source"
    if got != want:
        return f"gptqmodel {version}'s {name} differs from the one qtk's replacement reproduces"
    return None
