"""`qtk serve`'s request-head parser (qtk/mirror/http1.py): a table of heads, and hypothesis properties.

* on the parser alone: whatever the bytes, it raises :class:`BadHead` or returns a head whose framing
  has exactly one reading (one ``Content-Length`` of ASCII digits, no ``Transfer-Encoding``, token names,
  no CR/LF/NUL in values, one ``Host`` in HTTP/1.1); never another exception;
* on the real server over a real socket: one generated request (a head with hostile framing, line
  endings and fields, then a body that carries a second, smuggled request for a guarded file, and
  random bytes) gets exactly one answer; never a 500, never bytes of a file the client may not read.
"""

from __future__ import annotations

import socket

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hubtest import start_server  # noqa: E402
from servetest import SECRETS, build_hostile_store, parse_responses  # noqa: E402

from qtk.mirror.app import load_auth  # noqa: E402
from qtk.mirror.http1 import BadHead, parse_head  # noqa: E402

PARSER_TABLE = [  # (head, status or None when accepted)
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"GET / HTTP/1.0\r\n\r\n", None),  # HTTP/1.0 needs no Host
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\tfolded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\rY: z\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(101)) + b"Host: x\r\n\r\n", 431),
    (b"GET / HTTP/0.9\r\nHost: x\r\n\r\n", 505),
    (b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n", 400),
    (b"G\xc3\x89T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
]


@pytest.mark.parametrize("head,status", PARSER_TABLE, ids=[str(i) for i in range(len(PARSER_TABLE))])
def test_head_parser_table(head, status):
    if status is None:
        parsed = parse_head(head)
        assert parsed.method == "GET" and parsed.target == "/"
        return
    with pytest.raises(BadHead) as info:
        parse_head(head)
    assert info.value.status == status


def test_head_parser_reads_keep_alive_and_expect():
    h = parse_head(b"POST /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Length: 0012\r\n\r\n")
    assert (h.keep_alive, h.expect_continue, h.content_length) == (False, True, 12)
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not parse_head(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-Y:  a b \t\r\n\r\n").get("x-y") == "a b"


# -- generated heads ------------------------------------------------------------------------------------

GUARDED = [b"/acme/internal/resolve/main/secret.txt", b"/acme/gated/resolve/main/weights.bin",
           b"/datasets/foo/secret/resolve/main/data.txt", b"/acme/public/resolve/main/access.toml",
           b"/api/models/acme/internal/paths-info/main", b"/acme/internal/resolve/main/..%2Fsecret.txt"]
PUBLIC = [b"/acme/public/resolve/main/config.json", b"/api/models/acme/public/paths-info/main",
          b"/api/models/acme/public", b"/acme/public/resolve/main/model.safetensors", b"*", b"/"]
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"G\x00T", b"get"]
VERSIONS = [b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b"HTTP/1.10", b"HTTP/0.9"]
SEPARATORS = [b": "] * 6 + [b":", b" : ", b":\t", b"\t:", b" :"]
ENDINGS = [b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n", b"\n\r"]
NAMES = [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Transfer-Encoding", b"Host", b"Expect",
         b"Connection", b"Range", b"If-None-Match", b"If-Range", b"Authorization", b"Content-Type", b"X-Fuzz",
         b"Content Length", b"Transfer_Encoding", b"Host\x00", b""]
VALUES = [b"0", b"5", b"chunked", b"Chunked", b" chunked", b"chunked, identity", b"identity", b"100-continue",
          b"close", b"keep-alive", b"bytes=\xb2-", b"bytes=0-1", b"*", b'"x"', b"Bearer hf_unknown",
          b"application/json", b"x", b"", b"\x0bchunked", b"1_0", b"+5", b"\xd9\xa1"]
no_crlf = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def _framing(n: int, variant: int, other: int) -> list[tuple[bytes, bytes]]:
    """Header fields that announce a body of ``n`` bytes, in one of many spellings (``n`` is the truth
    in at least one of them): a server reads exactly ``n`` bytes, or refuses the head."""
    cl = str(n).encode()
    return [
        [(b"Content-Length", cl)],
        [(b"Content-Length", b"00" + cl)],
        [(b"Content-Length", cl + b", " + cl)],
        [(b"Content-Length", cl), (b"Content-Length", cl)],
        [(b"Content-Length", cl), (b"Content-Length", str(other).encode())],
        [(b"Content-Length", str(other).encode()), (b"Content-Length", cl)],
        [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", cl)],
        [(b"Content-Length", cl), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"chunked")],
        [(b"Content-Length", b"+" + cl)],
        [(b"content-length", cl + b" ")],
        [(b"Content-Length", cl + b"\x00")],
    ][variant]


BENIGN = [(b"Connection", b"keep-alive"), (b"Connection", b"close"), (b"Range", b"bytes=0-1"), (b"If-None-Match", b'"x"'),
          (b"Authorization", b"Bearer hf_unknown"), (b"Content-Type", b"application/x-www-form-urlencoded"),
          (b"Content-Type", b"application/json"), (b"Expect", b"100-continue"), (b"Accept", b"*/*")]


@st.composite
def one_request(draw) -> tuple[bytes, bytes]:
    """(bytes on the wire, method): one request; its body holds a complete request for a guarded file.
    Half are well-formed (the server must read the body as a body), half hostile in every part."""
    clean = draw(st.booleans())
    method = draw(st.sampled_from(METHODS[:3] if clean else METHODS))
    target = draw(st.sampled_from(GUARDED + PUBLIC))
    body = b"GET " + draw(st.sampled_from(GUARDED)) + b" HTTP/1.1\r\nHost: x\r\n\r\n" + draw(no_crlf)
    fields = [(b"Host", b"x")] if clean or draw(st.integers(0, 9)) else []
    variant = draw(st.sampled_from([0, 1, 10]) if clean else st.integers(0, 11))
    fields += _framing(len(body), variant, draw(st.integers(0, 2 * len(body))))
    extra = st.sampled_from(BENIGN) if clean else st.tuples(st.sampled_from(NAMES), st.one_of(st.sampled_from(VALUES), no_crlf))
    fields += draw(st.lists(extra, max_size=4))
    order = draw(st.permutations(range(len(fields))))
    lines = [method + b" " + target + b" " + (b"HTTP/1.1" if clean else draw(st.sampled_from(VERSIONS)))]
    for i in order:
        name, value = fields[i]
        lines.append(name + (b": " if clean else draw(st.sampled_from(SEPARATORS))) + value)
    if not clean and draw(st.booleans()):  # an obs-fold or a line without a colon somewhere
        lines.insert(draw(st.integers(1, len(lines))), draw(st.sampled_from([b" folded", b"\tContent-Length: 0", b"NoColon"])))
    head = b"".join(line + (b"\r\n" if clean else draw(st.sampled_from(ENDINGS))) for line in lines) + b"\r\n"
    return head + body, method


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root, access = build_hostile_store(tmp_path_factory.mktemp("httpprop"))
    srv = start_server(root, auth=load_auth(access), header_timeout=5)
    yield srv
    srv.shutdown()
    srv.server_close()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=one_request())
def test_one_request_one_answer_never_a_500_or_a_guarded_byte(hostile, request):
    wire, method = request
    before = hostile.errors_500
    data = _exchange(hostile.server_address[1], wire)
    for marker in SECRETS:
        assert marker not in data, (wire, marker)
    answers = parse_responses(data, "HEAD" if method == b"HEAD" else "GET")
    assert len(answers) == 1, ([a[0] for a in answers], wire)
    assert answers[0][0] != 500 and hostile.errors_500 == before, wire


@settings(max_examples=1000, deadline=None)
@given(request=one_request(), junk=st.binary(max_size=40), at=st.integers(0, 400))
def test_parser_refuses_or_reads_one_framing(request, junk, at):
    wire, _ = request
    head = wire[: wire.index(b"\r\n\r\n")] if b"\r\n\r\n" in wire else wire
    raw = head[:at] + junk + head[at:] + b"\r\n\r\n"
    raw = raw[: raw.index(b"\r\n\r\n") + 4]  # what the server hands the parser: up to the first empty line
    try:
        head = parse_head(raw)
    except BadHead as exc:
        assert exc.status in (400, 411, 431, 505)
        return
    lengths = [v for k, v in head.fields if k.lower() == "content-length"]
    assert not [k for k, _ in head.fields if k.lower() == "transfer-encoding"]
    assert len(lengths) <= 1
    assert head.content_length == (int(lengths[0]) if lengths else None)
    if lengths:
        assert lengths[0].isascii() and lengths[0].isdigit()
    for name, value in head.fields:
        assert name and " " not in name and ":" not in name
        assert not any(c in value for c in "\r\n\0")
    if head.version == "HTTP/1.1":
        assert sum(1 for k, _ in head.fields if k.lower() == "host") == 1
