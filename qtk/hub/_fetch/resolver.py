"""A file's download URL: resolved on the endpoint when first needed, and again when it is refused.

The Hub answers an LFS file's ``resolve`` with a redirect to another origin (a CDN or the Xet bridge) carrying
a signed URL that expires. Each resolve is a new *URL version*. A worker whose URL is refused (401/403/410 from
the other origin) resolves again only if nobody has since, so an expiry costs one resolve however many
connections saw it; the others wait for it and use the new URL. Resolving goes on as long as the URLs work;
fresh URLs refused before serving a byte (``MAX_REFUSED_URLS`` in a row) end the pull after backed-off tries.

Threads: every field is read and written under ``_mu``, which is also held while resolving.
"""

from __future__ import annotations

import threading
from typing import Callable

from ... import errors
from .._errors import public_url
from .session import Stop

__all__ = ["URLResolver", "MAX_REFUSED_URLS", "MAX_RESOLVES"]

MAX_REFUSED_URLS = 5  # fresh URLs in a row refused before serving a byte: access is really gone
MAX_RESOLVES = 1000  # per file: a server whose URLs die after every request is not usable


class URLResolver:
    """``resolve(version)`` asks the endpoint (it is given the version being replaced); ``on_resolve`` counts."""

    def __init__(self, key: str, resolve: Callable[[int], str], *, stop: threading.Event,
                 backoff: Callable[[int], float], on_resolve: Callable[[], None] = lambda: None) -> None:
        self._key = key
        self._resolve_fn = resolve
        self._stop = stop
        self._backoff = backoff
        self._on_resolve = on_resolve
        self._mu = threading.Lock()
        self._url: str | None = None
        self._version = 0  # bumped by every resolve
        self._worked = -1  # the last version that served bytes
        self._refused = 0  # fresh URLs in a row refused before serving a byte
        self._resolves = 0

    def current(self) -> tuple[str, int]:
        """The URL to use and its version, resolving first if there is none."""
        with self._mu:
            if self._url is None:
                self._resolve()
            assert self._url is not None
            return self._url, self._version

    def served(self, version: int) -> None:
        """URL ``version`` answered with bytes."""
        with self._mu:
            self._worked = version

    def refused(self, version: int) -> None:
        """URL ``version`` was refused. Resolve a new one, unless another worker already did: every
        worker that held the old URL then uses the one new URL."""
        with self._mu:
            if self._version != version or self._url is None:
                return
            self._refused = 0 if self._worked == version else self._refused + 1
            if self._refused > MAX_REFUSED_URLS or self._resolves >= MAX_RESOLVES:
                raise errors.AccessDeniedError(
                    f"The download URLs for {self._key} keep being refused by "
                    f"{public_url(self._url, path=False)} ({self._resolves} resolved, the last {self._refused} "
                    "refused before serving a byte).",
                    hint="Check your access to the repo (qtk whoami), then re-run: finished bytes are kept.",
                )
            self._url = None
            if self._refused and self._stop.wait(self._backoff(self._refused)):
                raise Stop
            self._resolve()

    def forget(self) -> None:
        """Resolve again before the next request (the file is fetched again from zero)."""
        with self._mu:
            self._url = None

    @property
    def resolves(self) -> int:
        with self._mu:
            return self._resolves

    def _resolve(self) -> None:
        url = self._resolve_fn(self._version)
        self._resolves += 1
        self._on_resolve()
        self._url, self._version = url, self._version + 1
