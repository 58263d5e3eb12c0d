"""The one parser of ``qtk serve`` request heads (RFC 9112), run by the event loop before any worker is taken.

Strict wherever a message's framing could be read two ways (the root of request smuggling), so that
the bytes after a request are read as the next request only when every reader would agree:

* lines end with CRLF; a bare CR or a bare LF anywhere in the head is refused (RFC 9112 §2.2 lets a
  recipient accept a lone LF: this server does not, so there is one way to split lines);
* request line: ``method SP target SP HTTP/x.y``, single spaces, a token method, a target without
  whitespace or controls; HTTP/1.x only (another major version is 505);
* field lines: ``name ":" OWS value OWS``: a token name with no whitespace before the colon (§5.1: 400),
  no line without a colon, no obs-fold (a line starting with SP/HTAB, §5.2), no NUL in a value;
* ``Content-Length``: at most one field line, ASCII digits only (``+5``, ``5, 5``, ``0x5``, ``٥`` and a
  second field, even an equal one, are refused: RFC 9112 §6.3 makes a bad length unrecoverable and RFC
  9110 §8.6 lets a recipient reject duplicates; rejecting costs nothing, as clients send one);
* ``Transfer-Encoding``: together with ``Content-Length`` (§6.3 item 3), in HTTP/1.0 (§6.1), or ending in
  anything but ``chunked`` (§6.3 item 4): 400. ``chunked`` alone: 411, as this read-only mirror takes
  only small bodies with a length (huggingface_hub's paths-info POST);
* HTTP/1.1 needs exactly one ``Host`` field (§3.2);
* at most ``MAX_FIELDS`` field lines (431).

Every refusal is a :class:`BadHead`; the server answers it and closes the connection, so nothing
after a refused head is ever read as a request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BadHead", "Head", "parse_head", "MAX_FIELDS", "MAX_CONTENT_LENGTH_DIGITS"]

MAX_FIELDS = 100
MAX_CONTENT_LENGTH_DIGITS = 18  # fits an int64; anything longer is over any body limit anyway
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])")
_DIGITS = re.compile(rb"[0-9]{1,%d}" % MAX_CONTENT_LENGTH_DIGITS)


class BadHead(Exception):
    """A request head this server refuses: the HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Head:
    """A request head that passed every rule above. Text is decoded as Latin-1 (one byte, one character)."""

    method: str
    target: str
    version: str  # "HTTP/1.0" or "HTTP/1.1" (1.2-1.9 are read as 1.1)
    fields: tuple[tuple[str, str], ...]  # (name, value) in order, names as sent, values without OWS
    content_length: int | None  # None: no Content-Length field (no body)
    keep_alive: bool
    expect_continue: bool

    @property
    def request_line(self) -> str:
        return f"{self.method} {self.target} {self.version}"

    def get(self, name: str) -> str | None:
        want = name.lower()
        for k, v in self.fields:
            if k.lower() == want:
                return v
        return None


def _bad(message: str) -> BadHead:
    return BadHead(400, f"Bad request: {message}.")


def _split_lines(raw: bytes) -> list[bytes]:
    if not raw.endswith(b"\r\n\r\n"):
        raise _bad("the request head does not end with an empty line")
    lines = raw[:-4].split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise _bad("a bare CR or LF in the request head (lines end with CRLF)")
    return lines


def _request_line(line: bytes) -> tuple[str, str, str]:
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        raise _bad("malformed request line (expected 'METHOD /target HTTP/1.1')")
    major = m.group(3)
    if major != b"1":
        raise BadHead(505, "HTTP version not supported: this server speaks HTTP/1.0 and HTTP/1.1.")
    version = "HTTP/1.0" if m.group(4) == b"0" else "HTTP/1.1"
    return m.group(1).decode("ascii"), m.group(2).decode("latin-1"), version


def _fields(lines: list[bytes]) -> list[tuple[str, str]]:
    if len(lines) > MAX_FIELDS:
        raise BadHead(431, "Too many header fields.")
    out = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise _bad("obs-fold (a header line starting with whitespace) is not accepted")
        name, sep, value = line.partition(b":")
        if not sep:
            raise _bad("a header line without a colon")
        if not _TOKEN.fullmatch(name):
            raise _bad("a header name that is not a token (no whitespace before the colon)")
        value = value.strip(b" \t")
        if b"\0" in value:
            raise _bad("NUL in a header value")
        out.append((name.decode("ascii"), value.decode("latin-1")))
    return out


def _content_length(fields: list[tuple[str, str]], version: str) -> int | None:
    lengths = [v for k, v in fields if k.lower() == "content-length"]
    codings = [v for k, v in fields if k.lower() == "transfer-encoding"]
    if codings:
        if lengths:
            raise _bad("Transfer-Encoding together with Content-Length")
        if version == "HTTP/1.0":
            raise _bad("Transfer-Encoding in an HTTP/1.0 request")
        last = ",".join(codings).split(",")[-1].strip(" \t").lower()
        if last != "chunked":
            raise _bad("a Transfer-Encoding that does not end in chunked")
        raise BadHead(411, "Length required: send the body with a Content-Length (chunked bodies are not accepted).")
    if not lengths:
        return None
    if len(lengths) > 1:
        raise _bad("more than one Content-Length")
    if not _DIGITS.fullmatch(lengths[0].encode("latin-1")):
        raise _bad("Content-Length is not a decimal number")
    return int(lengths[0])


def _tokens(fields: list[tuple[str, str]], name: str) -> set[str]:
    return {t.strip(" \t").lower() for k, v in fields if k.lower() == name for t in v.split(",")}


def parse_head(raw: bytes) -> Head:
    """Parse a request head: the bytes from the request line through the empty line (CRLF CRLF)."""
    lines = _split_lines(raw)
    method, target, version = _request_line(lines[0])
    fields = _fields(lines[1:])
    hosts = sum(1 for k, _ in fields if k.lower() == "host")
    if hosts > 1 or (hosts == 0 and version == "HTTP/1.1"):
        raise _bad("an HTTP/1.1 request needs exactly one Host header")
    length = _content_length(fields, version)
    connection = _tokens(fields, "connection")
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    expect = version == "HTTP/1.1" and "100-continue" in _tokens(fields, "expect")
    return Head(method, target, version, tuple(fields), length, keep_alive, expect)
