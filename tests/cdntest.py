"""The Hub's download topology for tests: an endpoint that redirects LFS files to a second origin.

    topo = start_topology(root, auth=test_auth(), ttl=1.0)
    topo.endpoint.url       # HF_ENDPOINT: API, resolve (302 for LFS files), with the mirror's auth
    topo.cdn.url            # another port: GET only, signed expiring URLs, no Authorization accepted
    topo.cdn.log            # every request: method, path, query, headers, status, time
    topo.close()

The endpoint is the mirror (``FaultyHandler``) plus: a signed ``Location`` for LFS redirects (HMAC of
the path and an expiry ``ttl`` seconds ahead, configurable down to ~1 s), a request log, and
scripted faults per route (429 with ``Retry-After``, a stall, a dropped connection, a redirect, a
tree listing whose next link points to itself or to another origin). The CDN is a separate small
server, like S3/MinIO presigned URLs: HEAD is refused (403), an expired or forged signature is 403, a
request that also carries ``Authorization`` is 400; it can answer 429 (also as a rate-limit window),
404, drop, stall or trickle a body (or its head), flip a byte, ignore ``Range``, and throttle each
connection. Request logs look header names up case-insensitively. The benchmark imports this too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from hubtest import FaultyHandler, start_server

__all__ = ["Signer", "RequestLog", "Logged", "Headers",
            "CdnFaults", "EndpointFaults", "CdnServer", "Topology", "start_topology"]


class Signer:
    """Signs ``/path`` with an expiry, as a CDN's presigned URLs do (shared by endpoint and CDN)."""

    def __init__(self, ttl: float = 3600.0) -> None:
        self.ttl = ttl
        self._key = os.urandom(16)

    def _mac(self, path: str, expires: str) -> str:
        return hmac.new(self._key, f"GET\n{path}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def sign(self, url: str) -> str:
        expires = f"{time.time() + self.ttl:.3f}"
        return f"{url}?Expires={expires}&Signature={self._mac(urlsplit(url).path, expires)}"

    def problem(self, path: str, query: str) -> str | None:
        """None if the query is a valid, unexpired signature for ``path``; else why not."""
        q = parse_qs(query)
        expires, sig = q.get("Expires", [""])[0], q.get("Signature", [""])[0]
        if not expires or not sig:
            return "Request is not signed"
        if not hmac.compare_digest(sig, self._mac(path, expires)):
            return "SignatureDoesNotMatch"
        if float(expires) < time.time():
            return "Request has expired"
        return None


class Headers(dict):
    """A request's headers as sent (name spelling kept), looked up case-insensitively: httpx sends
    ``authorization``, urllib3 ``Authorization``; a check for one must see the other."""

    def _key(self, name: object) -> object:
        if isinstance(name, str):
            for k in self.keys():
                if k.lower() == name.lower():
                    return k
        return name

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, self._key(name))

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, self._key(name))

    def get(self, name: str, default=None):
        return dict.get(self, self._key(name), default)


@dataclass
class Logged:
    t: float  # time.monotonic() when the request line arrived
    method: str
    path: str
    query: str
    headers: Headers
    client_port: int
    status: int = 0


