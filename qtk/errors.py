"""qtk's one error hierarchy, and the one table of exit codes.

Every error says what happened and what to do next (``hint``). Errors also subclass the
matching built-in, so callers may catch ``FileNotFoundError`` or the precise qtk type.

    QtkError                                   exit 1   (unexpected failures use it too)
    ├── UsageError (ValueError)                exit 2   bad arguments or options
    ├── GateFailedError                        exit 3   a qtk verify quality gate failed
    ├── HubError
    │   ├── AuthError (PermissionError)
    │   │   ├── NotLoggedInError               exit 10  no token, but the repo/command needs one
    │   │   ├── InvalidTokenError              exit 11  the endpoint rejected the token
    │   │   └── AccessDeniedError              exit 12  logged in, but no access (gated: request it)
    │   ├── RemoteNotFoundError (FileNotFoundError)
    │   │   ├── RepoNotFoundError              exit 13  no such repo, or private without access
    │   │   ├── RevisionNotFoundError          exit 14  no such branch, tag or commit
    │   │   ├── EntryNotFoundError             exit 15  no such file in the repo
    │   │   └── NothingMatchedError            exit 16  --include/--exclude matched no file
    │   ├── LocalNotFoundError (FileNotFoundError)  exit 17  offline and not in the cache
    │   ├── IntegrityError                     exit 20  hash/size mismatch after re-fetch
    │   ├── UnsafePathError (ValueError)       exit 21  a name that would become a path is malformed
    │   ├── LockTimeoutError (TimeoutError)    exit 22  another process holds the file lock
    │   └── NetworkError (ConnectionError)     exit 30  endpoint unreachable, retries exhausted
    ├── QuantizeError                          exit 50
    │   ├── BackendUnavailableError (ImportError) exit 50  backend library missing (install the extra)
    │   ├── UnsupportedConfigError (ValueError) exit 51  method cannot do what was asked
    │   ├── ModelFormatError (ValueError)      exit 52  not a causal LM, already quantized, bad dtype
    │   ├── OutputExistsError (FileExistsError) exit 53  output exists (use --overwrite)
    │   ├── CalibrationError (ValueError)      exit 54  calibration data unusable or too small
    │   └── ResourceError (MemoryError)        exit 55  out of memory (the hint says what to lower)
    ├── DiskSpaceError (OSError)               exit 40  not enough free space for the plan
    ├── NotWritableError (PermissionError)     exit 41  destination read-only or not writable
    └── ProvisionFailedError                   exit 60  qtk provision --keep-going: some models failed with errors

    KeyboardInterrupt                          exit 130 (partial downloads are kept for resume)
"""

from __future__ import annotations

import re

__all__ = [
    "QtkError",
    "UsageError",
    "HubError",
    "AuthError",
    "NotLoggedInError",
    "InvalidTokenError",
    "AccessDeniedError",
    "RemoteNotFoundError",
    "RepoNotFoundError",
    "RevisionNotFoundError",
    "EntryNotFoundError",
    "NothingMatchedError",
    "LocalNotFoundError",
    "IntegrityError",
    "UnsafePathError",
    "LockTimeoutError",
    "NetworkError",
    "DiskSpaceError",
    "NotWritableError",
    "GateFailedError",
    "QuantizeError",
    "BackendUnavailableError",
    "UnsupportedConfigError",
    "ModelFormatError",
    "OutputExistsError",
    "CalibrationError",
    "ResourceError",
    "ProvisionFailedError",
    "EXIT_INTERRUPTED",
    "exit_code_for",
    "exit_code_table",
    "redact",
]

EXIT_INTERRUPTED = 130

# What redact() hides, and only that (paths, JSON keys and package names stay intact):
# - the token values qtk read or was given (register_secret);
# - token-shaped strings: Hub user access tokens are "hf_" + 34 letters/digits, so "hf_" + 30 or more.
#   "/tmp/hf_cache" or "hf_token_env_set" are not tokens;
# - the value of an Authorization header (any scheme) and of "Bearer <credential>";
# - the password of credentials in a URL (http://user:pass@host).
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{30,}")
_AUTH_HEADER_RE = re.compile(
    r"""(?P<name>authorization['"]?\s*[:=]\s*['"]?)(?:(?P<scheme>bearer|basic|token|digest)\s+)?(?P<value>[^\s'",;}]+)""",
    re.IGNORECASE,
)
_BEARER_RE = re.compile(r"(?P<scheme>Bearer\s+)(?P<value>[A-Za-z0-9._~+/=-]{8,})")
_URL_CREDENTIALS_RE = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<password>[^/\s@]+)@")
_extra_secrets: set[str] = set()


def register_secret(secret: str | None) -> None:
    """Remember a token value so that :func:`redact` hides it wherever it appears (any shape, 8+ characters)."""
    if secret and len(secret) >= 8:
        _extra_secrets.add(secret)


def _auth_header(m: re.Match) -> str:
    scheme = f"{m.group('scheme')} " if m.group("scheme") else ""
    return f"{m.group('name')}{scheme}***"


