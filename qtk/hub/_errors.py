"""Translate huggingface_hub's (and the HTTP stack's) exceptions into qtk errors, at one boundary."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

from .. import errors

__all__ = ["HubContext", "map_hub_errors", "error_for_status", "public_url", "public_text"]

_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")


def public_url(url: str, *, path: bool = True) -> str:
    """``url`` as qtk may print it: no ``user:password@``, no query (a signed URL's query is a
    credential), no fragment; with ``path=False`` only the origin."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return public_text(url.split("?", 1)[0])
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path if path else "", "", ""))


def public_text(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it removed."""
    return _USERINFO_RE.sub(r"\1", text)


@dataclass(frozen=True)
class HubContext:
    """What an error message needs to say something useful."""

    endpoint: str
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    has_token: bool = False

    @property
    def shown_endpoint(self) -> str:
        """The endpoint as messages show it: without credentials (``http://user:pass@host``)."""
        return public_url(self.endpoint)

    @property
    def repo_url(self) -> str:
        return f"{self.shown_endpoint}/{self.repo_id}"


def error_for_status(
    status: int, error_code: str | None, error_message: str | None, ctx: HubContext
) -> errors.QtkError:
    """The qtk error for an HTTP error answer from a Hub(-compatible) endpoint.

    Used both for huggingface_hub's typed errors (metadata) and for qtk's own byte path.
    """
    repo = ctx.repo_id or "?"
    if error_message == "Invalid credentials in Authorization header" or error_code == "InvalidToken":
        return errors.InvalidTokenError(
            f"{ctx.shown_endpoint} rejected the token (401 invalid credentials).",
            hint="Run `qtk login` with a valid token, or unset/fix HF_TOKEN.",
        )
    if error_code == "GatedRepo":
        if status == 401 or not ctx.has_token:
            return errors.NotLoggedInError(
                f"{repo} is a gated repo and you are not logged in.",
                hint=f"Run `qtk login` (or set HF_TOKEN) with a token that has access to {ctx.repo_url}.",
            )
        return errors.AccessDeniedError(
            f"Your token does not have access to the gated repo {repo} (403).",
            hint=f"Request access at {ctx.repo_url} and wait for approval, then re-run.",
        )
    if error_code == "RevisionNotFound":
        return errors.RevisionNotFoundError(
            f"Revision {ctx.revision!r} not found in {repo}.",
            hint="Check the branch, tag or commit sha (see the repo's 'Files' page or `git ls-remote`).",
        )
    if error_code == "EntryNotFound":
        return errors.EntryNotFoundError(
            f"File {ctx.filename!r} not found in {repo} at revision {ctx.revision!r}.",
            hint="Check the file name; `qtk pull --dry-run` lists the files the repo has.",
        )
    if ctx.repo_id is None and status == 401:  # e.g. whoami
        return errors.InvalidTokenError(
            f"{ctx.shown_endpoint} did not accept the token (401{': ' + error_message if error_message else ''}).",
            hint="Run `qtk login` with a valid token, or unset/fix HF_TOKEN.",
        )
    if error_code == "RepoNotFound" or status in (401, 404) and ctx.filename is None:
        login_hint = "" if ctx.has_token else " If it is private, run `qtk login` first."
        return errors.RepoNotFoundError(
            f"Repository {repo} not found at {ctx.shown_endpoint} (or it is private and your token cannot see it).",
            hint=f"Check the repo id (namespace/name).{login_hint}",
        )
    if status == 401:
        return errors.NotLoggedInError(
            f"{ctx.shown_endpoint} requires authentication for {repo}.", hint="Run `qtk login` (or set HF_TOKEN)."
        )
    if status == 403:
        return errors.AccessDeniedError(
            f"Access to {repo} was refused (403){': ' + error_message if error_message else ''}.",
            hint="Make sure your token has read permission for this repo.",
        )
    if status == 404:
        return errors.EntryNotFoundError(
            f"File {ctx.filename!r} not found in {repo} at revision {ctx.revision!r}.",
            hint="`qtk pull --dry-run` lists the files the repo has.",
        )
    return errors.NetworkError(
        f"{ctx.shown_endpoint} answered HTTP {status}{': ' + error_message if error_message else ''}.",
        hint="This is likely a server-side problem; retry later.",
    )


@contextlib.contextmanager
def map_hub_errors(ctx: HubContext) -> Iterator[None]:
    """Turn huggingface_hub / HTTP exceptions raised inside the block into qtk errors."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except errors.QtkError:
        raise
    except hf_errors.OfflineModeIsEnabled as exc:
        raise errors.LocalNotFoundError(
            "HF_HUB_OFFLINE is set, so the endpoint was not contacted.", hint="Unset HF_HUB_OFFLINE to go online."
        ) from exc
    except hf_errors.HfHubHTTPError as exc:
        response = exc.response
        status = response.status_code if response is not None else 0
        headers = response.headers if response is not None else {}
        code = headers.get("X-Error-Code")
        message = headers.get("X-Error-Message")
        if code is None:
            # huggingface_hub already classified the error: keep its verdict.
            if isinstance(exc, hf_errors.GatedRepoError):
                code = "GatedRepo"
            elif isinstance(exc, hf_errors.RevisionNotFoundError):
                code = "RevisionNotFound"
            elif isinstance(exc, hf_errors.RemoteEntryNotFoundError):
                code = "EntryNotFound"
            elif isinstance(exc, hf_errors.RepositoryNotFoundError):
                code = "RepoNotFound"
        raise error_for_status(status, code, message, ctx) from exc
    except hf_errors.HTTPError as exc:  # transport: connect/read errors, timeouts
        raise errors.NetworkError(
            f"Could not reach {ctx.shown_endpoint}: {type(exc).__name__}: {public_text(str(exc))}",
            hint="Check HF_ENDPOINT and your network; set HF_HUB_OFFLINE=1 to use only the local cache.",
        ) from exc
    except OSError as exc:
        if isinstance(exc, (ConnectionError, TimeoutError)):
            raise errors.NetworkError(
                f"Could not reach {ctx.shown_endpoint}: {public_text(str(exc))}",
                hint="Check HF_ENDPOINT and your network.",
            ) from exc
        raise
