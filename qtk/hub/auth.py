"""Tokens: lookup order, login (validated before it is stored), logout, whoami.

The token lives where huggingface_hub reads it (``$HF_HOME/token``, or ``HF_TOKEN_PATH``), with
mode 0600, so ``hf``, transformers and qtk share one login. ``HF_TOKEN`` overrides the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import errors
from .._fs import write_atomic
from ..settings import Settings
from ._errors import HubContext, map_hub_errors, public_url

__all__ = ["Token", "Identity", "get_token", "login", "logout", "whoami"]


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # "HF_TOKEN" or the token file path

    def __repr__(self) -> str:  # never show the value, even in a traceback
        return f"Token(source={self.source!r})"


@dataclass(frozen=True)
class Identity:
    name: str
    fullname: str | None
    kind: str  # "user" or "org"
    role: str | None  # token role: read, write, fineGrained
    token_name: str | None
    orgs: tuple[str, ...]
    endpoint: str
    token_source: str

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "fullname": self.fullname,
            "type": self.kind,
            "token_role": self.role,
            "token_name": self.token_name,
            "orgs": list(self.orgs),
            "endpoint": self.endpoint,
            "token_source": self.token_source,
        }


def get_token(settings: Settings) -> Token | None:
    """``HF_TOKEN`` first, then the token file (huggingface_hub's order)."""
    if settings.env_token:
        errors.register_secret(settings.env_token)
        return Token(settings.env_token, "HF_TOKEN")
    try:
        value = settings.token_path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except PermissionError as exc:
        raise errors.AuthError(
            f"Cannot read the token file {settings.token_path}: {exc.strerror}.",
            hint="Fix its permissions (chmod 600) or run `qtk login` again.",
        ) from exc
    if not value:
        return None
    errors.register_secret(value)
    return Token(value, str(settings.token_path))


AUTH_ATTEMPTS = 2  # a person is waiting: one retry after a timeout or a 5xx, then a clear error


def _whoami(settings: Settings, token: Token) -> Identity:
    """``GET /api/whoami-v2`` with huggingface_hub's headers and error classes on qtk's metadata client, the
    metadata timeouts of :class:`~qtk.hub._retry.RetryPolicy` (``HF_HUB_ETAG_TIMEOUT``, default 30 s to answer, 10 s
    to connect) and its bounds on a whole answer (``QTK_METADATA_DEADLINE``, ``QTK_METADATA_MAX_BYTES``:
    :func:`~qtk.hub._metadata.fetch`): huggingface_hub's ``whoami`` has none and waits forever on a server
    that never answers, or drips.
    A server that does not answer in time is a :class:`~qtk.errors.NetworkError` naming the endpoint."""
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    from .. import __version__
    from ._metadata import call_with_retries, fetch
    from ._retry import RetryPolicy

    ctx = HubContext(settings.endpoint, has_token=True)
    policy = RetryPolicy.from_env(attempts=AUTH_ATTEMPTS)
    headers = build_hf_headers(token=token.value, library_name="qtk", library_version=__version__)

    def get():
        r = fetch("GET", f"{settings.endpoint}/api/whoami-v2", headers=headers, policy=policy,
                  what="Checking the token")
        hf_raise_for_status(r)
        return r

    with map_hub_errors(ctx):
        r = call_with_retries("Checking the token", get, policy, ctx)
    try:
        info = r.json()
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise errors.NetworkError(f"{ctx.shown_endpoint}/api/whoami-v2 did not answer a JSON object.",
                                  hint="Check HF_ENDPOINT: it should be a Hub or a Hub-compatible server.")
    access = (info.get("auth") or {}).get("accessToken") or {}
    return Identity(
        name=info.get("name", "?"),
        fullname=info.get("fullname"),
        kind=info.get("type", "user"),
        role=access.get("role"),
        token_name=access.get("displayName"),
        orgs=tuple(o.get("name", "?") for o in info.get("orgs") or []),
        endpoint=public_url(settings.endpoint),
        token_source=token.source,
    )


def whoami(settings: Settings) -> Identity:
    token = get_token(settings)
    if token is None:
        raise errors.NotLoggedInError(
            f"Not logged in (no HF_TOKEN and no token file at {settings.token_path}).",
            hint="Run `qtk login`.",
        )
    return _whoami(settings, token)


def login(settings: Settings, token_value: str) -> Identity:
    """Validate ``token_value`` against the endpoint's whoami, then store it (mode 0600)."""
    token_value = token_value.strip()
    if not token_value:
        raise errors.UsageError("The token is empty.", hint="Create one at <endpoint>/settings/tokens.")
    errors.register_secret(token_value)
    identity = _whoami(settings, Token(token_value, str(settings.token_path)))
    write_atomic(settings.token_path, token_value, mode=0o600)  # private from the first byte, durable
    return identity


def logout(settings: Settings) -> bool:
    """Delete the token file. Returns whether there was one."""
    try:
        settings.token_path.unlink()
        return True
    except FileNotFoundError:
        return False
