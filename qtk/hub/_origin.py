"""The origin of a URL (scheme, host, port): what qtk binds the token to.

One rule for the metadata requests (:mod:`qtk.hub._metadata`) and the byte path (:mod:`qtk.hub._fetch`):
``Authorization`` goes to the endpoint's own origin only, and a URL on another origin (a CDN's signed URL,
a listing page elsewhere) never receives it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["origin"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)``, lower-cased, with the scheme's default port filled in. A URL whose port is
    not a number gets a host no real URL has, so it matches no origin (and never receives the token)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return scheme, "\0invalid", None
    return scheme, (parts.hostname or "").lower(), port