class RequestLog:
    def __init__(self) -> None:
        self.entries: list[Logged] = []
        self._mu = threading.Lock()

    def add(self, handler: BaseHTTPRequestHandler) -> Logged:
        url = urlsplit(handler.path)
        entry = Logged(time.monotonic(), handler.command, url.path, url.query, Headers(handler.headers.items()),
                       handler.client_address[1])
        with self._mu:
            self.entries.append(entry)
        return entry

    def __iter__(self):
        with self._mu:
            return iter(list(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        with self._mu:
            self.entries.clear()


def _take(mu: threading.Lock, table: dict[str, int], key: str) -> bool:
    with mu:
        if table.get(key, 0) > 0:
            table[key] -= 1
            return True
    return False


# --------------------------------------------------------------------------------------- endpoint


@dataclass
class EndpointFaults:
    """Per route (``info``, ``tree``, ``resolve``, ``whoami``): how many requests get each fault."""

    too_many: dict[str, int] = field(default_factory=dict)  # 429 with Retry-After
    retry_after: str = "1"
    stall: dict[str, int] = field(default_factory=dict)  # no answer for stall_s
    stall_s: float = 30.0
    drop: dict[str, int] = field(default_factory=dict)  # connection closed without an answer
    tree_self_link: bool = False  # every tree page says its next page is itself
    tree_next_url: str | None = None  # every tree page says its next page is this URL (another origin...)
    redirect: dict[str, str] = field(default_factory=dict)  # route -> URL every request is redirected to (302)
    ignore_range: bool = False  # files the endpoint serves itself come whole (200) whatever the Range
    mu: threading.Lock = field(default_factory=threading.Lock)


def route_of(path: str) -> str:
    segs = urlsplit(path).path.split("/")
    if segs[1:3] == ["api", "whoami-v2"]:
        return "whoami"
    if len(segs) > 1 and segs[1] == "api":
        return "tree" if "tree" in segs[4:6] else "info"
    return "resolve" if "resolve" in segs else "other"


class EndpointHandler(FaultyHandler):
    """The mirror, signing its LFS redirects for the CDN, logging and misbehaving on request."""

    def _dispatch(self, head: bool) -> None:
        srv = self.server
        srv.log.add(self)
        f: EndpointFaults = srv.endpoint_faults
        route = route_of(self.path)
        if _take(f.mu, f.drop, route):
            return self.reset_connection()
        if _take(f.mu, f.stall, route):
            srv.stall_release.wait(f.stall_s)
            return self.reset_connection()
        if _take(f.mu, f.too_many, route):
            self.send_response(429)
            self.send_header("Retry-After", f.retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if route in f.redirect:
            self.send_response(302)
            self.send_header("Location", f.redirect[route])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if f.ignore_range and "Range" in self.headers:
            del self.headers["Range"]
        return super()._dispatch(head)

    def send_header(self, keyword: str, value: str) -> None:
        srv = self.server
        if keyword.lower() == "location" and srv.signer is not None and value.startswith(srv.lfs_redirect_base or "\0"):
            value = srv.signer.sign(value)
        super().send_header(keyword, value)

    def _send_json(self, obj, extra_headers=None):
        f: EndpointFaults = self.server.endpoint_faults
        if f.tree_self_link and route_of(self.path) == "tree":
            host = self.headers.get("Host") or "%s:%d" % self.server.server_address[:2]
            extra_headers = {**(extra_headers or {}), "Link": f'<http://{host}{self.path}>; rel="next"'}
        if f.tree_next_url and route_of(self.path) == "tree":
            extra_headers = {**(extra_headers or {}), "Link": f'<{f.tree_next_url}>; rel="next"'}
        super()._send_json(obj, extra_headers)


# -------------------------------------------------------------------------------------------- CDN


@dataclass
class CdnFaults:
    throttle_bps: float = 0.0  # per connection
    too_many: int = 0  # next GETs answered 429 + Retry-After
    retry_after: str = "1"
    rate_window_s: float = 0.0  # >0: the next GET opens a window of this length; every GET in it gets 429
    missing: int = 0  # next GETs answered 404 NoSuchKey
    drops: int = 0  # next bodies cut (TCP reset) after drop_after bytes
    drop_after: int = 256 * 1024
    stalls: int = 0  # next bodies stop after drop_after bytes for stall_s, then the connection closes
    stall_s: float = 30.0
    corrupt: int = 0  # next responses carrying corrupt_offset get that byte flipped
    corrupt_offset: int = 12345
    ignore_range: bool = False  # answer 200 with the whole file to every Range request
    drips: int = 0  # next responses trickle their body one byte every drip_s (until stall_release)
    drip_head: bool = False  # ... and their status line and headers too
    drip_s: float = 1.5
    head_status: int = 403  # S3 presigned GET URLs refuse HEAD (403); some servers say 405
    mu: threading.Lock = field(default_factory=threading.Lock)
    _window_until: float = 0.0
    _window_used: bool = False

    def take(self, name: str) -> bool:
        with self.mu:
            n = getattr(self, name)
            if n > 0:
                setattr(self, name, n - 1)
                return True
        return False

    def rate_limited(self) -> float | None:
        """Seconds left in the rate-limit window (opening it on first use), or None."""
        with self.mu:
            now = time.monotonic()
            if self.rate_window_s > 0 and not self._window_used:
                self._window_used = True
                self._window_until = now + self.rate_window_s
            left = self._window_until - now
            return left if left > 0 else None


class CdnHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: "CdnServer"

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _answer(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
        self.entry.status = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        srv, f = self.server, self.server.faults
        self.entry = srv.log.add(self)
        url = urlsplit(self.path)
        try:
            if self.command != "GET":
                return self._answer(f.head_status, "AccessDenied", "This URL is presigned for GET only")
            if "Authorization" in self.headers:
                return self._answer(400, "InvalidArgument", "Only one auth mechanism allowed")
            why = srv.signer.problem(url.path, url.query)
            if why:
                return self._answer(403, "AccessDenied", why)
            left = f.rate_limited()
            if left is not None:
                return self._answer(429, "SlowDown", "Rate limited", {"Retry-After": str(math.ceil(left))})
            if f.take("too_many"):
                return self._answer(429, "SlowDown", "Rate limited", {"Retry-After": f.retry_after})
            blob = srv.blob(url.path.strip("/"))
            if blob is None or f.take("missing"):
                return self._answer(404, "NoSuchKey", "The specified key does not exist.")
            self._send_blob(blob)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_blob(self, blob: Path) -> None:
        srv, f = self.server, self.server.faults
        size = blob.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range", "")
        if rng.startswith("bytes=") and not f.ignore_range:
            first, _, last = rng[6:].partition("-")
            if first.isdigit() and int(first) < size:
                start, end, status = int(first), min(int(last) if last.isdigit() else size - 1, size - 1), 206
        self.entry.status = status
        length = end - start + 1
        if f.take("drips"):
            return self._drip(blob, status, start, end, size)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        drop, stall = f.take("drops"), f.take("stalls")
        corrupt = start <= f.corrupt_offset <= end and f.take("corrupt")
        t0, sent, pos = time.monotonic(), 0, start
        with open(blob, "rb") as fh:
            while pos <= end:
                if (drop or stall) and sent >= f.drop_after:
                    if stall:
                        srv.stall_release.wait(f.stall_s)
                    self._reset()
                    return
                data = bytearray(os.pread(fh.fileno(), min(256 * 1024, end + 1 - pos), pos))
                if corrupt and pos <= f.corrupt_offset < pos + len(data):
                    data[f.corrupt_offset - pos] ^= 0xFF
                self.connection.sendall(data)
                srv.count(len(data))
                pos += len(data)
                sent += len(data)
                if f.throttle_bps:
                    ahead = sent / f.throttle_bps - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)

    def _drip(self, blob: Path, status: int, start: int, end: int, size: int) -> None:
        """A server that never stalls long enough for a read timeout: one byte every ``drip_s`` (the head
        too with ``drip_head``), until the client goes away or the test releases it."""
        srv, f = self.server, self.server.faults
        head = [f"HTTP/1.1 {status} {'Partial Content' if status == 206 else 'OK'}",
                "Content-Type: application/octet-stream", f"Content-Length: {end - start + 1}", "Accept-Ranges: bytes"]
        if status == 206:
            head.append(f"Content-Range: bytes {start}-{end}/{size}")
        head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode()
        if not f.drip_head:
            self.connection.sendall(head_bytes)
            head_bytes = b""
        with open(blob, "rb") as fh:
            data = head_bytes + os.pread(fh.fileno(), end - start + 1, start)
        for i in range(len(data)):
            if srv.stall_release.wait(f.drip_s):
                break
            self.connection.sendall(data[i:i + 1])
        self._reset()

    def _reset(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()


class CdnServer(ThreadingHTTPServer):
    """Serves ``/<sha256>`` for every file under ``root`` (indexed by content at start)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, root: Path, signer: Signer) -> None:
        self.signer = signer
        self.faults = CdnFaults()
        self.log = RequestLog()
        self.stall_release = threading.Event()
        self.bytes_sent = 0
        self._mu = threading.Lock()
        self._blobs = {_sha256(p): p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()}
        super().__init__(("127.0.0.1", 0), CdnHandler)
        threading.Thread(target=self.serve_forever, name="qtk-test-cdn", daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def handle_error(self, request, client_address) -> None:
        """A client that went away mid-answer (killed pull, closed connection) is normal here."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def blob(self, sha: str) -> Path | None:
        return self._blobs.get(sha)

    def count(self, n: int) -> None:
        with self._mu:
            self.bytes_sent += n


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Topology:
    endpoint: object  # the mirror server (FaultyServer) with .log, .endpoint_faults, .signer
    cdn: CdnServer
    signer: Signer

    def reset(self) -> None:
        """Fresh faults and empty logs (between tests sharing one topology)."""
        self.endpoint.faults = type(self.endpoint.faults)()
        self.endpoint.endpoint_faults = EndpointFaults()
        self.endpoint.log.clear()
        self.cdn.faults = CdnFaults()
        self.cdn.log.clear()
        self.cdn.stall_release.clear()
        self.endpoint.stall_release.clear()

    def close(self) -> None:
        self.cdn.stall_release.set()
        self.endpoint.stall_release.set()
        for srv in (self.cdn, self.endpoint):
            srv.shutdown()
            srv.server_close()


def start_topology(root: Path, *, auth=None, ttl: float = 3600.0, handler: type = EndpointHandler,
                   **endpoint_kw) -> Topology:
    signer = Signer(ttl)
    cdn = CdnServer(root, signer)
    endpoint = start_server(root, auth=auth, handler=handler, lfs_redirect_base=cdn.url, **endpoint_kw)
    endpoint.signer = signer
    endpoint.log = RequestLog()
    endpoint.endpoint_faults = EndpointFaults()
    endpoint.stall_release = threading.Event()
    return Topology(endpoint, cdn, signer)
