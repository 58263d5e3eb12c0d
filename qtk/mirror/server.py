"""The HTTP server under ``qtk serve``: one event loop does all the client I/O, a fixed pool of workers
computes answers.

Why not ``ThreadingHTTPServer``: it starts one thread per connection and never times out, so idle or
slow ("slowloris") connections pin threads without bound. Why not a server library: the mirror's bulk
path is ``sendfile`` (zero copies, measured at loopback speed); the maintained pure-Python WSGI servers
(waitress, gunicorn's gthread) copy file bodies through Python buffers, and the ASGI ones would need the
whole handler rewritten around an event loop. The few rules that make a threaded server hold up under
abuse fit in this module:

* **no worker until a request is complete**: the event loop (``selectors``) accepts connections, does the
  TLS handshake, reads the request head, checks it (:mod:`.http1`: one reading of the framing, anything
  ambiguous is 400 and close) and reads the body its ``Content-Length`` announces (at most ``max_body``
  bytes, else 413). A connection that dribbles bytes costs a socket and a few KiB, never a worker;
* **no worker while a client reads**: a worker writes its answer into the connection's output buffer
  (:class:`PooledRequestHandler` ``wfile``) and hands file bodies over as ``(fd, offset, count)``; the
  loop writes both when the socket is writable (non-blocking ``sendfile``; under TLS, ``pread`` + send).
  A slow reader costs a socket and an open file. Buffered answers are bounded (``max_buffered`` bytes in
  all): past it, a worker writes its answer itself, as before;
* **deadlines**: a request (head and body) must be complete within ``header_timeout`` seconds of its
  first byte (or of the connection being ready), else 408 and close; a kept-alive connection idle for
  ``idle_timeout`` is closed; while an answer is written, a client that reads less than ``min_rate``
  bytes/s over any ``io_timeout`` window is cut;
* **bounds**: ``workers`` threads (fixed), at most ``max_pending`` complete requests waiting for one, at
  most ``max_connections`` open connections, at most ``max_per_client`` of them from one client address
  (an IPv6 client is its /64; peers for which :meth:`PooledHTTPServer.exempt_from_client_limit` is true,
  trusted proxies, are not counted). Past a bound the loop answers ``503`` with ``Retry-After`` and
  closes, without blocking;
* request heads are capped at ``max_header_bytes`` (431).

A handler class gets ``(connection, server, head, body)`` with the head already parsed; after its
answer is written the connection returns to the loop for the next request (keep-alive) or is closed.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import ipaddress
import json
import logging
import os
import queue
import resource
import selectors
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler

from .http1 import BadHead, Head, parse_head

__all__ = ["PooledHTTPServer", "PooledRequestHandler", "Connection", "MIN_RATE", "MAX_PER_CLIENT"]

log = logging.getLogger("qtk.mirror")

_HEAD_END = b"\r\n\r\n"
LINGER_S = 2.0
MIN_RATE = 8 * 1024  # bytes/s a client must read, over each io_timeout window, while an answer is written
MAX_PER_CLIENT = 128  # open connections per client address (a qtk pull opens 16, at most 64; huggingface_hub 8)
MAX_BUFFERED = 256 * 1024 * 1024  # answer bytes held for the loop to write, all connections together
SEND_CHUNK = 256 * 1024  # bytes per send() from an output buffer (and per pread under TLS)
SENDFILE_CHUNK = 8 * 1024 * 1024
WRITE_TURN = 16 * 1024 * 1024  # bytes one connection may write per wake-up before the others get a turn
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

READING, WORKING, WRITING, LINGERING = "reading", "working", "writing", "lingering"


class Connection:
    __slots__ = ("sock", "addr", "client", "buf", "deadline", "handshaking", "registered", "events", "served",
                 "state", "idle", "head", "out", "out_pos", "reserved", "file", "close_after", "aborted",
                 "window_end", "window_bytes")

    def __init__(self, sock: socket.socket, addr, deadline: float, handshaking: bool, client: str | None) -> None:
        self.sock, self.addr, self.deadline, self.handshaking, self.client = sock, addr, deadline, handshaking, client
        self.buf = bytearray()
        self.registered, self.events, self.served = False, 0, 0
        self.state, self.idle, self.head = READING, False, None  # head: a parsed head whose body is being read
        self.out, self.out_pos, self.reserved = bytearray(), 0, 0  # the answer the loop still has to write
        self.file: list | None = None  # [fd, offset, bytes left] of a file body to send after ``out``
        self.close_after, self.aborted = False, False
        self.window_end, self.window_bytes = 0.0, 0


def _canned(status: int, reason: str, code: str, message: str, retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", f"X-Error-Code: {code}", f"X-Error-Message: {message}",
            "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BUSY = _canned(503, "Service Unavailable", "ServiceUnavailable", "The mirror is busy: retry shortly.", 2)
TOO_MANY = _canned(503, "Service Unavailable", "ServiceUnavailable", "Too many open connections: retry shortly.", 5)
TOO_MANY_FROM_CLIENT = _canned(503, "Service Unavailable", "ServiceUnavailable",
                               "Too many open connections from your address: retry shortly.", 5)
HEAD_TIMEOUT = _canned(408, "Request Timeout", "RequestTimeout", "The request was not received in time.")
HEAD_TOO_LARGE = _canned(431, "Request Header Fields Too Large", "BadRequest", "The request head is too large.")
BODY_TOO_LARGE = _canned(413, "Content Too Large", "BadRequest", "The request body is too large.")
_REASONS = {400: "Bad Request", 411: "Length Required", 431: "Request Header Fields Too Large",
            505: "HTTP Version Not Supported"}


def _refusal(exc: BadHead) -> bytes:
    return _canned(exc.status, _REASONS.get(exc.status, "Bad Request"), "BadRequest", exc.message)


def _for(request: bytes | bytearray, response: bytes) -> bytes:
    """A canned answer fit for the request it answers: without its body when that is a HEAD."""
    return response[: response.index(b"\r\n\r\n") + 4] if request[:5] == b"HEAD " else response


class _ResponseBuffer:
    """A handler's ``wfile``: what it writes goes to the connection's output buffer, written by the loop.
    Past the server's budget for buffered answers, the worker writes it out itself (blocking, each
    write bounded by the I/O timeout): memory stays bounded whatever clients do."""

    def __init__(self, server: "PooledHTTPServer", conn: Connection, sock: "_ClientSocket") -> None:
        self._server, self._conn, self._sock = server, conn, sock

    def write(self, data) -> int:
        n = len(data)
        if self._server._reserve(n):
            self._conn.out += data
            self._conn.reserved += n
        else:
            self._sock.sendall(data)
        return n

    def flush(self) -> None:
        pass


class _ClientSocket:
    """The client socket as a handler sees it (``self.connection``): a direct write first sends what the
    handler already buffered, so bytes always leave in the order they were written."""

    def __init__(self, server: "PooledHTTPServer", conn: Connection) -> None:
        self._server, self._conn = server, conn

    def __getattr__(self, name):
        return getattr(self._conn.sock, name)

    def _drain(self) -> None:
        c = self._conn
        if c.out_pos < len(c.out):
            c.sock.sendall(memoryview(c.out)[c.out_pos:])
        c.out.clear()
        c.out_pos = 0
        self._server._unreserve(c)

    def sendall(self, data, *flags) -> None:
        self._drain()
        self._conn.sock.sendall(data, *flags)

    def send(self, data, *flags) -> int:
        self._drain()
        return self._conn.sock.send(data, *flags)


class PooledRequestHandler(BaseHTTPRequestHandler):
    """BaseHTTPRequestHandler for one request whose head (parsed) and body the event loop has read.

    ``self.body`` holds the request body (``b""`` without one), ``self.content_length`` the announced
    length (None: no ``Content-Length``). Writes to ``wfile`` are buffered and written by the loop;
    :meth:`stream_file` hands it a file body."""

    def __init__(self, conn: Connection, server: "PooledHTTPServer", head: Head, body: bytes) -> None:
        self._head, self._conn, self.body, self.content_length = head, conn, body, head.content_length
        self.request, self.client_address, self.server = conn.sock, conn.addr, server
        self.connection = _ClientSocket(server, conn)
        self.wfile = _ResponseBuffer(server, conn, self.connection)
        self.handle()

    def handle(self) -> None:
        self.close_connection = True
        self.parse_request()
        method = getattr(self, "do_" + self.command, None)
        if method is None:
            self.send_error(501, f"Unsupported method ({self.command!r})")
            return
        method()

    def parse_request(self) -> bool:
        """Take the loop's reading of the head (the stdlib's parser is never run: one reading only)."""
        h = self._head
        self.command, self.path, self.request_version = h.method, h.target, h.version
        self.requestline = h.request_line
        self.headers = http.client.HTTPMessage()
        for name, value in h.fields:
            self.headers[name] = value
        self.close_connection = not h.keep_alive
        return True

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

    def stream_file(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` after the headers, from the event loop (the
        caller keeps ownership of ``fd``: the loop works on a duplicate)."""
        if count > 0:
            self._conn.file = [os.dup(fd), offset, count]


