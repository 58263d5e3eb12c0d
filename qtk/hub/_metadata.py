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
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar
from urllib.parse import quote

from .. import __version__, errors
from ._errors import HubContext, public_url
from ._origin import origin
from ._retry import RETRY_STATUS, RetryPolicy, parse_retry_after
from .cache import RemoteFile

__all__ = ["repo_commit", "list_repo_files", "check_file_access", "call_with_retries"]

T = TypeVar("T")
MAX_PAGES_WITHOUT_NEWS = 3  # pages in a row that add no entry: the cursor is going round


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
        except (httpx2.NetworkError, httpx2.RemoteProtocolError):
            if attempt == policy.attempts:
                raise
            sleep(policy.backoff(attempt))
    raise AssertionError("unreachable")


def _get_json(url: str, params: dict | None, headers: dict, what: str, policy: RetryPolicy, ctx: HubContext):
    """GET ``url`` on huggingface_hub's client (its errors, its headers), bounded and retried."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    def get():
        r = get_session().get(url, params=params, headers=headers, timeout=_timeout(policy))
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
    """One HEAD on a file's resolve URL (redirects to another origin are not followed)."""
    from huggingface_hub import get_hf_file_metadata

    call_with_retries(
        f"Checking access to {ctx.filename}",
        lambda: get_hf_file_metadata(url, token=token or False, endpoint=endpoint, timeout=_timeout(policy)),
        policy, ctx,
    )
