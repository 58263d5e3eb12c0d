"""The HTTP server under ``qtk serve``: one event loop reads request headers, a fixed pool of workers answers.

Why not ``ThreadingHTTPServer``: it starts one thread per connection and never times out, so idle or
slow ("slowloris") connections pin threads without bound. Why not a server library: the mirror's bulk
path is ``sendfile`` from a worker on a blocking socket (zero copies, measured at loopback speed); the
maintained pure-Python WSGI servers (waitress, gunicorn's gthread) copy file bodies through Python buffers,
and the ASGI ones would need the whole handler rewritten around an event loop. The few rules that make a
threaded server hold up under abuse fit in this module:

* **no thread until a request is complete**: the event loop (``selectors``) accepts connections, does the
  TLS handshake and collects bytes until the blank line that ends the request head. A connection that
  dribbles bytes costs a socket and a few KiB, never a worker;
* **deadlines**: the head must be complete within ``header_timeout`` seconds of the connection (or of the
  previous response) being ready (408 then close); a kept-alive connection idle for ``idle_timeout`` is
  closed; a worker's reads and writes time out after ``io_timeout`` seconds each;
* **bounds**: ``workers`` threads (fixed), at most ``max_pending`` complete requests waiting for one,
  at most ``max_connections`` open connections. Past a bound the loop answers ``503`` with
  ``Retry-After`` and closes, without blocking;
* request heads are capped at ``max_header_bytes`` (431).

A handler class gets ``(connection, server, head bytes)``; after its response the connection returns to
the loop for the next request (keep-alive) or is closed.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import queue
import resource
import selectors
import socket
import socketserver
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler

__all__ = ["PooledHTTPServer", "PooledRequestHandler", "Connection"]

log = logging.getLogger("qtk.mirror")

_HEAD_END = b"\r\n\r\n"
LINGER_S = 2.0


class Connection:
    __slots__ = ("sock", "addr", "buf", "deadline", "handshaking", "registered", "served", "lingering")

    def __init__(self, sock: socket.socket, addr, deadline: float, handshaking: bool) -> None:
        self.sock, self.addr, self.deadline, self.handshaking = sock, addr, deadline, handshaking
        self.buf = bytearray()
        self.registered = False
        self.served = 0
        self.lingering = False  # answered and closing: drain what the client still sends, then close


def _canned(status: int, reason: str, code: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", f"X-Error-Code: {code}", f"X-Error-Message: {message}",
            "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BUSY = _canned(503, "Service Unavailable", "ServiceUnavailable", "The mirror is busy: retry shortly.", 2)
TOO_MANY = _canned(503, "Service Unavailable", "ServiceUnavailable", "Too many open connections: retry shortly.", 5)
HEAD_TIMEOUT = _canned(408, "Request Timeout", "RequestTimeout", "The request head was not received in time.")
HEAD_TOO_LARGE = _canned(431, "Request Header Fields Too Large", "BadRequest", "The request head is too large.")


class PooledRequestHandler(BaseHTTPRequestHandler):
    """BaseHTTPRequestHandler for one request whose head has already been read by the event loop."""

    def __init__(self, conn: Connection, server: "PooledHTTPServer", head: bytes) -> None:
        self._head, self._conn = head, conn
        self.request, self.client_address, self.server = conn.sock, conn.addr, server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self._head)
        self.wfile = socketserver._SocketWriter(self.connection)

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        pass

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "connection":
            self._connection_header_sent = True
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        """A response on a connection the server will close says so (``Connection: close``): a client that
        is not told puts the connection back in its pool and its next request (huggingface_hub's
        ``get_paths_info`` POST twice in a row) meets a closed socket instead of an answer."""
        if self.close_connection and not getattr(self, "_connection_header_sent", False):
            self.send_header("Connection", "close")
        super().end_headers()

    def read_body(self, n: int) -> bytes:
        """The request body's ``n`` bytes: what the event loop already read past the head, then the socket
        (each read bounded by the connection's timeout)."""
        buf = self._conn.buf
        data = bytearray(buf[:n])
        del buf[:n]
        while len(data) < n:
            chunk = self.connection.recv(min(65536, n - len(data)))
            if not chunk:
                raise ConnectionResetError("client closed before sending its body")
            data += chunk
        return bytes(data)


class PooledHTTPServer:
    def __init__(
        self,
        address: tuple[str, int],
        handler: type[PooledRequestHandler],
        *,
        workers: int = 32,
        max_connections: int = 2048,
        max_pending: int = 1024,
        header_timeout: float = 20.0,
        idle_timeout: float = 60.0,
        io_timeout: float = 60.0,
        max_header_bytes: int = 16384,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.RequestHandlerClass = handler
        self.workers = workers
        self.max_connections = _fd_budget(max_connections)
        self.header_timeout, self.idle_timeout, self.io_timeout = header_timeout, idle_timeout, io_timeout
        self.max_header_bytes = max_header_bytes
        self.ssl_context = ssl_context
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.create_server(address, family=family, backlog=1024)
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._ready: queue.Queue = queue.Queue(maxsize=max_pending)
        self._returns: collections.deque[Connection] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._mu = threading.Lock()
        self._conns: set[Connection] = set()
        self._shutdown = False
        self._stopped = threading.Event()
        self._stopped.set()
        self._threads = [threading.Thread(target=self._work, name=f"qtk-mirror-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()
        self.rejected_busy = 0  # complete requests answered 503: every worker busy and the queue full
        self.rejected_connections = 0  # connections answered 503: --max-connections reached
        self._next_sweep = 0.0

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        with self._mu:
            return len(self._conns)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        sel = selectors.DefaultSelector()
        sel.register(self.socket, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._shutdown:
                for key, mask in sel.select(timeout=poll_interval):
                    if key.data is None:
                        self._accept(sel)
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                    else:
                        self._on_io(sel, key.data)
                self._take_returns(sel)
                self._sweep(sel)
        finally:
            sel.close()
            self._stopped.set()

    def shutdown(self) -> None:
        self._shutdown = True
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        self._shutdown = True
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._ready.put_nowait(None)
        with contextlib.suppress(OSError):
            self.socket.close()
        with self._mu:
            conns = list(self._conns)
        for c in conns:
            self._close(c)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # -- the event loop -------------------------------------------------------------------------------

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(256):
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving what is open
                log.warning("accept failed: %s", exc)
                return
            with self._mu:
                full = len(self._conns) >= self.max_connections
            if full:
                self.rejected_connections += 1
                self._refuse(sock, TOO_MANY)
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshaking = False
            if self.ssl_context is not None:
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError):
                    sock.close()
                    continue
                handshaking = True
            conn = Connection(sock, addr, time.monotonic() + self.header_timeout, handshaking)
            with self._mu:
                self._conns.add(conn)
            self._register(sel, conn, selectors.EVENT_READ)

    def _register(self, sel, conn: Connection, events: int) -> None:
        if conn.registered:
            sel.modify(conn.sock, events, conn)
        else:
            sel.register(conn.sock, events, conn)
            conn.registered = True

    def _unregister(self, sel, conn: Connection) -> None:
        if conn.registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                sel.unregister(conn.sock)
            conn.registered = False

    def _on_io(self, sel, conn: Connection) -> None:
        sock = conn.sock
        if conn.lingering:
            return self._drain(sel, conn)
        if conn.handshaking:
            try:
                sock.do_handshake()
                conn.handshaking = False
            except ssl.SSLWantReadError:
                return self._register(sel, conn, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                return self._register(sel, conn, selectors.EVENT_WRITE)
            except (OSError, ValueError):
                return self._drop(sel, conn)
            self._register(sel, conn, selectors.EVENT_READ)
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                break
            except ssl.SSLWantWriteError:
                return self._register(sel, conn, selectors.EVENT_WRITE)
            except (OSError, ValueError):
                return self._drop(sel, conn)
            if not data:
                return self._drop(sel, conn)
            conn.buf += data
            if len(conn.buf) > self.max_header_bytes + 65536 or _HEAD_END in conn.buf:
                break
        self._maybe_dispatch(sel, conn)

    def _maybe_dispatch(self, sel, conn: Connection) -> None:
        while conn.buf[:2] == b"\r\n":  # stray CRLFs between requests are allowed
            del conn.buf[:2]
        end = conn.buf.find(_HEAD_END)
        if end < 0:
            if len(conn.buf) > self.max_header_bytes:
                self._unregister(sel, conn)
                self._refuse_conn(conn, HEAD_TOO_LARGE, sel)
            return
        if end + 4 > self.max_header_bytes:
            self._unregister(sel, conn)
            return self._refuse_conn(conn, HEAD_TOO_LARGE, sel)
        head = bytes(conn.buf[: end + 4])
        del conn.buf[: end + 4]
        self._unregister(sel, conn)
        try:
            self._ready.put_nowait((conn, head))
        except queue.Full:
            self.rejected_busy += 1
            self._refuse_conn(conn, BUSY, sel)

    def _linger(self, sel, conn: Connection) -> None:
        """Close after a final response without a reset: stop sending, read and discard what the client
        still sends (an unread body would make close() send an RST that can destroy the response in
        flight), close at EOF or after ``LINGER_S``."""
        if isinstance(conn.sock, ssl.SSLSocket) or conn.sock.fileno() < 0:
            return self._close(conn)
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._close(conn)
        conn.lingering, conn.deadline = True, time.monotonic() + LINGER_S
        conn.buf.clear()
        self._register(sel, conn, selectors.EVENT_READ)

    def _drain(self, sel, conn: Connection) -> None:
        for _ in range(16):
            try:
                if not conn.sock.recv(65536):
                    return self._drop(sel, conn)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return self._drop(sel, conn)
        return self._drop(sel, conn)  # still sending after 1 MiB: enough

    def _take_returns(self, sel) -> None:
        while True:
            try:
                conn = self._returns.popleft()
            except IndexError:
                return
            if self._shutdown:
                self._close(conn)
                continue
            if conn.lingering:
                self._linger(sel, conn)
                continue
            conn.deadline = time.monotonic() + (self.idle_timeout if not conn.buf else self.header_timeout)
            try:
                conn.sock.setblocking(False)
            except OSError:
                self._close(conn)
                continue
            if _HEAD_END in conn.buf:  # a pipelined request is already here
                self._maybe_dispatch(sel, conn)
            else:
                self._register(sel, conn, selectors.EVENT_READ)
                if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
                    self._on_io(sel, conn)

    def _sweep(self, sel) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 0.25
        with self._mu:
            late = [c for c in self._conns if c.registered and c.deadline < now]
        for c in late:
            self._unregister(sel, c)
            if c.buf and not c.handshaking and not c.lingering:
                self._refuse_conn(c, HEAD_TIMEOUT, sel)  # a request head started but never finished
            else:
                self._close(c)

    def _refuse(self, sock: socket.socket, response: bytes) -> None:
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(response)
        with contextlib.suppress(OSError):
            sock.close()

    def _refuse_conn(self, conn: Connection, response: bytes, sel=None) -> None:
        if not conn.handshaking:
            with contextlib.suppress(OSError, ValueError, ssl.SSLError):
                conn.sock.send(response)
        if sel is not None and not conn.handshaking:
            return self._linger(sel, conn)
        self._close(conn)

    def _drop(self, sel, conn: Connection) -> None:
        self._unregister(sel, conn)
        self._close(conn)

    def _close(self, conn: Connection) -> None:
        with self._mu:
            self._conns.discard(conn)
        with contextlib.suppress(OSError, ValueError):
            conn.sock.close()

    # -- workers --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            conn, head = item
            keep = False
            try:
                conn.sock.settimeout(self.io_timeout)
                handler = self.RequestHandlerClass(conn, self, head)
                keep = not handler.close_connection and not self._shutdown
                conn.served += 1
            except Exception:  # noqa: BLE001 - one connection's failure never stops a worker
                log.exception("unhandled error while serving %s", conn.addr)
            if not keep:
                conn.lingering = True  # closed by the loop, after a drain
            self._returns.append(conn)
            self._wake()


def _fd_budget(wanted: int) -> int:
    """Raise the soft open-files limit toward the hard one; keep ``max_connections`` under it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + 256
    if soft != resource.RLIM_INFINITY and soft < target:
        new = target if hard == resource.RLIM_INFINITY else min(target, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft - 256))