class PooledHTTPServer:
    def __init__(
        self,
        address: tuple[str, int],
        handler: type[PooledRequestHandler],
        *,
        workers: int = 32,
        max_connections: int = 2048,
        max_per_client: int = MAX_PER_CLIENT,
        max_pending: int = 1024,
        header_timeout: float = 20.0,
        idle_timeout: float = 60.0,
        io_timeout: float = 60.0,
        min_rate: float = MIN_RATE,
        max_header_bytes: int = 16384,
        max_body: int = 256 * 1024,
        max_buffered: int = MAX_BUFFERED,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.RequestHandlerClass = handler
        self.workers = workers
        self.max_connections = _fd_budget(max_connections)
        self.max_per_client = max_per_client  # 0: no per-client bound
        self.header_timeout, self.idle_timeout, self.io_timeout = header_timeout, idle_timeout, io_timeout
        self.min_rate, self.max_header_bytes, self.max_body = min_rate, max_header_bytes, max_body
        self.max_buffered = max_buffered
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
        self._per_client: dict[str, int] = {}
        self._buffered = 0
        self._shutdown = False
        self._stopped = threading.Event()
        self._stopped.set()
        self._threads = [threading.Thread(target=self._work, name=f"qtk-mirror-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()
        self.rejected_busy = 0  # complete requests answered 503: every worker busy and the queue full
        self.rejected_connections = 0  # connections answered 503: --max-connections reached
        self.rejected_per_client = 0  # connections answered 503: --max-per-client reached
        self.rejected_heads = 0  # request heads refused (400/411/413/431/505) by the loop
        self._next_sweep = 0.0

    # -- hooks ----------------------------------------------------------------------------------------

    def exempt_from_client_limit(self, ip) -> bool:
        """Peers whose connections ``max_per_client`` does not count (a subclass: trusted proxies)."""
        return False

    def on_sent(self, nbytes: int) -> None:
        """File-body bytes the loop has sent (statistics)."""

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
                for key, _mask in sel.select(timeout=poll_interval):
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

    # -- accepting ------------------------------------------------------------------------------------

    def _client_key(self, addr) -> str | None:
        """The address the per-client bound counts (an IPv6 /64, an IPv4-mapped address as IPv4); None
        for an exempt peer."""
        host = addr[0] if isinstance(addr, tuple) else str(addr)
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return host
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.exempt_from_client_limit(ip):
            return None
        return str(ipaddress.ip_network(f"{ip}/64", strict=False)) if ip.version == 6 else str(ip)

    def _admit(self, addr) -> tuple[bytes | None, str | None]:
        """(refusal or None, client key); counts the connection when admitted."""
        client = self._client_key(addr)
        with self._mu:
            if len(self._conns) >= self.max_connections:
                self.rejected_connections += 1
                return TOO_MANY, client
            if client is not None and self.max_per_client:
                if self._per_client.get(client, 0) >= self.max_per_client:
                    self.rejected_per_client += 1
                    return TOO_MANY_FROM_CLIENT, client
                self._per_client[client] = self._per_client.get(client, 0) + 1
        return None, client

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(256):
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving what is open
                log.warning("accept failed: %s", exc)
                return
            refusal, client = self._admit(addr)
            if refusal is not None:
                self._refuse(sock, refusal)
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
                    self._forget_client(client)
                    continue
                handshaking = True
            conn = Connection(sock, addr, time.monotonic() + self.header_timeout, handshaking,
                              client if self.max_per_client else None)
            with self._mu:
                self._conns.add(conn)
            self._register(sel, conn, selectors.EVENT_READ)

    def _forget_client(self, client: str | None) -> None:
        if client is None or not self.max_per_client:
            return
        with self._mu:
            left = self._per_client.get(client, 0) - 1
            if left > 0:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)

    def _register(self, sel, conn: Connection, events: int) -> None:
        if conn.registered:
            if conn.events != events:
                sel.modify(conn.sock, events, conn)
        else:
            sel.register(conn.sock, events, conn)
            conn.registered = True
        conn.events = events

    def _unregister(self, sel, conn: Connection) -> None:
        if conn.registered:
            with contextlib.suppress(KeyError, ValueError, OSError):
                sel.unregister(conn.sock)
            conn.registered = False

    # -- reading requests -----------------------------------------------------------------------------

    def _on_io(self, sel, conn: Connection) -> None:
        if conn.state == LINGERING:
            return self._drain(sel, conn)
        if conn.state == WRITING:
            return self._write(sel, conn)
        if conn.handshaking:
            try:
                conn.sock.do_handshake()
                conn.handshaking = False
            except ssl.SSLWantReadError:
                return self._register(sel, conn, selectors.EVENT_READ)
            except ssl.SSLWantWriteError:
                return self._register(sel, conn, selectors.EVENT_WRITE)
            except (OSError, ValueError):
                return self._drop(sel, conn)
        self._read(sel, conn)

    def _enough(self, conn: Connection) -> bool:
        """Has the loop read all it needs for the next step (a head, or the body of the parsed head)?"""
        if conn.head is not None:
            return len(conn.buf) >= (conn.head.content_length or 0)
        return _HEAD_END in conn.buf or len(conn.buf) > self.max_header_bytes

    def _read(self, sel, conn: Connection) -> None:
        while not self._enough(conn):
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                break
            except ssl.SSLWantWriteError:
                return self._register(sel, conn, selectors.EVENT_WRITE)
            except (OSError, ValueError):
                return self._drop(sel, conn)
            if not data:
                return self._drop(sel, conn)
            if conn.idle:  # a new request starts: it has header_timeout from its first byte, in total
                conn.idle, conn.deadline = False, time.monotonic() + self.header_timeout
            conn.buf += data
        self._advance(sel, conn)

    def _advance(self, sel, conn: Connection) -> None:
        """Parse the head once it is complete, wait for its body, then hand the request to a worker."""
        if conn.head is None:
            while conn.buf[:2] == b"\r\n":  # empty lines before a request line are allowed (RFC 9112 §2.2)
                del conn.buf[:2]
            end = conn.buf.find(_HEAD_END)
            if end < 0 or end + 4 > self.max_header_bytes:
                if end >= 0 or len(conn.buf) > self.max_header_bytes:
                    return self._answer_and_close(sel, conn, HEAD_TOO_LARGE)
                return self._register(sel, conn, selectors.EVENT_READ)
            raw = bytes(conn.buf[: end + 4])
            try:
                head = parse_head(raw)
            except BadHead as exc:
                self.rejected_heads += 1
                return self._answer_and_close(sel, conn, _refusal(exc), raw)
            del conn.buf[: end + 4]
            if (head.content_length or 0) > self.max_body:
                self.rejected_heads += 1
                return self._answer_and_close(sel, conn, BODY_TOO_LARGE, raw)
            conn.head = head
            if head.expect_continue and len(conn.buf) < (head.content_length or 0) and not self._send_small(conn, _CONTINUE):
                return self._drop(sel, conn)
        need = conn.head.content_length or 0
        if len(conn.buf) < need:
            return self._register(sel, conn, selectors.EVENT_READ)
        head, body = conn.head, bytes(conn.buf[:need])
        del conn.buf[:need]
        conn.head = None
        self._unregister(sel, conn)
        conn.state = WORKING
        try:
            self._ready.put_nowait((conn, head, body))
        except queue.Full:
            self.rejected_busy += 1
            self._answer_and_close(sel, conn, BUSY, head.method.encode() + b" ")

    @staticmethod
    def _send_small(conn: Connection, data: bytes) -> bool:
        """Send a few bytes now (an interim ``100 Continue``); False if they could not all go."""
        try:
            return conn.sock.send(data) == len(data)
        except (OSError, ValueError):
            return False

    # -- writing answers ------------------------------------------------------------------------------

    def _answer_and_close(self, sel, conn: Connection, response: bytes, request: bytes | bytearray = b"") -> None:
        """Answer ``response`` (to ``request``, the head it answers, if known) and close after a drain."""
        response = _for(request or conn.buf, response)
        conn.buf.clear()
        conn.head = None
        if conn.handshaking:
            return self._drop(sel, conn)
        self._unreserve(conn)
        conn.out, conn.out_pos, conn.close_after = bytearray(response), 0, True
        self._close_file(conn)
        self._begin_write(sel, conn)

    def _begin_write(self, sel, conn: Connection) -> None:
        conn.state = WRITING
        conn.window_end = conn.deadline = time.monotonic() + self.io_timeout
        conn.window_bytes = 0
        self._write(sel, conn)

    def _write(self, sel, conn: Connection) -> None:
        """Write the buffered answer, then the file body, until the socket would block (non-blocking
        ``sendfile``; under TLS ``pread`` + send); at most ``WRITE_TURN`` bytes before others get a turn."""
        sock, turn = conn.sock, WRITE_TURN
        tls = isinstance(sock, ssl.SSLSocket)
        try:
            while turn > 0:
                if conn.out_pos < len(conn.out):
                    n = sock.send(memoryview(conn.out)[conn.out_pos : conn.out_pos + SEND_CHUNK])
                    conn.out_pos += n
                    if conn.out_pos == len(conn.out):
                        conn.out.clear()
                        conn.out_pos = 0
                        self._unreserve(conn)
                elif conn.file is not None and conn.file[2] > 0:
                    fd, offset, left = conn.file
                    if tls:  # no sendfile through TLS: read a chunk into the (now empty) output buffer
                        data = os.pread(fd, min(left, SEND_CHUNK), offset)
                        step, n = len(data), 0
                        conn.out += data
                    else:
                        step = n = os.sendfile(sock.fileno(), fd, offset, min(left, SENDFILE_CHUNK))
                    if step == 0:
                        raise OSError("file shrank while being sent")
                    conn.file[1], conn.file[2] = offset + step, left - step
                    self.on_sent(step)
                else:
                    return self._answer_done(sel, conn)
                conn.window_bytes += n
                turn -= n
        except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
            return self._register(sel, conn, selectors.EVENT_WRITE)
        except ssl.SSLWantReadError:
            return self._register(sel, conn, selectors.EVENT_READ)
        except (OSError, ValueError):
            return self._drop(sel, conn)
        self._register(sel, conn, selectors.EVENT_WRITE)

    def _answer_done(self, sel, conn: Connection) -> None:
        """The answer is out: close (after a drain), or wait for the next request on this connection."""
        self._close_file(conn)
        conn.served += 1
        if conn.close_after:
            return self._linger(sel, conn)
        conn.state = READING
        if conn.buf:  # a pipelined request is already (partly) here
            conn.idle, conn.deadline = False, time.monotonic() + self.header_timeout
            self._advance(sel, conn)
        else:
            conn.idle, conn.deadline = True, time.monotonic() + self.idle_timeout
            self._register(sel, conn, selectors.EVENT_READ)
        if conn.state == READING and isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
            self._read(sel, conn)

    def _reserve(self, n: int) -> bool:
        with self._mu:
            if self._buffered + n > self.max_buffered:
                return False
            self._buffered += n
            return True

    def _unreserve(self, conn: Connection) -> None:
        if conn.reserved:
            with self._mu:
                self._buffered -= conn.reserved
            conn.reserved = 0

    def _linger(self, sel, conn: Connection) -> None:
        """Close after a final response without a reset: stop sending, read and discard what the client
        still sends (an unread body would make close() send an RST that can destroy the response in
        flight), close at EOF or after ``LINGER_S``."""
        if isinstance(conn.sock, ssl.SSLSocket) or conn.sock.fileno() < 0:
            return self._drop(sel, conn)
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self._drop(sel, conn)
        conn.state, conn.deadline = LINGERING, time.monotonic() + LINGER_S
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
            if self._shutdown or conn.aborted or conn.sock.fileno() < 0:
                self._close(conn)  # shutting down, the handler failed, or it reset the connection itself
                continue
            try:
                conn.sock.setblocking(False)
            except OSError:
                self._close(conn)
                continue
            if conn.out or conn.file is not None:
                self._begin_write(sel, conn)
            else:
                self._answer_done(sel, conn)

    def _sweep(self, sel) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 0.25
        with self._mu:
            late = [c for c in self._conns if c.registered and c.deadline < now]
        for c in late:
            if c.state == WRITING:
                if c.window_bytes >= self.min_rate * self.io_timeout:  # a slow reader, but fast enough
                    c.window_end = c.deadline = now + self.io_timeout
                    c.window_bytes = 0
                    continue
                self._drop(sel, c)  # stopped reading, or reads below min_rate
            elif c.state == READING and not c.handshaking and (c.buf or c.head is not None):
                started = c.head.method.encode() + b" " if c.head is not None else c.buf
                self._answer_and_close(sel, c, HEAD_TIMEOUT, started)  # a request started but never finished
            else:
                self._drop(sel, c)

    def _refuse(self, sock: socket.socket, response: bytes) -> None:
        """Answer a connection that is not admitted and close it at once (it never costs a slot); what the
        client already sent is read first, so the close sends a FIN, not a reset that could destroy the
        answer in flight."""
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(response)
            sock.shutdown(socket.SHUT_WR)
            for _ in range(4):
                if not sock.recv(65536):
                    break
        with contextlib.suppress(OSError):
            sock.close()

    def _drop(self, sel, conn: Connection) -> None:
        self._unregister(sel, conn)
        self._close(conn)

    def _close_file(self, conn: Connection) -> None:
        if conn.file is not None:
            with contextlib.suppress(OSError):
                os.close(conn.file[0])
            conn.file = None

    def _close(self, conn: Connection) -> None:
        with self._mu:
            if conn not in self._conns:
                return
            self._conns.discard(conn)
        self._forget_client(conn.client)
        self._close_file(conn)
        self._unreserve(conn)
        with contextlib.suppress(OSError, ValueError):
            conn.sock.close()

    # -- workers --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            conn, head, body = item
            keep = False
            try:
                conn.sock.settimeout(self.io_timeout)
                handler = self.RequestHandlerClass(conn, self, head, body)
                keep = not handler.close_connection and not self._shutdown
            except Exception:  # noqa: BLE001 - one connection's failure never stops a worker
                log.exception("unhandled error while serving %s", conn.addr)
                conn.aborted = True
            conn.close_after = not keep
            self._returns.append(conn)
            self._wake()


def _fd_budget(wanted: int) -> int:
    """Raise the soft open-files limit toward the hard one; keep ``max_connections`` under it (each
    connection may hold a socket and a file being sent)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 2 * wanted + 256
    if soft != resource.RLIM_INFINITY and soft < target:
        new = target if hard == resource.RLIM_INFINITY else min(target, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, (soft - 256) // 2))
