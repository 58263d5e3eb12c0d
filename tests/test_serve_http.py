"""`qtk serve` speaking HTTP/1.1 to hostile clients: request desync (RFC 9112 framing), conditional
requests (RFC 9110 §13), malformed ranges and bodies that Python's own parsers would accept or choke on.

Every request is sent as raw bytes on a real socket to the real server; the whole reply stream is read
until the server closes, so a body that was (wrongly) read as a second request shows up as a second
response.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from email.utils import formatdate

import pytest

from hubtest import start_server
from servetest import SECRETS, build_hostile_store, parse_responses, raw_request

from qtk.mirror.app import load_auth

PUBLIC = "/acme/public/resolve/main/model.safetensors"  # 4096 bytes of zeros (servetest.PUBLIC_FILES)
SIZE = 4096
SMUGGLED = b"GET /acme/internal/resolve/main/secret.txt HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root, access = build_hostile_store(tmp_path_factory.mktemp("http"))
    old = time.time() - 3600  # Last-Modified an hour ago: a strong date validator (If-Range by date)
    os.utime(root / "acme" / "public" / "model.safetensors", (old, old))
    srv = start_server(root, auth=load_auth(access), header_timeout=5)
    yield srv
    srv.shutdown()
    srv.server_close()


class LogLines(logging.Handler):
    """Records of the mirror's logger (attached to it directly: it may not propagate to the root)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def mirror_log():
    logger = logging.getLogger("qtk.mirror")
    h = LogLines()
    logger.addHandler(h)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield h
    logger.removeHandler(h)
    logger.setLevel(old)


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, close our sending side, read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


# -- item 7: one reading of the framing, or 400 and close ------------------------------------------------

POST = b"POST /api/models/acme/public/paths-info/main HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
BODY = b"paths=config.json"
N, NS = str(len(BODY)).encode(), str(len(BODY) + len(SMUGGLED)).encode()
CHUNKED = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)

