"""qtk/hub/_fetch/body.py: the one private attribute of another library on the byte path (urllib3's wrapped
http.client response). If urllib3 changes, these tests fail loudly: qtk would still work (it falls back to
urllib3's public readinto), only slower."""

from __future__ import annotations

import http.client
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3

from qtk.hub._fetch.body import body_readinto, wrapped_response

DATA = random.Random(7).randbytes(3 * 1024 * 1024 + 5)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_GET(self):  # noqa: N802
        self.server.ports.append(self.client_address[1])
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(DATA)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.ports = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(pool, server):
    return pool.request("GET", f"http://127.0.0.1:{server.server_address[1]}/x", preload_content=False,
                        decode_content=False, retries=False)


def test_urllib3_still_wraps_an_http_client_response(server):
    pool = urllib3.PoolManager()
    r = _get(pool, server)
    assert isinstance(wrapped_response(r), http.client.HTTPResponse), (
        f"urllib3 {urllib3.__version__} no longer keeps its http.client response in `_fp`: "
        "update qtk/hub/_fetch/body.py (the byte path has fallen back to urllib3's slower readinto)")
    r.release_conn()


def test_a_body_read_through_it_is_whole_and_the_connection_is_reused(server):
    pool = urllib3.PoolManager()
    server.ports.clear()
    for _ in range(2):
        r = _get(pool, server)
        readinto = body_readinto(r)
        assert readinto == wrapped_response(r).readinto  # the copy-free path, not the fallback
        buf = memoryview(bytearray(1024 * 1024))
        got = bytearray()
        while n := readinto(buf):
            got += buf[:n]
        assert bytes(got) == DATA
        r.release_conn()
    assert len(server.ports) == 2 and server.ports[0] == server.ports[1]  # one keep-alive connection


def test_without_the_attribute_it_falls_back_to_the_public_readinto():
    class Other:
        def readinto(self, b):
            return 0

    other = Other()
    assert wrapped_response(other) is None
    assert body_readinto(other) == other.readinto
