"""How qtk waits before trying a Hub request again: one policy for metadata and byte ranges.

* ``Retry-After`` (seconds or an HTTP date) is honoured exactly, up to ``retry_after_max``; a server
  that asks for a longer wait gets no early retry: the pull stops with a :class:`~qtk.errors.NetworkError`
  that says how long the server asked for (retrying early would only earn another 429).
* Without ``Retry-After``, exponential backoff with jitter, capped.
* Every wait is bounded: connect and read timeouts on every request, a fixed number of attempts.

The timeouts follow huggingface_hub's variables, read when a pull starts: ``HF_HUB_ETAG_TIMEOUT``
(metadata: repo info, tree listing, the access check) and ``HF_HUB_DOWNLOAD_TIMEOUT`` (a stalled
byte range). Unset, qtk uses 10 s to connect and 30 s / 60 s to read.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from .. import errors

__all__ = ["RetryPolicy", "parse_retry_after", "RETRY_STATUS"]

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None when absent or unreadable.

    ``"120"`` -> 120.0; ``"Wed, 21 Oct 2026 07:28:00 GMT"`` -> seconds from ``now`` (0 if past).
    Negative, non-finite and unparsable values are ignored (None), as RFC 9110 asks.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(int(text)) if len(text) <= 12 else 1e12  # absurd values stay finite: the cap decides
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None or when.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _env_seconds(name: str) -> float | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise errors.UsageError(f"{name}={raw!r} is not a number of seconds.", hint=f"Set {name} to e.g. 30.") from None
    if not value > 0:
        raise errors.UsageError(f"{name} must be > 0 (got {raw!r}).", hint=f"Set {name} to e.g. 30.")
    return value


def _env_bytes(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18 and int(raw) > 0):
        raise errors.UsageError(f"{name}={raw[:40]!r} is not a positive whole number of bytes.",
                                hint=f"Set {name} to e.g. 67108864 (64 MiB).")
    return int(raw)


@dataclass(frozen=True)
class RetryPolicy:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # metadata
    download_read_timeout: float = 60.0  # one stalled byte range
    attempts: int = 5  # per metadata request (a byte range: _fetch.MAX_ATTEMPTS since its last byte of progress)
    base_delay: float = 0.5
    max_delay: float = 30.0
    retry_after_max: float = 120.0  # longest Retry-After qtk waits for
    answer_deadline: float = 60.0  # one metadata answer, head and body, in total (QTK_METADATA_DEADLINE)
    answer_max_bytes: int = 64 * 1024 * 1024  # one metadata answer's body (QTK_METADATA_MAX_BYTES)

    @classmethod
    def from_env(cls, **overrides) -> "RetryPolicy":
        """Timeouts from ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT``, the metadata answer's bounds
        from ``QTK_METADATA_DEADLINE`` / ``QTK_METADATA_MAX_BYTES``, when set (read now)."""
        env: dict = {}
        if (t := _env_seconds("QTK_METADATA_DEADLINE")) is not None:
            if not math.isfinite(t):
                raise errors.UsageError(f"QTK_METADATA_DEADLINE must be finite (got {t!r}).",
                                        hint="Set QTK_METADATA_DEADLINE to e.g. 60.")
            env["answer_deadline"] = t
        if (n := _env_bytes("QTK_METADATA_MAX_BYTES")) is not None:
            env["answer_max_bytes"] = n
        if (t := _env_seconds("HF_HUB_ETAG_TIMEOUT")) is not None:
            env["read_timeout"] = t
        if (t := _env_seconds("HF_HUB_DOWNLOAD_TIMEOUT")) is not None:
            env["download_read_timeout"] = t
        return cls(**{**env, **overrides})

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt`` (1-based), with +-50% jitter."""
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1)) * (0.5 + random.random())

    def delay(self, attempt: int, retry_after: float | None, what: str) -> float:
        """The wait before the next attempt; raises when the server asks for more than we wait."""
        if retry_after is None:
            return self.backoff(attempt)
        if retry_after > self.retry_after_max:
            raise errors.NetworkError(
                f"{what}: the server asked to retry after {retry_after:.0f} s (Retry-After), longer than qtk "
                f"waits ({self.retry_after_max:.0f} s).",
                hint="The server is rate limiting or down for maintenance: re-run later "
                "(finished bytes are kept and the download resumes).",
            )
        return retry_after
