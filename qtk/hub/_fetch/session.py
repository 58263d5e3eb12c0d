"""The HTTP side of the byte path: one urllib3 pool shared by all workers, where the token may go, the
``Retry-After`` of each origin shared by every connection to it, and what an answer means (retry, resolve
the URL again, or stop).

urllib3 carries the bytes (measured 3-5x cheaper per byte than httpx here). Redirects are followed by hand
so that ``Authorization`` is only ever sent to the endpoint's own origin (:func:`qtk.hub._origin.origin`).
Every request is watched by the minimum-rate guard (:mod:`qtk.hub._rate`): the pool's connections hand
their sockets to it.

Threads: the pool is urllib3's (thread-safe); ``_holdoff`` is read and written under ``_holdoff_mu``;
every other field is set in ``__init__`` and only read afterwards.
"""

from __future__ import annotations

import threading
import time
from typing import NoReturn
from urllib.parse import urljoin

import urllib3

from ... import errors
from .._errors import error_for_status, public_text, public_url
from .._origin import origin
from .._rate import MinRate, RateGuard
from .._rate import install as watch_connections
from .._retry import RETRY_STATUS, parse_retry_after
from .job import FetchJob

__all__ = ["Session", "Retryable", "Expired", "Stop", "REDIRECT_STATUS", "EXPIRED_STATUS"]

REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
EXPIRED_STATUS = frozenset({401, 403, 410})  # from the other origin: a signed URL that expired
MAX_REDIRECTS = 10


class Retryable(Exception):
    """A transient failure: retry the range after a backoff (or the server's ``Retry-After``)."""

    def __init__(self, message: str, *, retry_after: float | None = None, origin: tuple | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.origin = origin


class Expired(Exception):
    """The resolved (CDN) URL of ``version`` is no longer valid: resolve it again."""

    def __init__(self, version: int, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.version = version
        self.status = status


class Stop(Exception):
    """The pull is stopping (an error elsewhere, or Ctrl-C): leave quietly."""


class Session:
    def __init__(self, *, token: str | None, endpoint: str, user_agent: str, connections: int,
                 timeout: tuple[float, float], min_rate: MinRate, stop: threading.Event) -> None:
        self.token = token
        self.endpoint_origin = origin(endpoint)
        self.user_agent = user_agent
        self.timeout = urllib3.Timeout(connect=timeout[0], read=timeout[1])
        self.stop = stop
        self.guard = RateGuard(min_rate, head_limit=timeout[1], transient=(Retryable,))
        pool = urllib3.PoolManager(num_pools=8, maxsize=connections, block=False, retries=False)
        self._pool = watch_connections(pool)  # each connection hands its socket to the rate guard
        self._holdoff: dict[tuple, float] = {}  # origin -> monotonic time before which nobody asks it
        self._holdoff_mu = threading.Lock()

    def headers(self, url: str, extra: dict | None = None) -> dict:
        h = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if self.token and origin(url) == self.endpoint_origin:  # the token goes to the endpoint only
            h["Authorization"] = f"Bearer {self.token}"
        if extra:
            h.update(extra)
        return h

    def hold(self, where: tuple, delay: float) -> None:
        """Nobody asks origin ``where`` again for ``delay`` seconds (its Retry-After applies to us all)."""
        with self._holdoff_mu:
            self._holdoff[where] = max(self._holdoff.get(where, 0.0), time.monotonic() + delay)

    def request(self, method: str, url: str, headers: dict, preload: bool = True):
        with self._holdoff_mu:
            until = self._holdoff.get(origin(url), 0.0)
        wait = until - time.monotonic()
        if self.stop.wait(wait) if wait > 0 else self.stop.is_set():
            raise Stop  # nothing is sent once the pull is stopping
        try:
            return self._pool.request(
                method, url, headers=headers, redirect=False, retries=False,
                preload_content=preload, decode_content=False, timeout=self.timeout,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise Retryable(f"{type(exc).__name__}: {public_text(str(exc))}") from None

    def resolve(self, job: FetchJob, version: int) -> str:
        """HEAD the endpoint (with the token) and follow its redirects on its own origin; a redirect
        to another origin ends the walk: that URL is for GETs only (no HEAD, no token)."""
        url = job.url
        for _ in range(MAX_REDIRECTS):
            with self.guard.watch(public_url(url, path=False)):
                r = self.request("HEAD", url, self.headers(url))
            location = r.headers.get("Location")
            if r.status in REDIRECT_STATUS and location:
                url = urljoin(url, location)
                if origin(url) != self.endpoint_origin:
                    return url
                continue
            if r.status >= 400:
                self.raise_for(job, r, url, version)
            return url
        raise errors.NetworkError(f"Too many redirects resolving {job.key} on {public_url(job.url)}.")

    def raise_for(self, job: FetchJob, r, url: str, version: int) -> NoReturn:
        """The exception an error answer (or a redirect on the byte path) means."""
        status = r.status
        where = public_url(url, path=False)
        if status in RETRY_STATUS:
            raise Retryable(f"HTTP {status} from {where}", retry_after=parse_retry_after(r.headers.get("Retry-After")),
                            origin=origin(url))
        if origin(url) == self.endpoint_origin:
            code, message = r.headers.get("X-Error-Code"), r.headers.get("X-Error-Message")
            raise error_for_status(status, code, message, job.ctx)
        if status in EXPIRED_STATUS:
            raise Expired(version, status)
        raise errors.NetworkError(
            f"The download server {where} answered HTTP {status} for {job.key}, which "
            f"{job.ctx.repo_id or 'the repo'} lists at {str(job.ctx.revision)[:12]} (the endpoint redirected there).",
            hint="The file is in the repo; the server it is stored on failed. Re-run later "
            "(finished bytes are kept), or report it to the Hub's operators.",
        )

    def interrupt(self) -> None:
        """Reads still in flight (the pull failed or was stopped) return now."""
        self.guard.close()

    def close(self) -> None:
        """Once the workers have ended: stop the rate guard's thread (a worker's last try may have started it
        again after :meth:`interrupt`) and close the pool's kept-alive connections now, not when the garbage
        collector reaches the fetcher (a provision run pulls many models in one process)."""
        self.guard.close()
        self._pool.clear()
