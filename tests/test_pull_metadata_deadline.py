"""A whole metadata answer is bounded in time and size (issue 19 #4 for the metadata requests).

A read timeout bounds silence only: an endpoint that sends a metadata answer (repo info, a tree page, the
access check's HEAD, whoami) one byte every 0.3 s under HF_HUB_ETAG_TIMEOUT=1 used to hold `qtk pull` /
`qtk whoami` as long as it kept dripping, and a body that never ends was read into memory. Now each answer
must be complete within QTK_METADATA_DEADLINE seconds (head and body) and its body within
QTK_METADATA_MAX_BYTES, else exit 30 naming the host, nothing written. The server is hubtest's
ListingServer with a handler that misbehaves on one route."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from cdntest import route_of
from hubtest import ALICE, ListingHandler, start_listing_server

from qtk import errors
from qtk.hub._retry import RetryPolicy

REPO = "acme/meta"
FILES = {"config.json": b'{"model_type": "llama"}\n', "weights.bin": b"w" * 3000}
DEADLINE = 2.0
CAP = 256 * 1024
DRIP_S = 0.3


class MetaHandler(ListingHandler):
    """ListingHandler plus ``whoami`` and one scripted fault on one route (``server.fault``)."""

    def _handle(self, head: bool) -> None:
        if route_of(self.path) == "whoami":
            info = {"name": "alice", "type": "user", "orgs": [], "auth": {"accessToken": {"role": "read"}}}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        return super()._handle(head)

    def _send(self, status: int, body: bytes, headers: dict | None = None, head: bool = False) -> None:
        route, kind = self.server.fault
        if route != route_of(self.path):
            return super()._send(status, body, headers, head)
        lines = [f"HTTP/1.1 {status} OK", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        if kind == "endless":
            return self._endless(lines)
        if kind == "big":
            body = b" " * (CAP + 4096) + body  # valid JSON, just too large
        lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
        data = raw if kind == "drip_head" else raw + (b"" if head else body)
        if kind in ("drip", "slowish"):  # the head at once, then the body in pieces
            self.wfile.write(raw)
            data = b"" if head else body
        step, pause = (max(1, len(data) // 5), 0.2) if kind == "slowish" else (1, DRIP_S)
        for i in range(0, len(data), step):
            if kind != "big" and self.server.release.wait(pause):
                break
            self.wfile.write(data[i:i + step])
        self.close_connection = True

    def _endless(self, lines: list[str]) -> None:
        self.wfile.write(("\r\n".join([*lines, "Transfer-Encoding: chunked"]) + "\r\n\r\n").encode())
        piece = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
        t0 = time.monotonic()
        while not self.server.release.is_set() and time.monotonic() - t0 < 120:
            self.wfile.write(piece)


@pytest.fixture(scope="module")
def meta_server():
    srv = start_listing_server()
    srv.RequestHandlerClass = MetaHandler
    srv.release = threading.Event()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server(meta_server, monkeypatch):
    meta_server.files, meta_server.lfs, meta_server.requests = dict(FILES), set(), []
    meta_server.fault = (None, None)
    meta_server.release.clear()
    monkeypatch.setenv("HF_ENDPOINT", meta_server.url)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")  # each drip arrives well within it
    monkeypatch.setenv("QTK_METADATA_DEADLINE", str(DEADLINE))
    monkeypatch.setenv("QTK_METADATA_MAX_BYTES", str(CAP))
    # two tries with short backoff (the env is still read: only the attempts and the backoff change)
    from_env = RetryPolicy.from_env.__func__
    monkeypatch.setattr(RetryPolicy, "from_env",
                        classmethod(lambda cls, **kw: from_env(cls, **{"attempts": 2, "base_delay": 0.05, **kw})))
    yield meta_server
    meta_server.release.set()  # ends a drip still going (the code before the change)


def _within(server, limit: float, call):
    """``call()`` in a thread; still running after ``limit`` s (the bug) -> release the server, fail."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", call()), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(limit)
    took = time.monotonic() - t0
    if t.is_alive():
        server.release.set()
        t.join(120)
        pytest.fail(f"still running after {limit:.0f} s against a hostile metadata answer")
    return out["r"], took


