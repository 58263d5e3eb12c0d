"""`qtk serve` against slow clients: bodies dribbled one byte at a time, readers that take a 24 MB file at
64 KiB/s or not at all, one address opening many connections. Nobody anonymous may starve the others.

Deadlines are set short (1-2 s) so each behaviour shows within seconds; attackers connect from other
loopback addresses (127.0.0.x) than the normal client, as they would from other hosts.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from hubtest import write_plain_repo
from servetest import connect, raw_request

from qtk.mirror.app import MirrorServer
from qtk.mirror.server import MAX_PER_CLIENT
from qtk.mirror.store import MirrorStore

BIG = os.urandom(24 * 1024 * 1024 + 7)
PATHS_INFO = b"POST /api/models/acme/m/paths-info/main HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("slow")
    write_plain_repo(r, "acme/m", {"config.json": b'{"a": 1}\n', "big.safetensors": BIG})
    return r


def start(root, **kw) -> MirrorServer:
    store = MirrorStore(root)
    store.index_all()
    srv = MirrorServer(("127.0.0.1", 0), store, **kw)
    srv.serve_in_thread()
    return srv


def stop(srv: MirrorServer) -> None:
    srv.shutdown()
    srv.server_close()


def read_all(sock: socket.socket, limit: float = 20.0) -> bytes:
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def timed_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes, float]:
    t0 = time.monotonic()
    status, _, body = raw_request(port, path, timeout=timeout)
    return status, body, time.monotonic() - t0


class Trickle:
    """Sends one byte every ``every`` seconds on each socket (a body that never ends in time)."""

    def __init__(self, socks: list[socket.socket], every: float) -> None:
        self.socks, self.every = socks, every
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for s in self.socks:
                try:
                    s.send(b"a")
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def test_slow_body_senders_pin_no_worker_and_are_cut_at_the_total_deadline(root):
    """Item 5: 32 paths-info POSTs whose bodies trickle in (one byte per 0.5 s, each byte well within any
    per-read timeout) hold no worker: the loop reads bodies, and the whole request has ``header_timeout``."""
    srv = start(root, workers=2, header_timeout=1.5, io_timeout=30)
    port = srv.server_address[1]
    slow = [connect(port, f"127.0.0.{2 + i % 8}") for i in range(32)]
    t0 = time.monotonic()
    for s in slow:
        s.sendall(PATHS_INFO + b"Content-Length: 1000\r\n\r\npaths=")
    trickle = Trickle(slow, 0.5)
    try:
        status, body, took = timed_get(port, "/acme/m/resolve/main/config.json")
        assert (status, body) == (200, b'{"a": 1}\n') and took < 2.0, took
        answers = [read_all(s) for s in slow]
        cut_after = time.monotonic() - t0
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:200]
        assert cut_after < 1.5 + 2.5, cut_after  # the total deadline, not reset by each byte
    finally:
        trickle.stop()
        for s in slow:
            s.close()
        stop(srv)


def test_a_body_within_the_deadline_is_read_by_the_loop(root):
    srv = start(root, workers=1, header_timeout=5)
    try:
        with connect(srv.server_address[1]) as s:
            body = b"paths=config.json&paths=big.safetensors"
            s.sendall(PATHS_INFO + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
            for i in range(0, len(body), 8):  # in pieces, 0.1 s apart
                time.sleep(0.1)
                s.sendall(body[i:i + 8])
            data = read_all(s)
        assert data.startswith(b"HTTP/1.1 200") and b'"path": "big.safetensors"' in data
    finally:
        stop(srv)


class SlowReaders:
    """``n`` connections that each GET the big file and read it at ``rate`` bytes/s (0: never read)."""

    def __init__(self, port: int, n: int, rate: float, path: str = "/acme/m/resolve/main/big.safetensors") -> None:
        self.socks = []
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # before connect: a small window
            s.bind((f"127.0.0.{2 + i % 8}", 0))
            s.connect(("127.0.0.1", port))
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            self.socks.append(s)
        self.got = [bytearray() for _ in self.socks]
        self.rate = rate
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        if rate:
            self._t.start()

    def _run(self) -> None:
        tick = 0.1
        for s in self.socks:
            s.setblocking(False)
        while not self._stop.wait(tick):
            for s, buf in zip(self.socks, self.got):
                try:
                    buf += s.recv(int(self.rate * tick))
                except (BlockingIOError, OSError):
                    pass

    def stop(self) -> None:
        self._stop.set()
        if self.rate:
            self._t.join()
        for s in self.socks:
            s.close()


def test_slow_readers_pin_no_worker(root):
    """Item 6: 32 clients reading the 24 MB file at 64 KiB/s (and 8 that stopped reading) cost no worker:
    the loop writes bodies. A normal client pulls the same file meanwhile at full speed."""
    srv = start(root, workers=2, io_timeout=30)
    port = srv.server_address[1]
    alone = timed_get(port, "/acme/m/resolve/main/big.safetensors", timeout=30)
    readers = SlowReaders(port, 32, 64 * 1024)
    stalled = SlowReaders(port, 8, 0)
    try:
        time.sleep(1.0)
        status, body, took = timed_get(port, "/acme/m/resolve/main/big.safetensors", timeout=10)
        assert status == 200 and body == BIG
        assert took < max(3.0, 5 * alone[2]), (took, alone[2])
        small = timed_get(port, "/acme/m/resolve/main/config.json")
        assert small[0] == 200 and small[2] < 1.0, small
        for buf in readers.got:  # the slow readers did get their bytes, and the right ones
            head, _, data = bytes(buf).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and len(data) > 16384 and data == BIG[: len(data)]
    finally:
        readers.stop()
        stalled.stop()
        stop(srv)


def test_a_reader_below_the_minimum_rate_is_cut(root):
    srv = start(root, workers=1, io_timeout=1.0)
    port = srv.server_address[1]
    readers = SlowReaders(port, 1, 2048)  # 2 KiB/s, under the 8 KiB/s floor
    try:
        deadline = time.monotonic() + 10
        # first the connection is accepted and bytes flow (open_connections is 0 before accept too)
        while not readers.got[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        while srv.open_connections and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.open_connections == 0  # cut after an I/O-timeout window below the floor
        assert 0 < len(readers.got[0]) < len(BIG)
    finally:
        readers.stop()
        stop(srv)


def test_connections_per_client_address_are_bounded(root):
    """Item 6: one address holds at most ``max_per_client`` connections (503 + Retry-After past it); other
    addresses are served; a closed connection frees its place."""
    assert MAX_PER_CLIENT == 128
    srv = start(root, max_per_client=4)
    port = srv.server_address[1]
    held = [connect(port, "127.0.0.9") for _ in range(4)]
    try:
        deadline = time.monotonic() + 10
        while srv.open_connections < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        with connect(port, "127.0.0.9") as fifth:
            refused = read_all(fifth)
        assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After: " in refused and b"your address" in refused
        assert raw_request(port, "/acme/m/resolve/main/config.json")[0] == 200  # 127.0.0.1: another client
        held.pop().close()
        deadline = time.monotonic() + 10
        while srv.open_connections >= 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        with connect(port, "127.0.0.9") as again:
            again.sendall(b"GET /acme/m/resolve/main/config.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert read_all(again).startswith(b"HTTP/1.1 200")
        assert srv.rejected_per_client == 1
    finally:
        for s in held:
            s.close()
        stop(srv)


def test_trusted_proxies_are_not_bounded_per_address(root):
    srv = start(root, max_per_client=2, trusted_proxies=["127.0.0.10/32"])
    port = srv.server_address[1]
    socks = [connect(port, "127.0.0.10") for _ in range(5)]
    try:
        for s in socks:
            s.sendall(b"GET /acme/m/resolve/main/config.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert all(read_all(s).startswith(b"HTTP/1.1 200") for s in socks)
        assert srv.rejected_per_client == 0
    finally:
        for s in socks:
            s.close()
        stop(srv)


def test_answers_past_the_buffer_budget_are_written_by_the_worker(root):
    """With (almost) no room for buffered answers, every answer still arrives whole (the worker writes it)."""
    srv = start(root, max_buffered=16, tree_page_size=1)
    port = srv.server_address[1]
    try:
        status, hdrs, body = raw_request(port, "/api/models/acme/m/tree/main")
        assert status == 200 and [e["path"] for e in json.loads(body)] == ["big.safetensors"] and "Link" in hdrs
        assert raw_request(port, "/acme/m/resolve/main/big.safetensors", timeout=30)[2] == BIG
        assert srv._buffered == 0
    finally:
        stop(srv)


def test_serve_cli_documents_the_per_client_bound(qtk):
    r = qtk("serve", "--help")
    assert "--max-per-client" in r.stdout and str(MAX_PER_CLIENT) in r.stdout
