"""`qtk serve`'s server under abuse (idle and slow connections, a full pool, too many connections), TLS,
trusted proxies, and the real clients (huggingface_hub, transformers) through it, gated and private.

No timing assertions: the deadlines here are set short so the behaviour shows within the test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

from hubtest import ALICE, BOB, write_plain_repo
from servetest import connect, raw_request

from qtk.mirror.app import MirrorAuth, MirrorHandler, MirrorServer, MirrorUser, RepoPolicy
from qtk.mirror.service import tls_context
from qtk.mirror.store import MirrorStore

BIG = os.urandom(24 * 1024 * 1024 + 5)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("srv")
    write_plain_repo(r, "acme/m", {"config.json": b'{"a": 1}\n', "big.safetensors": BIG,
                                   "sub/x.txt": b"x\n", **{f"p{i}.json": b"{}" for i in range(5)}})
    return r


def start(root, **kw) -> MirrorServer:
    store = MirrorStore(root)
    store.index_all()
    srv = MirrorServer(("127.0.0.1", 0), store, **kw)
    srv.serve_in_thread()
    return srv


def stop(srv):
    srv.shutdown()
    srv.server_close()


def read_until_closed(sock: socket.socket, limit: float = 30.0) -> bytes:
    sock.settimeout(limit)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slowloris_connections_cost_no_worker_and_are_cut(root):
    srv = start(root, workers=2, header_timeout=1.5)
    port = srv.server_address[1]
    slow = []
    try:
        for i in range(100):  # 50x the workers, each holding a request head open (from 4 other addresses)
            s = connect(port, f"127.0.0.{2 + i % 4}")
            s.sendall(b"GET /acme/m/resolve/main/config.json HTTP/1.1\r\nHost: x\r\nX-a: ")
            slow.append(s)
        status, _, body = raw_request(port, "/acme/m/resolve/main/config.json")
        assert (status, body) == (200, b'{"a": 1}\n')  # a normal client is served beside them
        answers = [read_until_closed(s) for s in slow[:5]]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers[0][:200]
    finally:
        for s in slow:
            s.close()
        stop(srv)


def test_idle_keepalive_is_closed_and_a_dribbling_head_is_cut(root):
    srv = start(root, idle_timeout=1.0, header_timeout=1.0)
    port = srv.server_address[1]
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"GET /api/models/acme/m HTTP/1.1\r\nHost: x\r\n\r\n")
            data = read_until_closed(s)  # answered, then closed for idleness
            assert data.startswith(b"HTTP/1.1 200") and b'"id": "acme/m"' in data
        with socket.create_connection(("127.0.0.1", port)) as s:
            for _ in range(6):  # one byte every 0.3 s: the head never completes in time
                try:
                    s.sendall(b"G")
                except OSError:
                    break
                time.sleep(0.3)
            assert read_until_closed(s).startswith(b"HTTP/1.1 408")
    finally:
        stop(srv)


class HeldHandler(MirrorHandler):
    """Holds its worker while the server's ``hold`` event is clear, for requests of ``/hold/...``."""

    def _dispatch(self, head: bool) -> None:
        if self.path.startswith("/hold/"):
            self.server.hold.wait(30)
            self.path = self.path[len("/hold"):]
        super()._dispatch(head)


