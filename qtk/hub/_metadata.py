"""Repo metadata through huggingface_hub, with every wait bounded.

huggingface_hub 2.x's shared httpx client has no timeout (``timeout=None``): ``repo_info`` waits
forever on a stalled server, and its tree listing follows ``Link: rel="next"`` without remembering
where it has been (a page that links to itself is requested forever). qtk sends the same requests
on huggingface_hub's client, with its headers and its error classification, and adds per request:

* connect/read timeouts (:class:`~qtk.hub._retry.RetryPolicy`: ``HF_HUB_ETAG_TIMEOUT`` if set);
* retries on timeouts, connection errors, 429 and 5xx, honouring ``Retry-After`` up to a cap;
* for the listing, a next link seen before (or an entry listed twice) is an error, not a loop;
* the token goes to the endpoint's origin (scheme, host, port) only. qtk puts ``Authorization`` on each
  request itself, so a tree page's ``Link: rel="next"`` to another origin would receive it: such a link
  is refused (:class:`~qtk.errors.NetworkError`, nothing requested there). The Hub and ``qtk serve``
  paginate on their own origin; a listing is part of what the endpoint vouches for, and a page from
  elsewhere (possibly over plain HTTP) is not. Redirects are huggingface_hub's client's (httpx): it
  drops ``Authorization`` when a redirect leaves the origin.

Nothing here touches huggingface_hub's global client factory: a program that imports qtk keeps its
own huggingface_hub settings.

**Every answer is bounded in time and size, not only each read.** A read timeout bounds silence: a
server that sends its headers, or its JSON, one byte every 1.5 s under a 2 s timeout resets it with every
byte and holds ``qtk pull`` / ``qtk whoami`` for hours, and a "JSON" body that never ends is read into
memory. So each metadata request (repo info, each tree page, the access check's HEAD, whoami) goes out on
qtk's own httpx client (:func:`fetch`), configured like huggingface_hub's default one (environment,
certificates, proxies; huggingface_hub's headers and :func:`hf_raise_for_status`), and its answer must be
complete, head and body, within ``QTK_METADATA_DEADLINE`` seconds (default 60; per request, so a listing
of many pages is never judged as a whole) and its body at most ``QTK_METADATA_MAX_BYTES`` (default 64
MiB, counted after decompression). When the deadline passes, a timer shuts the connection's socket down
(the blocked read returns at once) and the request counts as a timeout (:class:`SlowAnswer`: retried like
one, then a :class:`~qtk.errors.NetworkError` naming the host); a body over the cap stops being read and
is a NetworkError at once (the same server sends the same listing again). The socket is known without
reaching into httpx: the client keeps one connection per thread and learns its socket from httpcore's
documented ``trace`` extension when it connects. The defaults never trip on the Hub: a tree page of a
100,000-file repo is a few MB and comes in about a second, so 64 MiB and 60 s leave a factor of ten or
more for slow links, while a drip is dropped within a minute and no answer holds more than 64 MiB.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Callable, TypeVar
from urllib.parse import quote

from .. import __version__, errors
from ._errors import HubContext, public_url
from ._origin import origin
from ._retry import RETRY_STATUS, RetryPolicy, parse_retry_after
from .cache import RemoteFile

__all__ = ["repo_commit", "list_repo_files", "check_file_access", "call_with_retries", "fetch", "SlowAnswer"]

T = TypeVar("T")
MAX_PAGES_WITHOUT_NEWS = 3  # pages in a row that add no entry: the cursor is going round


MAX_REDIRECTS = 10


class SlowAnswer(Exception):
    """A metadata answer was not complete within its deadline (its connection was cut)."""

    def __init__(self, host: str, deadline: float, got: int) -> None:
        super().__init__(f"{host}: no complete answer within {deadline:g} s ({got:,} bytes of body)")
        self.host, self.deadline, self.got = host, deadline, got


class _Line:
    """This thread's metadata client. It holds one connection at a time, so the socket a request uses is
    the one it last connected, which httpcore's ``trace`` extension reports (``*.connect_tcp.complete``)."""

    def __init__(self) -> None:
        import httpx2

        self.sock: socket.socket | None = None
        self.client = httpx2.Client(follow_redirects=False, timeout=None,
                                    limits=httpx2.Limits(max_connections=1, max_keepalive_connections=1))

    def trace(self, event: str, info: dict) -> None:
        if event.endswith((".connect_tcp.complete", ".connect_unix_socket.complete", ".start_tls.complete")):
            stream = info.get("return_value")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                self.sock = sock