def _written(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


HOSTILE = [
    ("info", "drip", "did not send a complete answer within 2 s"),
    ("tree", "drip", "did not send a complete answer within 2 s"),
    ("resolve", "drip_head", "did not send a complete answer within 2 s"),
    ("info", "drip_head", "did not send a complete answer within 2 s"),
    ("tree", "big", f"sent an answer larger than {CAP:,} bytes (declared"),
    ("info", "endless", f"sent an answer larger than {CAP:,} bytes (kept sending)"),
    ("tree", "endless", f"sent an answer larger than {CAP:,} bytes (kept sending)"),
]


@pytest.mark.parametrize("mode", ["cache", "local-dir"])
@pytest.mark.parametrize("route,kind,message", HOSTILE, ids=[f"{r}-{k}" for r, k, _ in HOSTILE])
def test_a_hostile_metadata_answer_fails_in_bounded_time_and_writes_nothing(server, qtk, tmp_path, mode,
                                                                            route, kind, message):
    server.fault = (route, kind)
    local = tmp_path / "local"
    args = ["pull", REPO] + (["--local-dir", str(local)] if mode == "local-dir" else [])
    r, took = _within(server, 40, lambda: qtk(*args))
    assert r.exit_code == 30, r.stderr
    assert f"{server.url} {message}" in r.stderr, r.stderr
    assert ("QTK_METADATA_DEADLINE" if "within" in message else "QTK_METADATA_MAX_BYTES") in r.stderr
    # two tries of at most the deadline each (+ backoff and the other requests), not the drip's length
    assert took < 2 * DEADLINE + 6, took
    tries = [p for m, p in server.requests if route_of(p) == route]
    assert len(tries) == (2 if "within" in message else 1), tries  # slow: retried like a timeout; too big: not
    assert not _written(local) if local.exists() else True
    hub = tmp_path / "hf" / "hub"
    assert not [p for p in _written(hub) if "meta" in p and not p.endswith(".lock")] if hub.exists() else True


def test_whoami_against_a_dripping_endpoint_fails_in_bounded_time(server, qtk, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    server.fault = ("whoami", "drip")
    r, took = _within(server, 40, lambda: qtk("whoami"))
    assert r.exit_code == 30, r.stderr
    assert f"{server.url} did not send a complete answer within 2 s (2 tries" in r.stderr, r.stderr
    assert ALICE not in r.stdout + r.stderr
    assert took < 2 * DEADLINE + 4, took


@pytest.mark.parametrize("route", ["info", "tree", "resolve", "whoami"])
def test_a_slowish_answer_within_the_deadline_is_fine(server, qtk, tmp_path, monkeypatch, route):
    """Five pieces 200 ms apart (1 s in all, under the 2 s deadline): each answer passes, the pull finishes."""
    monkeypatch.setenv("HF_TOKEN", ALICE)
    server.fault = (route, "slowish")
    if route == "whoami":
        r, _ = _within(server, 40, lambda: qtk("whoami"))
        assert r.exit_code == 0, r.stderr
        assert "alice" in r.stdout
        return
    r, _ = _within(server, 40, lambda: qtk("pull", REPO, "--local-dir", str(tmp_path / "local")))
    assert r.exit_code == 0, r.stderr
    assert {p: (tmp_path / "local" / p).read_bytes() for p in FILES} == FILES
    if route != "resolve":  # (resolve also carries the byte path's GETs, slowish too, and their HEADs)
        assert len([p for m, p in server.requests if route_of(p) == route]) == 1  # no retry was needed


@pytest.mark.parametrize("var,value", [("QTK_METADATA_DEADLINE", "0"), ("QTK_METADATA_DEADLINE", "inf"),
                                       ("QTK_METADATA_DEADLINE", "abc"), ("QTK_METADATA_MAX_BYTES", "1.5"),
                                       ("QTK_METADATA_MAX_BYTES", "-1"), ("QTK_METADATA_MAX_BYTES", "0"),
                                       ("QTK_METADATA_MAX_BYTES", "1e9")])
def test_a_bad_setting_is_a_usage_error(monkeypatch, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(errors.UsageError, match=var):
        RetryPolicy.from_env()


def test_defaults_and_environment(monkeypatch):
    assert (RetryPolicy.from_env().answer_deadline, RetryPolicy.from_env().answer_max_bytes) == (60.0, 64 << 20)
    monkeypatch.setenv("QTK_METADATA_DEADLINE", "2.5")
    monkeypatch.setenv("QTK_METADATA_MAX_BYTES", "1000")
    p = RetryPolicy.from_env()
    assert (p.answer_deadline, p.answer_max_bytes) == (2.5, 1000)