def test_full_pool_answers_503_with_retry_after(root):
    srv = start(root, workers=1, max_pending=1, handler=HeldHandler)
    srv.hold = threading.Event()
    port = srv.server_address[1]
    hog = socket.create_connection(("127.0.0.1", port))
    queued = socket.create_connection(("127.0.0.1", port))
    try:
        hog.sendall(b"GET /hold/acme/m/resolve/main/config.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.5)  # the only worker is held
        queued.sendall(b"GET /acme/m/resolve/main/config.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.5)  # ... and the one pending place taken
        status, hdrs, body = raw_request(port, "/acme/m/resolve/main/config.json")
        assert status == 503 and hdrs["Retry-After"] and hdrs["X-Error-Code"] == "ServiceUnavailable"
        srv.hold.set()  # the worker is freed and takes the queued request
        assert read_until_closed(hog).startswith(b"HTTP/1.1 200")
        assert read_until_closed(queued).startswith(b"HTTP/1.1 200")
        assert srv.rejected_busy >= 1
    finally:
        srv.hold.set()
        hog.close()
        queued.close()
        stop(srv)


def test_a_client_that_reads_too_slowly_is_cut(root):
    srv = start(root, workers=1, io_timeout=1.0)
    port = srv.server_address[1]
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    got, stop_reading = [0], threading.Event()

    def trickle():  # ~2 KiB/s, under the 8 KiB/s floor, while holding the only worker
        s.settimeout(5)
        while not stop_reading.wait(0.25):
            try:
                chunk = s.recv(512)
            except OSError:
                return
            if not chunk:
                return
            got[0] += len(chunk)

    t = threading.Thread(target=trickle, daemon=True)
    try:
        s.sendall(b"GET /acme/m/resolve/main/big.safetensors HTTP/1.1\r\nHost: x\r\n\r\n")
        t.start()
        time.sleep(0.5)
        # the only worker is freed by the cut: a second client is answered while the slow one still reads
        assert raw_request(port, "/acme/m/resolve/main/config.json", timeout=60)[0] == 200
        assert got[0] < len(BIG)
    finally:
        stop_reading.set()
        t.join()
        s.close()
        stop(srv)


def test_connection_limit_answers_503(root):
    srv = start(root, max_connections=16)
    port = srv.server_address[1]
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
    try:
        deadline = time.monotonic() + 10
        while srv.open_connections < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, hdrs, _ = raw_request(port, "/api/models/acme/m")
        assert status == 503 and "Retry-After" in hdrs
        held.pop().close()
        deadline = time.monotonic() + 10
        while srv.open_connections >= 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert raw_request(port, "/api/models/acme/m")[0] == 200
    finally:
        for s in held:
            s.close()
        stop(srv)


def test_keepalive_and_pipelined_requests(root):
    srv = start(root)
    try:
        with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=10) as s:
            req = b"GET /acme/m/resolve/main/sub/x.txt HTTP/1.1\r\nHost: x\r\n\r\n"
            s.sendall(req * 3 + b"GET /acme/m/resolve/main/sub/x.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = read_until_closed(s)
        assert data.count(b"HTTP/1.1 200 OK") == 4 and data.count(b"\r\n\r\nx\n") == 4
    finally:
        stop(srv)


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not available")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
                    "-out", str(d / "cert.pem"), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


def test_tls(root, cert):
    import http.client

    srv = start(root, ssl_context=tls_context(*cert))
    assert srv.url.startswith("https://")
    port = srv.server_address[1]
    ctx = ssl.create_default_context(cafile=str(cert[0]))
    try:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
        conn.request("GET", "/api/models/acme/m")
        assert json.loads(conn.getresponse().read())["id"] == "acme/m"
        conn.request("GET", "/acme/m/resolve/main/big.safetensors", headers={"Range": "bytes=100-"})
        r = conn.getresponse()
        assert r.status == 206 and r.read() == BIG[100:]  # same connection, kept alive
        conn.close()
        with socket.create_connection(("127.0.0.1", port)) as s:  # plain HTTP to the TLS port: closed
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert not read_until_closed(s).startswith(b"HTTP/1.1 200")
            except ConnectionResetError:
                pass
        # ... and the server goes on
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=20)
        conn.request("HEAD", "/acme/m/resolve/main/config.json")
        assert conn.getresponse().status == 200
    finally:
        stop(srv)


def test_forwarded_headers_only_from_trusted_proxies(root):
    for trusted, want in ((["127.0.0.0/8"], "https://models.example.org"), ([], None)):
        srv = start(root, trusted_proxies=trusted, tree_page_size=2)
        try:
            _, hdrs, _ = raw_request(srv.server_address[1], "/api/models/acme/m/tree/main",
                                     headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "models.example.org"})
            link = hdrs["Link"]
            if want:
                assert link.startswith(f"<{want}/api/models/acme/m/tree/")
            else:
                assert link.startswith(f"<http://127.0.0.1:{srv.server_address[1]}/")
        finally:
            stop(srv)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Gated and private repos (one loadable by transformers) behind an access policy."""
    from conftest import tiny_llama_files

    r = tmp_path_factory.mktemp("guarded")
    write_plain_repo(r, "acme/gated", {"config.json": b'{"g": 1}\n', "model.safetensors": os.urandom(300_000)})
    try:
        write_plain_repo(r, "acme/secret-llama", tiny_llama_files())
    except pytest.skip.Exception:
        write_plain_repo(r, "acme/secret-llama", {"config.json": b"{}"})
    auth = MirrorAuth()
    auth.add_user(ALICE, MirrorUser("alice", orgs=("acme",)))
    auth.add_user(BOB, MirrorUser("bob"))
    auth.repos["acme/gated"] = RepoPolicy(gated=True, allow=frozenset({"alice"}))
    auth.repos["Acme/Secret-Llama"] = RepoPolicy(private=True, allow=frozenset({"acme"}))
    srv = start(r, auth=auth)
    yield srv, r
    stop(srv)


def test_huggingface_hub_snapshot_download_gated_and_private(guarded, tmp_path):
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    srv, r = guarded
    for repo in ("acme/gated", "acme/secret-llama"):
        p = snapshot_download(repo, cache_dir=tmp_path / "c", endpoint=srv.url, token=ALICE)
        for f in (r / repo).rglob("*"):
            if f.is_file():
                assert (tmp_path / "c" / p / f.relative_to(r / repo)).read_bytes() == f.read_bytes()
    with pytest.raises(GatedRepoError):
        snapshot_download("acme/gated", cache_dir=tmp_path / "d", endpoint=srv.url, token=BOB)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("acme/secret-llama", cache_dir=tmp_path / "e", endpoint=srv.url, token=BOB)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("ACME/SECRET-LLAMA", cache_dir=tmp_path / "f", endpoint=srv.url, token=False)


def test_huggingface_hub_paths_info(guarded):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    srv, r = guarded
    (info,) = HfApi(endpoint=srv.url, token=ALICE).get_paths_info("acme/secret-llama", ["config.json", "missing"])
    assert info.path == "config.json" and info.size == (r / "acme/secret-llama/config.json").stat().st_size
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=srv.url, token=BOB).get_paths_info("acme/secret-llama", ["config.json"])


@pytest.mark.slow
def test_transformers_from_pretrained_private_through_the_mirror(guarded, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    srv, r = guarded
    if not (r / "acme/secret-llama/model.safetensors").exists():
        pytest.skip("safetensors not installed")
    code = (
        "from transformers import AutoModelForCausalLM; import torch;"
        f"m = AutoModelForCausalLM.from_pretrained('acme/secret-llama', token={ALICE!r});"
        "print(m.config.num_hidden_layers, tuple(m(torch.tensor([[1, 2, 3]])).logits.shape))"
    )
    env = {**os.environ, "HF_ENDPOINT": srv.url, "HF_HUB_CACHE": str(tmp_path / "c"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["2", "(1,", "3,", "256)"]