_lines = threading.local()


def _line() -> _Line:
    line = getattr(_lines, "line", None)
    if line is None:
        line = _lines.line = _Line()
    return line


class _Watch:
    """A request's deadline: when it passes, the socket of ``line`` is shut down (a blocked read returns)."""

    def __init__(self, line: _Line, deadline: float) -> None:
        self.line, self.fired, self._done = line, False, False
        self._mu = threading.Lock()
        self._timer = threading.Timer(deadline, self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        with self._mu:
            if self._done:
                return
            self.fired, sock = True, self.line.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP socket under TLS too

    def stop(self) -> bool:
        """Ends the watch; True when the deadline had passed."""
        self._timer.cancel()
        with self._mu:
            self._done = True
            return self.fired


def fetch(method: str, url: str, *, headers: dict, policy: RetryPolicy, what: str, params: dict | None = None,
          follow: Callable[[str], bool] = lambda url: True):
    """One metadata request, its answer read whole within ``policy.answer_deadline`` seconds (head and
    body) and ``policy.answer_max_bytes`` bytes. Redirects whose target ``follow`` accepts are followed
    (the ``Authorization`` header is dropped when one leaves the origin); the last answer is returned
    read, as an ``httpx2.Response``. Raises :class:`SlowAnswer` (the deadline passed) or a
    :class:`~qtk.errors.NetworkError` (the body is over the cap); ``httpx2`` errors as they come."""
    line = _line()
    request = line.client.build_request(method, url, params=params, headers=headers, timeout=_timeout(policy),
                                        extensions={"trace": line.trace})
    for _ in range(MAX_REDIRECTS + 1):
        host = public_url(str(request.url), path=False)
        watch = _Watch(line, policy.answer_deadline)
        got = [0]
        try:
            r = line.client.send(request, stream=True)
            try:
                body = b""
                if r.next_request is None or not follow(str(r.next_request.url)):
                    body = _read_capped(r, policy.answer_max_bytes, host, what, got)
            finally:
                r.close()
        except Exception:
            if watch.stop():
                raise SlowAnswer(host, policy.answer_deadline, got[0]) from None
            raise
        if watch.stop():
            raise SlowAnswer(host, policy.answer_deadline, got[0])
        if r.next_request is None or not follow(str(r.next_request.url)):
            return _whole(r, body)
        request = r.next_request
    raise errors.NetworkError(f"{what}: {public_url(url)} redirected more than {MAX_REDIRECTS} times.",
                              hint="Check HF_ENDPOINT; the server (or a proxy in front of it) redirects in a loop.")


def _read_capped(r, cap: int, host: str, what: str, got: list[int]) -> bytes:
    """The body of ``r`` (decoded), refusing more than ``cap`` bytes, declared or sent; ``got[0]``
    counts what arrived (for the message when the deadline cuts the read)."""
    if r.request.method == "HEAD":
        return b""  # its Content-Length is the file's
    declared = r.headers.get("Content-Length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > cap and "Content-Encoding" not in r.headers:
        raise _too_big(host, what, cap, f"declared {int(declared):,} bytes")
    chunks = []
    for chunk in r.iter_bytes():
        got[0] += len(chunk)
        if got[0] > cap:
            raise _too_big(host, what, cap, "kept sending")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_big(host: str, what: str, cap: int, how: str) -> errors.NetworkError:
    return errors.NetworkError(
        f"{what}: {host} sent an answer larger than {cap:,} bytes ({how}); qtk stopped reading it.",
        hint="Nothing was downloaded. A Hub answer is far smaller: check HF_ENDPOINT. If this server's "
        "answers really are that large, raise QTK_METADATA_MAX_BYTES (bytes).",
    )


def _whole(r, body: bytes):
    """``r`` with ``body`` as its content (already decoded: the encoding and framing headers go)."""
    import httpx2

    framing = {"content-encoding", "content-length", "transfer-encoding"}
    headers = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in framing]
    return httpx2.Response(r.status_code, headers=headers, content=body, request=r.request)


def _timeout(policy: RetryPolicy):
    import httpx2

    return httpx2.Timeout(policy.read_timeout, connect=policy.connect_timeout)


def call_with_retries(what: str, call: Callable[[], T], policy: RetryPolicy, ctx: HubContext,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """``call()``, retried on transport errors, timeouts, 429 and 5xx (huggingface_hub's typed
    errors or raw responses) with backoff or the server's ``Retry-After`` (capped)."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except hf_errors.HfHubHTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else 0
            if status not in RETRY_STATUS or attempt == policy.attempts:
                raise
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
            sleep(policy.delay(attempt, retry_after, f"{what} ({ctx.shown_endpoint})"))
        except httpx2.TimeoutException as exc:
            if attempt == policy.attempts:
                kind = "connect" if isinstance(exc, httpx2.ConnectTimeout) else "answer"
                limit = policy.connect_timeout if kind == "connect" else policy.read_timeout
                raise errors.NetworkError(
                    f"{what}: {ctx.shown_endpoint} did not {kind} within {limit:g} s ({policy.attempts} tries).",
                    hint="Check HF_ENDPOINT and the network; if the server is just slow, raise HF_HUB_ETAG_TIMEOUT "
                    "(seconds).",
                ) from exc
            sleep(policy.backoff(attempt))
        except SlowAnswer as exc:
            if attempt == policy.attempts:
                raise errors.NetworkError(
                    f"{what}: {exc.host} did not send a complete answer within {exc.deadline:g} s "
                    f"({policy.attempts} tries; the last one got {exc.got:,} bytes of body, slowly).",
                    hint="A server that answers this slowly is broken, overloaded or hostile: check HF_ENDPOINT. "
                    "If its answers are just that slow, raise QTK_METADATA_DEADLINE (seconds per answer).",
                ) from None
            sleep(policy.backoff(attempt))
        except (httpx2.NetworkError, httpx2.RemoteProtocolError):
            if attempt == policy.attempts:
                raise
            sleep(policy.backoff(attempt))
    raise AssertionError("unreachable")


def _get_json(url: str, params: dict | None, headers: dict, what: str, policy: RetryPolicy, ctx: HubContext):
    """GET ``url`` on huggingface_hub's client (its errors, its headers), bounded and retried."""
    from huggingface_hub.utils import hf_raise_for_status

    def get():
        r = fetch("GET", url, params=params, headers=headers, policy=policy, what=what)
        hf_raise_for_status(r)
        return r

    return call_with_retries(what, get, policy, ctx)


def _headers(token: str | None) -> dict:
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(token=token or False, library_name="qtk", library_version=__version__)


def repo_commit(endpoint: str, repo_id: str, repo_type: str, revision: str | None, token: str | None,
                policy: RetryPolicy, ctx: HubContext) -> str:
    """The commit sha ``revision`` points to now: huggingface_hub's repo-info request
    (``HfApi.repo_info``'s URL), without importing ``HfApi`` (0.3 s of ``qtk pull``'s start-up)."""
    url = f"{endpoint}/api/{repo_type}s/{repo_id}"
    if revision is not None:
        url += f"/revision/{quote(revision, safe='')}"
    r = _get_json(url, None, _headers(token), f"Reading the repo info of {repo_id}", policy, ctx)
    info = r.json()
    sha = info.get("sha") if isinstance(info, dict) else None
    if not isinstance(sha, str) or not sha:
        raise errors.RevisionNotFoundError(
            f"{ctx.shown_endpoint} did not return a commit for {repo_id}@{revision or 'main'}."
        )
    return sha


def _remote_file(e: dict, ctx: HubContext, repo_id: str) -> RemoteFile:
    """A tree entry of type "file" as qtk's ``RemoteFile`` (LFS files are named by their sha256)."""
    size, oid, lfs = e.get("size"), e.get("oid"), e.get("lfs")
    if lfs is not None:
        if not isinstance(lfs, dict) or lfs.get("size", size) != size:
            raise _bad_entry(ctx, repo_id, e, "an LFS pointer that does not match the file")
        oid = lfs.get("oid")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(oid, str):
        raise _bad_entry(ctx, repo_id, e, "no valid size and oid")
    return RemoteFile(e["path"], size, oid, lfs=lfs is not None)


def _bad_entry(ctx: HubContext, repo_id: str, e: dict, why: str) -> errors.NetworkError:
    return errors.NetworkError(
        f"{ctx.shown_endpoint} listed {str(e.get('path'))[:200]!r} of {repo_id} with {why}.",
        hint="Nothing was downloaded. The server's listing is broken; report it to its operators.",
    )


def list_repo_files(endpoint: str, repo_id: str, repo_type: str, commit: str, token: str | None,
                    policy: RetryPolicy, ctx: HubContext) -> list[RemoteFile]:
    """Every file of the repo at ``commit`` (huggingface_hub's tree request), following the pages."""
    import httpx2

    headers = _headers(token)
    url: str | None = f"{endpoint}/api/{repo_type}s/{repo_id}/tree/{quote(commit, safe='')}"
    params: dict | None = {"recursive": True, "expand": False}
    requested: set[str] = set()
    seen: dict[str, dict] = {}
    files: list[RemoteFile] = []
    page = stale = 0
    while url is not None:
        page += 1
        r = _get_json(url, params, headers, f"Listing the files of {repo_id} (page {page})", policy, ctx)
        requested.add(str(r.request.url))
        entries = r.json()
        if not isinstance(entries, list):
            raise errors.NetworkError(
                f"{ctx.shown_endpoint} answered the file listing of {repo_id} with something that is not a list.",
                hint="Is HF_ENDPOINT a Hub-compatible server?",
            )
        new = 0
        for e in entries:
            path = e.get("path") if isinstance(e, dict) else None
            if not isinstance(path, str):
                raise errors.NetworkError(
                    f"{ctx.shown_endpoint} listed an entry of {repo_id} without a path: {e!r:.200}"
                )
            if path in seen:  # the same entry again is harmless; a different one under the same path is not
                if seen[path] != e:
                    raise errors.NetworkError(
                        f"{ctx.shown_endpoint} listed {path!r} of {repo_id} twice, with different contents.",
                        hint="The server's listing is inconsistent; nothing was downloaded. Report it to its "
                        "operators.",
                    )
                continue
            seen[path] = e
            new += 1
            if e.get("type") == "file":
                files.append(_remote_file(e, ctx, repo_id))
        stale = 0 if new else stale + 1
        if stale >= MAX_PAGES_WITHOUT_NEWS:
            raise _loop(ctx, repo_id, page, f"{stale} pages in a row listed nothing new")
        nxt = r.links.get("next", {}).get("url")
        if nxt is not None:
            nxt = str(r.request.url.join(nxt))
            if origin(nxt) != origin(endpoint):
                raise _elsewhere(ctx, repo_id, page, nxt)
            if nxt in requested or str(httpx2.URL(nxt)) in requested:
                raise _loop(ctx, repo_id, page, f"the next-page link points back to {public_url(nxt)}")
        url, params = nxt, None
    return files


def _elsewhere(ctx: HubContext, repo_id: str, page: int, nxt: str) -> errors.NetworkError:
    return errors.NetworkError(
        f"The file listing of {repo_id} on {ctx.shown_endpoint} continues on another origin: page {page} links "
        f"its next page to {public_url(nxt, path=False)}. qtk sends the token to the endpoint only, and takes a "
        "listing from the endpoint only.",
        hint="Nothing was downloaded. The server (or a proxy in front of it) builds wrong links: check HF_ENDPOINT "
        "(scheme, host and port as the server knows itself), or report it.",
    )


def _loop(ctx: HubContext, repo_id: str, page: int, why: str) -> errors.NetworkError:
    return errors.NetworkError(
        f"The file listing of {repo_id} on {ctx.shown_endpoint} goes round in circles after {page} page(s): {why}.",
        hint="The server's pagination is broken; report it to its operators (qtk stops instead of looping).",
    )


def check_file_access(url: str, endpoint: str, token: str | None, policy: RetryPolicy, ctx: HubContext) -> None:
    """One HEAD on a file's resolve URL, as huggingface_hub's ``get_hf_file_metadata`` sends it (redirects
    on the endpoint's origin are followed, one to another origin is the answer: the token stays home)."""
    from huggingface_hub.utils import hf_raise_for_status

    what = f"Checking access to {ctx.filename}"
    headers = {**_headers(token), "Accept-Encoding": "identity"}

    def head():
        r = fetch("HEAD", url, headers=headers, policy=policy, what=what,
                  follow=lambda nxt: origin(nxt) == origin(endpoint))
        hf_raise_for_status(r)

    call_with_retries(what, head, policy, ctx)