def redact(text: str) -> str:
    """Hide credentials in ``text``: known token values, token-shaped strings, Authorization/Bearer values and
    passwords in URLs. Nothing else is touched."""
    for secret in sorted(_extra_secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _TOKEN_RE.sub("hf_***", text)
    text = _AUTH_HEADER_RE.sub(_auth_header, text)
    text = _BEARER_RE.sub(lambda m: f"{m.group('scheme')}***", text)
    text = _URL_CREDENTIALS_RE.sub(lambda m: f"{m.group('scheme')}{m.group('user')}:***@", text)
    return text


class QtkError(Exception):
    """Root of qtk's errors: a message (what happened) and a hint (what to do next)."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = self.message if not self.hint else f"{self.message}\n{self.hint}"
        return redact(text)

    def to_dict(self) -> dict:
        return {
            "error": type(self).__name__,
            "message": redact(self.message),
            "hint": redact(self.hint) if self.hint else None,
            "exit_code": self.exit_code,
        }


class UsageError(QtkError, ValueError):
    """Bad arguments or options."""

    exit_code = 2


class HubError(QtkError):
    """Something about the Hub (or a Hub-compatible endpoint) or the local cache."""


class AuthError(HubError, PermissionError):
    """Authentication or authorization failed."""

    exit_code = 10


class NotLoggedInError(AuthError):
    """No token, but the repo or command needs one."""

    exit_code = 10


class InvalidTokenError(AuthError):
    """The endpoint rejected the token."""

    exit_code = 11


class AccessDeniedError(AuthError):
    """Logged in, but without access to the repo (gated: request access)."""

    exit_code = 12


class RemoteNotFoundError(HubError, FileNotFoundError):
    """The endpoint says something does not exist."""

    exit_code = 13


class RepoNotFoundError(RemoteNotFoundError):
    """No such repo, or a private repo the token cannot see."""

    exit_code = 13


class RevisionNotFoundError(RemoteNotFoundError):
    """No such branch, tag or commit."""

    exit_code = 14


class EntryNotFoundError(RemoteNotFoundError):
    """No such file in the repo at that revision."""

    exit_code = 15


class NothingMatchedError(RemoteNotFoundError):
    """--include/--exclude patterns matched no file."""

    exit_code = 16


class LocalNotFoundError(HubError, FileNotFoundError):
    """Offline, and what was asked for is not in the local cache."""

    exit_code = 17


class IntegrityError(HubError):
    """Downloaded bytes do not match the advertised hash or size, even after a re-fetch."""

    exit_code = 20


class UnsafePathError(HubError, ValueError):
    """A name from the server or the command line (path, oid, commit, revision) is malformed or would leave the cache."""

    exit_code = 21


class LockTimeoutError(HubError, TimeoutError):
    """Another process held the file lock past --lock-timeout, or took over this process's lock."""

    exit_code = 22


class NetworkError(HubError, ConnectionError):
    """Endpoint unreachable, or transient errors outlasted the retries."""

    exit_code = 30


class GateFailedError(QtkError):
    """A quality gate of qtk verify failed (the message names the gate and the model)."""

    exit_code = 3


class QuantizeError(QtkError):
    """Quantization failed."""

    exit_code = 50


class BackendUnavailableError(QuantizeError, ImportError):
    """The backend library for this method is not installed (the hint names the extra)."""

    exit_code = 50


class UnsupportedConfigError(QuantizeError, ValueError):
    """The method cannot do what was asked (bits, group size, architecture, device)."""

    exit_code = 51


class ModelFormatError(QuantizeError, ValueError):
    """The input is not a usable checkpoint (not a causal LM, already quantized, bad dtype, missing files)."""

    exit_code = 52


class OutputExistsError(QuantizeError, FileExistsError):
    """The output directory exists (use --overwrite)."""

    exit_code = 53


class CalibrationError(QuantizeError, ValueError):
    """Calibration data is missing, unreadable, too small, or does not match its pinned digest."""

    exit_code = 54


class ResourceError(QuantizeError, MemoryError):
    """Out of GPU/CPU memory (the hint says what to lower)."""

    exit_code = 55


class DiskSpaceError(QtkError, OSError):
    """Not enough free disk space for the plan."""

    exit_code = 40


class NotWritableError(QtkError, PermissionError):
    """The destination (cache, local dir, output) is read-only or not writable by this user."""

    exit_code = 41


class ProvisionFailedError(QtkError):
    """qtk provision --keep-going: models failed with errors (their own codes are in the summary)."""

    exit_code = 60


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for ``exc`` (the single mapping the CLI uses)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, QtkError):
        return exc.exit_code
    return 1


def exit_code_table() -> list[tuple[int, str, str]]:
    """Rows of (exit code, error class, meaning) for the docs and ``qtk exit-codes``."""
    rows = [(0, "-", "Success.")]
    stack = [QtkError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__ == __name__ and cls.__doc__:
            rows.append((cls.exit_code, cls.__name__, cls.__doc__.strip().splitlines()[0]))
    rows.append((EXIT_INTERRUPTED, "KeyboardInterrupt", "Interrupted; partial downloads are kept for resume."))
    return sorted(rows)
