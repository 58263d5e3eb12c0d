"""Reading a response body straight into the caller's buffer.

urllib3's public ``HTTPResponse.readinto`` reads into a new ``bytes`` object and copies it into the buffer:
one allocation and one copy per read. The http.client response that urllib3 wraps fills the caller's buffer
with ``recv_into`` (its public, documented ``readinto``): measured here on loopback (16 connections, 8 MiB
ranges, ``pwrite`` of every read), 0.62 CPU-s/GiB against 0.77 for urllib3's ``readinto``, and the same as
reading the socket directly with ``MSG_WAITALL`` (0.60-0.65, which needs http.client's private buffer state).
"""

from __future__ import annotations

import http.client
from typing import Callable

__all__ = ["wrapped_response", "body_readinto"]


def wrapped_response(response) -> http.client.HTTPResponse | None:
    """The http.client response a urllib3 ``HTTPResponse`` reads its body from, or None.

    urllib3 (2.0 to 2.8 at least) keeps it in the private attribute ``_fp`` and offers no public accessor.
    This is the one private attribute of another library that the byte path reads; only its public
    ``readinto`` is used. If urllib3 changes, None comes back and :func:`body_readinto` falls back to
    urllib3's own (slower) ``readinto``; ``tests/test_fetch_body.py`` fails so that someone looks.
    """
    fp = getattr(response, "_fp", None)
    return fp if isinstance(fp, http.client.HTTPResponse) else None


def body_readinto(response) -> Callable[[memoryview], int]:
    """A ``readinto(buffer) -> bytes read`` for the body of ``response`` (0 at its end or when the peer
    closed early). Read to the end, the connection goes back to the pool with ``response.release_conn()``."""
    fp = wrapped_response(response)
    return fp.readinto if fp is not None else response.readinto