DESYNC = [  # (name, bytes on the wire, status); each carries a second request that must never be answered. Where
    # one reading of the framing gives a valid paths-info body, a lenient server answers 200: these must be 400
    ("two Content-Length, different", POST + b"Content-Length: " + N + b"\r\nContent-Length: " + NS + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("two Content-Length, equal", POST + b"Content-Length: " + N + b"\r\nContent-Length: " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Content-Length list", POST + b"Content-Length: " + N + b", " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("space before colon: Transfer-Encoding", POST + b"Transfer-Encoding : chunked\r\nContent-Length: " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("space before colon: Content-Length", POST + b"Content-Length : " + NS + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Transfer-Encoding with Content-Length", POST + b"Transfer-Encoding: chunked\r\nContent-Length: " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Transfer-Encoding chunked alone", POST + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED + SMUGGLED, 411),
    ("Transfer-Encoding not ending in chunked", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n" + CHUNKED + SMUGGLED, 400),
    ("Transfer-Encoding in HTTP/1.0", POST.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED + SMUGGLED, 400),
    ("header line without a colon", POST + b"Content-Length " + NS + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("obs-fold", POST + b"X-A: b\r\n c\r\nContent-Length: " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("obs-fold hiding a Content-Length", POST + b"X-A: b\r\n Content-Length: " + NS + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("bare CR", POST + b"X-A: b\rContent-Length: " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("bare LF", POST + b"X-A: b\nContent-Length: " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Content-Length with a sign", POST + b"Content-Length: +" + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Content-Length with an underscore (int() reads 1_0 as 10)", POST + b"Content-Length: 1_7\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Content-Length in hex", POST + b"Content-Length: 0x11\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Content-Length negative", POST + b"Content-Length: -1\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Content-Length in Arabic-Indic digits", POST + "Content-Length: ١٧".encode() + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Content-Length with 30 digits", POST + b"Content-Length: " + b"1" * 30 + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("Content-Length over the body limit", POST + b"Content-Length: 1000000000\r\n\r\n" + BODY + SMUGGLED, 413),
    ("header name with a space inside", POST + b"Content Length: " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("NUL in a header value", POST + b"X-A: a\0b\r\nContent-Length: " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("two Host headers", POST + b"Host: y\r\nContent-Length: " + N + b"\r\n\r\n" + BODY + SMUGGLED, 400),
    ("no Host in HTTP/1.1", b"GET /acme/public/resolve/main/config.json HTTP/1.1\r\n\r\n" + SMUGGLED, 400),
    ("two spaces in the request line", b"GET  /acme/public/resolve/main/config.json HTTP/1.1\r\nHost: x\r\n\r\n" + SMUGGLED, 400),
    ("HTTP/2.0 request line", b"GET /acme/public/resolve/main/config.json HTTP/2.0\r\nHost: x\r\n\r\n" + SMUGGLED, 505),
]


FRAMED = [  # valid framing: the body is read as a body (ignored on a GET), never as the next request
    ("GET with a body", b"GET /acme/public/resolve/main/config.json HTTP/1.1\r\nHost: x\r\nContent-Length: "
     + str(len(SMUGGLED)).encode() + b"\r\n\r\n" + SMUGGLED, 200),
    ("paths-info whose body holds a request", POST + b"Content-Length: " + NS + b"\r\n\r\n" + BODY + SMUGGLED, 400),
]


def _one_answer(srv, wire: bytes) -> tuple[int, dict[str, str], bytes]:
    before = srv.errors_500
    data = exchange(srv.server_address[1], wire)
    answers = parse_responses(data)
    assert len(answers) == 1, [a[0] for a in answers]  # the smuggled request is never answered
    for marker in SECRETS:
        assert marker not in data
    assert srv.errors_500 == before
    return answers[0]


@pytest.mark.parametrize("wire,status", [(w, s) for _, w, s in DESYNC], ids=[n for n, _, _ in DESYNC])
def test_request_desync_is_refused_and_closed(hostile, wire, status):
    got, headers, body = _one_answer(hostile, wire)
    assert got == status, (got, body[:200])
    assert headers.get("connection") == "close" and headers.get("x-error-code")
    assert "error" in json.loads(body)


@pytest.mark.parametrize("wire,status", [(w, s) for _, w, s in FRAMED], ids=[n for n, _, _ in FRAMED])
def test_a_framed_body_is_never_a_request(hostile, wire, status):
    got, _, body = _one_answer(hostile, wire)
    assert got == status, (got, body[:200])


def test_a_valid_body_then_a_pipelined_request_are_two_requests(hostile):
    """The counterpart: with one Content-Length, what follows the body is the next request."""
    body = b"paths=config.json"
    wire = (POST + b"Content-Length: %d\r\n\r\n" % len(body) + body
            + b"GET /acme/public/resolve/main/config.json HTTP/1.1\r\nHost: x\r\n\r\n")
    answers = parse_responses(exchange(hostile.server_address[1], wire))
    assert [a[0] for a in answers] == [200, 200]
    assert [e["path"] for e in json.loads(answers[0][2])] == ["config.json"]
    assert answers[1][2] == b'{"public": true}\n'


def test_expect_100_continue(hostile):
    body = b"paths=config.json"
    with socket.create_connection(("127.0.0.1", hostile.server_address[1]), timeout=10) as s:
        s.sendall(POST + b"Expect: 100-continue\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    ((status, _, answer),) = parse_responses(data)
    assert status == 200 and json.loads(answer)[0]["path"] == "config.json"


# -- item 8: conditional requests ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validators(hostile):
    status, hdrs, _ = raw_request(hostile.server_address[1], PUBLIC, method="HEAD")
    assert status == 200
    return hdrs["ETag"], hdrs["Last-Modified"]


def _date(delta: float, last_modified: str) -> str:
    from email.utils import parsedate_to_datetime

    return formatdate(parsedate_to_datetime(last_modified).timestamp() + delta, usegmt=True)


CONDITIONAL = [  # (name, headers built from (etag, last_modified), status, method)
    ("stale If-Range: the whole file", lambda e, d: {"Range": "bytes=0-9", "If-Range": '"0123abcd"'}, 200, "GET"),
    ("current If-Range: the range", lambda e, d: {"Range": "bytes=0-9", "If-Range": e}, 206, "GET"),
    ("weak If-Range never matches", lambda e, d: {"Range": "bytes=0-9", "If-Range": "W/" + e}, 200, "GET"),
    ("If-Range by the Last-Modified date", lambda e, d: {"Range": "bytes=0-9", "If-Range": d}, 206, "GET"),
    ("If-Range by another date", lambda e, d: {"Range": "bytes=0-9", "If-Range": _date(-10, d)}, 200, "GET"),
    ("If-Range that is no validator", lambda e, d: {"Range": "bytes=0-9", "If-Range": "yesterday"}, 200, "GET"),
    ("If-None-Match the ETag", lambda e, d: {"If-None-Match": e}, 304, "GET"),
    ("If-None-Match weak comparison", lambda e, d: {"If-None-Match": "W/" + e}, 304, "GET"),
    ("If-None-Match *", lambda e, d: {"If-None-Match": "*"}, 304, "GET"),
    ("If-None-Match in a list", lambda e, d: {"If-None-Match": f'"x,y", W/"z", {e}'}, 304, "GET"),
    ("If-None-Match on HEAD", lambda e, d: {"If-None-Match": e}, 304, "HEAD"),
    ("If-None-Match beats Range", lambda e, d: {"If-None-Match": e, "Range": "bytes=0-9"}, 304, "GET"),
    ("If-None-Match another tag", lambda e, d: {"If-None-Match": '"0123abcd"'}, 200, "GET"),
    ("If-None-Match unquoted (malformed)", lambda e, d: {"If-None-Match": e.strip('"')}, 200, "GET"),
    ("If-Match the ETag", lambda e, d: {"If-Match": e}, 200, "GET"),
    ("If-Match *", lambda e, d: {"If-Match": "*"}, 200, "GET"),
    ("If-Match another tag", lambda e, d: {"If-Match": '"0123abcd"'}, 412, "GET"),
    ("If-Match weak (strong comparison)", lambda e, d: {"If-Match": "W/" + e}, 412, "GET"),
    ("If-Match malformed fails closed", lambda e, d: {"If-Match": "not-a-tag"}, 412, "GET"),
    ("If-Modified-Since Last-Modified", lambda e, d: {"If-Modified-Since": d}, 304, "GET"),
    ("If-Modified-Since earlier", lambda e, d: {"If-Modified-Since": _date(-10, d)}, 200, "GET"),
    ("If-None-Match replaces If-Modified-Since", lambda e, d: {"If-None-Match": '"x"', "If-Modified-Since": d}, 200, "GET"),
    ("If-Modified-Since not a date", lambda e, d: {"If-Modified-Since": "\xb2\xb3 Jan 2024"}, 200, "GET"),
    ("If-Unmodified-Since earlier", lambda e, d: {"If-Unmodified-Since": _date(-10, d)}, 412, "GET"),
    ("If-Unmodified-Since later", lambda e, d: {"If-Unmodified-Since": _date(10, d)}, 200, "GET"),
]


@pytest.mark.parametrize("make,status,method", [(m, s, v) for _, m, s, v in CONDITIONAL],
                         ids=[n for n, _, _, _ in CONDITIONAL])
def test_conditional_requests(hostile, validators, make, status, method):
    etag, last_modified = validators
    got, hdrs, body = raw_request(hostile.server_address[1], PUBLIC, method=method, headers=make(etag, last_modified))
    assert got == status, (got, body[:200])
    if status == 304:
        assert body == b"" and hdrs["ETag"] == etag
    elif status == 206:
        assert body == b"\0" * 10 and hdrs["Content-Range"] == f"bytes 0-9/{SIZE}"
    elif status == 200 and method == "GET":
        assert body == b"\0" * SIZE and "Content-Range" not in hdrs
    elif status == 412:
        assert hdrs["X-Error-Code"] == "PreconditionFailed"


def test_conditionals_never_bypass_access(hostile):
    for headers in ({"If-None-Match": "*"}, {"If-Match": "*"}, {"If-Modified-Since": formatdate(time.time() + 10**6, usegmt=True)}):
        got, _, body = raw_request(hostile.server_address[1], "/acme/gated/resolve/main/weights.bin", headers=headers)
        assert got == 401 and b"SECRET" not in body


# -- item 9: malformed ranges and bodies: a 4xx, never a traceback ----------------------------------------

RANGES = [  # (Range value as bytes on the wire, status)
    (b"bytes=\xb2-", 416),  # '²'.isdigit() is True and int('²') raises: was a 500 with a traceback
    (b"bytes=-\xb2", 416),
    (b"bytes=0-\xb9", 416),
    (b"bytes=\xbc-", 416),
    ("bytes=\u0663-".encode(), 416),  # UTF-8 of an Arabic-Indic 3
    (b"bytes=abc", 416),
    (b"bytes=", 416),
    (b"bytes", 416),
    (b"bytes=5-1", 416),  # last < first: invalid (RFC 9110 §14.1.1)
    (b"bytes=--1", 416),
    (b"bytes=1-2-3", 416),
    (b"bytes=0x10-", 416),
    (b"bytes=+1-", 416),
    (b"bytes=1_0-", 416),
    (b"bytes=1 - 2", 416),
    (b"bytes=-0", 416),
    (b"bytes=99999999999999999999-", 416),
    (b"bytes=0-1,2-3", 200),  # several ranges: not combined, the whole file
    (b"items=0-1", 200),  # another unit: ignored
    (b"bytes=0-" + b"9" * 300, 200),  # too long to bother: ignored
    (b"bytes=0-1,", 206),  # empty list elements are allowed
    (b"BYTES = 0-1", 206),
    (b"bytes=0-99999999999999999999", 206),
    (b"bytes=-10", 206),
]


@pytest.mark.parametrize("value,status", RANGES, ids=[str(i) for i in range(len(RANGES))])
def test_malformed_ranges_are_4xx_without_a_traceback(hostile, mirror_log, value, status):
    before = hostile.errors_500
    wire = b"GET " + PUBLIC.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nRange: " + value + b"\r\n\r\n"
    ((got, headers, body),) = parse_responses(exchange(hostile.server_address[1], wire))
    assert got == status, (value, got, body[:200])
    if status == 416:
        assert headers["content-range"] == f"bytes */{SIZE}"
    assert hostile.errors_500 == before
    assert not any(r.exc_info for r in mirror_log.records) and len(mirror_log.records) <= 1


@pytest.mark.parametrize("body", [
    b'{"paths": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 200_000,
    b'{"paths": ' + b'{"a": ' * 30_000 + b"1" + b"}" * 30_000 + b"}",
    b'{"paths": [' + b"9" * 5000 + b"]}",  # past int()'s digit limit
])
def test_deep_or_huge_json_bodies_are_400_without_a_traceback(hostile, mirror_log, body):
    before = hostile.errors_500
    got, hdrs, data = raw_request(hostile.server_address[1], "/api/models/acme/public/paths-info/main", method="POST",
                                  headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
                                  body=body)
    assert got == 400 and hdrs["X-Error-Code"] == "BadRequest", data[:200]
    assert hostile.errors_500 == before
    assert not any(r.exc_info for r in mirror_log.records) and len(mirror_log.records) <= 1
