"""Test bed for the Hub side: repo builders and a mirror handler with fault knobs.

The knobs (per-connection throttle, injected connection resets, a corrupted byte, hidden files,
unsafe names) live here, not in the product CLI. The benchmark imports this module too.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from qtk.mirror.app import MirrorAuth, MirrorHandler, MirrorServer, MirrorUser, RepoPolicy
from qtk.mirror.store import MirrorStore, StoredFile, git_blob_sha1, is_lfs_name

ALICE = "hf_aliceTESTtoken0000000000000000000"  # has access to the gated and private repos
BOB = "hf_bobTESTtoken00000000000000000000000"  # valid user, no access


def write_plain_repo(root: Path, repo_id: str, files: dict[str, bytes], repo_type: str = "model") -> Path:
    base = root / "datasets" if repo_type == "dataset" else root
    d = base.joinpath(*repo_id.split("/"))
    for rel, data in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return d


def write_cache_repo(root: Path, repo_id: str, revisions: dict[str, dict[str, bytes]], refs: dict[str, str]) -> dict[str, str]:
    """An HF-cache-layout repo with several commits. ``revisions``: commit label -> files;
    ``refs``: ref name -> commit label. Returns label -> commit sha."""
    d = root / ("models--" + repo_id.replace("/", "--"))
    shas = {}
    for label, files in revisions.items():
        sha = hashlib.sha1(f"{repo_id}@{label}".encode()).hexdigest()
        shas[label] = sha
        for rel, data in files.items():
            oid = hashlib.sha256(data).hexdigest() if is_lfs_name(rel, len(data)) else git_blob_sha1(data)
            blob = d / "blobs" / oid
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = d / "snapshots" / sha / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    for ref, label in refs.items():
        (d / "refs").mkdir(parents=True, exist_ok=True)
        (d / "refs" / ref).write_text(shas[label])
    return shas


def test_auth() -> MirrorAuth:
    auth = MirrorAuth()
    auth.add_user(ALICE, MirrorUser("alice", role="read", orgs=("acme",)))
    auth.add_user(BOB, MirrorUser("bob", role="write"))
    auth.repos["acme/gated"] = RepoPolicy(gated=True, allow=frozenset({"alice"}))
    auth.repos["acme/private"] = RepoPolicy(private=True, allow=frozenset({"acme"}))
    return auth


test_auth.__test__ = False  # not a pytest test


@dataclass
class Faults:
    throttle_bps: float = 0.0  # per connection
    resets: dict[str, int] = field(default_factory=dict)  # path -> connections to reset mid-body
    reset_after: int = 1024 * 1024  # bytes into the body
    corrupt: dict[str, int] = field(default_factory=dict)  # path -> responses with one flipped byte
    corrupt_offset: int = 12345
    hide: set[str] = field(default_factory=set)  # paths that 404 on resolve
    extra_tree_entries: list[dict] = field(default_factory=list)
    auth_headers: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization)
    mu: threading.Lock = field(default_factory=threading.Lock)

    def take(self, table: dict[str, int], path: str) -> bool:
        with self.mu:
            if table.get(path, 0) > 0:
                table[path] -= 1
                return True
        return False


class FaultyHandler(MirrorHandler):
    """MirrorHandler plus the test knobs in ``server.faults``."""

    def _dispatch(self, head: bool) -> None:
        self.server.faults.auth_headers.append((self.path, self.headers.get("Authorization")))
        super()._dispatch(head)

    def _resolve(self, repo_type, segs, head):
        path = "/".join(segs[4:])
        if path in self.server.faults.hide:
            from qtk.mirror.app import _HTTPError

            raise _HTTPError(404, "EntryNotFound", f"{path} does not exist")
        super()._resolve(repo_type, segs, head)

    def _send_json(self, obj, extra_headers=None):
        if isinstance(obj, list) and self.server.faults.extra_tree_entries:
            obj = obj + self.server.faults.extra_tree_entries
        super()._send_json(obj, extra_headers)

    def send_bytes(self, fd: int, offset: int, count: int, f: StoredFile) -> None:
        faults: Faults = self.server.faults
        reset = faults.take(faults.resets, f.path)
        # only a response that carries the byte at corrupt_offset can flip it
        corrupt = offset <= faults.corrupt_offset < offset + count and faults.take(faults.corrupt, f.path)
        if not (faults.throttle_bps or reset or corrupt):
            return super().send_bytes(fd, offset, count, f)
        piece = 64 * 1024
        start_t, sent_total = time.monotonic(), 0
        while count > 0:
            n = min(piece, count)
            data = bytearray(os.pread(fd, n, offset))
            if corrupt and offset <= faults.corrupt_offset < offset + n:
                data[faults.corrupt_offset - offset] ^= 0xFF
            if reset and sent_total >= faults.reset_after:
                self.reset_connection()
                raise ConnectionResetError("injected reset")
            self.connection.sendall(data)
            self.server.count(n)
            offset += n
            count -= n
            sent_total += n
            if faults.throttle_bps:
                ahead = sent_total / faults.throttle_bps - (time.monotonic() - start_t)
                if ahead > 0:
                    time.sleep(ahead)


class FaultyServer(MirrorServer):
    def __init__(self, address, store, **kw):
        self.faults = Faults()
        super().__init__(address, store, handler=kw.pop("handler", FaultyHandler), **kw)


class CdnHandler(FaultyHandler):
    """Serves ``/<sha256>`` for any LFS blob of the store, without auth (a CDN stand-in)."""

    def _dispatch(self, head: bool) -> None:
        self.server.faults.auth_headers.append((self.path, self.headers.get("Authorization")))
        sha = self.path.strip("/").split("?")[0]
        for repo_type, repo_id in self.server.store.list_repos():
            snap = self.server.store.revision(repo_type, repo_id, None)
            for f in (snap.files.values() if snap else ()):
                if f.lfs and f.sha256 == sha:
                    return self.send_file(f, {"ETag": f'"{sha}"', "Accept-Ranges": "bytes"}, head)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


def start_server(root: Path, **kw) -> FaultyServer:
    srv = FaultyServer(("127.0.0.1", 0), MirrorStore(root), **kw)
    srv.serve_in_thread()
    return srv


# ------------------------------------------------------------------ a server that lists whatever a test says


class ListingServer(ThreadingHTTPServer):
    """A Hub stand-in whose tree listing is exactly ``files`` (hostile names included: ``.git/config``,
    ``a`` and ``a/b``, 300-byte parts...), and which serves each listed file's bytes by its listed path
    (HEAD and GET with ``Range``), so a pull that accepts a name really writes it. The mirror cannot
    play this part: it refuses such names itself.

        srv = start_listing_server()
        srv.files = {"config.json": b"{}", ".git/config": b"[core]..."}   # path -> bytes (git sha1 oids)
        srv.lfs = {"model.bin"}                                           # listed as LFS (sha256 oids)
    """

    daemon_threads = True
    allow_reuse_address = True
    commit = "c0ffee" + "0" * 34

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.lfs: set[str] = set()
        self.requests: list[tuple[str, str]] = []  # (method, decoded path)
        super().__init__(("127.0.0.1", 0), ListingHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def entry(self, path: str) -> dict:
        data = self.files[path]
        e = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if path in self.lfs:
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130}
        return e

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class ListingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ListingServer

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def _send(self, status: int, body: bytes, headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _handle(self, head: bool) -> None:
        srv = self.server
        url = urlsplit(self.path)
        segs = url.path.split("/")
        srv.requests.append((self.command, unquote(url.path)))
        if segs[1:3] == ["api", "models"] and "tree" in segs:
            listing = [srv.entry(p) for p in srv.files]
            return self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, head)
        if segs[1:3] == ["api", "models"]:
            info = {"id": "/".join(segs[3:5]), "sha": srv.commit, "private": False}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        if len(segs) > 5 and segs[3] == "resolve":
            path = "/".join(unquote(s, errors="surrogateescape") for s in segs[5:])
            if path in srv.files:
                return self._send_file(path, head)
        self._send(404, b"{}", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "no such file"}, head)

    def _send_file(self, path: str, head: bool) -> None:
        data, e = self.server.files[path], self.server.entry(path)
        headers = {"X-Repo-Commit": self.server.commit, "ETag": f'"{e["oid"]}"', "Accept-Ranges": "bytes"}
        if "lfs" in e:
            headers |= {"X-Linked-Etag": f'"{e["lfs"]["oid"]}"', "X-Linked-Size": str(len(data))}
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and not head:
            first, _, last = rng[6:].partition("-")
            start, end = int(first), min(int(last) if last else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start:end + 1], headers)
        self._send(200, data, headers, head)


def start_listing_server() -> ListingServer:
    srv = ListingServer()
    threading.Thread(target=srv.serve_forever, name="qtk-test-listing", daemon=True).start()
    return srv
