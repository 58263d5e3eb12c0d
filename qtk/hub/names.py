"""Validation of every name that comes from outside (a server, a user, a request) and may become a path.

One owner for these rules: ``qtk pull`` (server-supplied oids, commit shas, revisions, file paths),
the HF cache layout (``refs/<name>``, ``blobs/<oid>``, ``snapshots/<commit>``) and ``qtk serve``
(repo ids and revisions in request paths) all call these functions before a name touches the
filesystem.

Each ``check_*`` function raises :class:`qtk.errors.UnsafePathError` (a ``ValueError``) naming what was
refused; each ``is_*`` function answers without raising.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from .. import errors

__all__ = [
    "REPO_ID_MAX",
    "RESERVED_NAMESPACES",
    "repo_id_problem",
    "is_commit_sha",
    "is_oid",
    "is_repo_id",
    "is_ref_name",
    "is_repo_path",
    "check_commit_sha",
    "check_oid",
    "check_repo_id",
    "check_ref_name",
    "check_repo_path",
    "PATH_PART_MAX",
    "TOP_LEVEL_DOT_FILES",
    "pull_path_problem",
    "is_pull_path",
    "check_pull_path",
    "check_pull_tree",
    "tree_conflict",
    "is_hidden_part",
    "is_served_part",
]

REPO_ID_MAX = 96  # per part, as the Hub (huggingface_hub's validate_repo_id)
# first path words of the Hub's routes (and qtk serve's): never a model namespace there
RESERVED_NAMESPACES = frozenset({"api", "datasets", "models", "spaces"})
REF_NAME_MAX = 255
REPO_PATH_MAX = 1024
# Bytes (UTF-8) per part of a path qtk pull writes: the file systems' NAME_MAX (255) less room for the
# longest name qtk derives from a file name: ``<name>.lock.excl.released-<12 hex>`` (+32),
# ``.<name>.json.<pid>-<8 hex>.tmp`` (+27), ``<name>.qtk-part.state.json.tmp`` (+24).
PATH_PART_MAX = 200
# Dot files the Hub keeps at the top of repos (it creates .gitattributes in every one), inert as plain
# files; every other part starting with "." is tool state (.git, .cache/qtk, .cache/huggingface, .qtk ...).
TOP_LEVEL_DOT_FILES = frozenset({".gitattributes", ".gitignore"})

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_OID_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# The Hub's rules (huggingface_hub.utils.validate_repo_id), restricted to ASCII: letters, digits, "_-."
# per part; a part starts and ends with a letter, digit or "_"; no "--" and no ".."; not ".git".
_REPO_PART_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,%d}[A-Za-z0-9_])?" % (REPO_ID_MAX - 2))
# git check-ref-format: no control chars, space, ~ ^ : ? * [ \ DEL anywhere
_REF_FORBIDDEN_RE = re.compile(r"[\x00-\x20~^:?*\[\\\x7f]")
# names that are a served part without further checks (the common case, decided by one regex)
_PLAIN_PART_RE = re.compile(r"[A-Za-z0-9_\-+=,@~][A-Za-z0-9_.\-+=,@~ ]*")


def is_commit_sha(value: object) -> bool:
    """A full lowercase 40-hex commit sha (what the Hub returns and what snapshot folders are named)."""
    return isinstance(value, str) and _COMMIT_RE.fullmatch(value) is not None


def is_oid(value: object) -> bool:
    """A blob name: git blob sha1 (40 hex) or LFS sha256 (64 hex), lowercase."""
    return isinstance(value, str) and _OID_RE.fullmatch(value) is not None


def repo_id_problem(value: object, *, namespace: bool = False) -> str | None:
    """Why ``value`` is not a repo id by the Hub's rules, or None.

    The Hub's rules (huggingface_hub's ``validate_repo_id``, ASCII only): ``name`` or ``namespace/name``;
    each part 1 to 96 letters, digits, ``_``, ``-``, ``.``, starting and ending with a letter, digit or
    ``_``; no ``--`` or ``..`` anywhere; not ending in ``.git``.

    ``namespace=True``: the id of a repo that can exist, on the Hub or on ``qtk serve`` (a manifest's
    published repo, an access rule): ``namespace/name`` with a namespace that is not one of the words
    the Hub and the mirror route on (:data:`RESERVED_NAMESPACES`, in any case). A request for such an
    id is still well-formed (the mirror answers it "not found", as the Hub does)."""
    if not isinstance(value, str) or not value:
        return "empty"
    parts = value.split("/")
    if len(parts) > 2 or (namespace and len(parts) != 2):
        return "expected 'namespace/name'" if namespace else "expected 'name' or 'namespace/name'"
    if "--" in value or ".." in value:
        return "'--' and '..' are not allowed"
    if value.endswith(".git"):
        return "it may not end in '.git'"
    for part in parts:
        if len(part) > REPO_ID_MAX:
            return f"{part[:20]!r}... is {len(part)} characters (at most {REPO_ID_MAX} per part)"
        if not _REPO_PART_RE.fullmatch(part):
            return (f"{part!r}: only ASCII letters, digits, '_', '-' and '.', starting and ending with a letter, "
                    "digit or '_'")
    if namespace and parts[0].lower() in RESERVED_NAMESPACES:
        return f"{parts[0]!r} is a route on the Hub and on qtk serve, not a namespace"
    return None


def is_repo_id(value: object) -> bool:
    """``name`` or ``namespace/name`` by the Hub's rules (:func:`repo_id_problem`)."""
    return repo_id_problem(value) is None


def is_ref_name(value: object) -> bool:
    """A branch or tag name by git's rules (``git check-ref-format --allow-onelevel``), or a commit sha."""
    if not isinstance(value, str) or not value or len(value) > REF_NAME_MAX:
        return False
    if value == "@" or "@{" in value or ".." in value or "//" in value:
        return False
    if _REF_FORBIDDEN_RE.search(value) or not value.isascii():
        return False
    if value.startswith("/") or value.endswith(("/", ".", ".lock")):
        return False
    return all(part and not part.startswith(".") and not part.endswith(".lock") for part in value.split("/"))


def is_repo_path(value: object) -> bool:
    """A relative POSIX path inside a repo: no empty, ``.`` or ``..`` part, not absolute, no backslash,
    no NUL or other control character, no drive letter."""
    if not isinstance(value, str) or not value or len(value) > REPO_PATH_MAX:
        return False
    if value.startswith("/") or "\\" in value or re.match(r"^[A-Za-z]:", value):
        return False
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        return False
    parts = value.split("/")
    return all(p not in ("", ".", "..") for p in parts) and not PurePosixPath(value).is_absolute()


def pull_path_problem(value: object) -> str | None:
    """Why a repo path from a server may not become a file that ``qtk pull`` writes, or None.

    The rule, for ``--local-dir`` and the cache alike: :func:`is_repo_path` (relative, no empty, ``.``
    or ``..`` part, no backslash, NUL or control character), valid UTF-8 (no lone surrogate), every
    part at most :data:`PATH_PART_MAX` bytes, and no part that starts with ``.``, except the files of
    :data:`TOP_LEVEL_DOT_FILES` at the top. A listing can therefore never reach ``.git/`` (a checkout's
    config and hooks run commands), ``.cache/qtk`` or ``.cache/huggingface`` (qtk's and hf's own
    records) or any other tool's state, wherever ``--local-dir`` points. ``qtk serve`` hides every
    dot name from its listings: what one qtk serves, another pulls."""
    if not is_repo_path(value):
        return "it is empty or absolute, or has an empty, '.' or '..' part, a backslash or a control character"
    assert isinstance(value, str)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    parts = value.split("/")
    for part in parts:
        size = len(part.encode("utf-8"))
        if size > PATH_PART_MAX:
            return (f"a part is {size} bytes long; qtk writes at most {PATH_PART_MAX} bytes per part (the file "
                    "system's 255, less room for the suffixes of qtk's own records)")
    for part in parts:
        if part.startswith(".") and not (len(parts) == 1 and part in TOP_LEVEL_DOT_FILES):
            return (f"{part!r} starts with '.': names like .git, .cache or .qtk hold the state of git and other "
                    f"tools, which a download never writes (only {', '.join(sorted(TOP_LEVEL_DOT_FILES))} at the top)")
    return None


def is_pull_path(value: object) -> bool:
    """A repo path ``qtk pull`` may write (:func:`pull_path_problem`)."""
    return pull_path_problem(value) is None


def is_hidden_part(part: str) -> bool:
    """A file or directory name ``qtk serve`` never lists, at any depth, and skips without a warning:
    one that starts with ``.`` (``.git``, ``.cache``, ``.qtk-provision``, ``.qtk-serve``, and also the
    top-level ``.gitattributes``/``.gitignore`` that :func:`pull_path_problem` would accept)."""
    return part.startswith(".")


def is_served_part(part: str) -> bool:
    """A file or directory name that is not hidden (:func:`is_hidden_part`) and that ``qtk serve`` lists:
    valid UTF-8 and a repo path on its own (:func:`is_repo_path`: not empty, ``.`` or ``..``, no
    backslash, control character or leading drive letter). A served path (at most
    :data:`REPO_PATH_MAX` characters) is one whose every part is served.

    Against :func:`pull_path_problem` (what one qtk serves, another pulls): every served path whose
    parts are at most :data:`PATH_PART_MAX` bytes is one ``qtk pull`` writes; longer parts (up to the
    file system's 255) are served, for clients that keep no records beside a file (``hf download``)."""
    if _PLAIN_PART_RE.fullmatch(part):
        return True
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "/" not in part and is_repo_path(part)


def _refuse(kind: str, value: object, why: str) -> errors.UnsafePathError:
    shown = value if isinstance(value, str) and len(value) <= 120 else f"{str(value)[:120]}..."
    return errors.UnsafePathError(
        f"Refusing the {kind} {shown!r}: {why}.",
        hint="Nothing was written. If a server sent it, the endpoint is broken or hostile: report it.",
    )


def check_commit_sha(value: object, *, what: str = "commit sha") -> str:
    if not is_commit_sha(value):
        raise _refuse(what, value, "a commit must be 40 lowercase hex characters")
    return value  # type: ignore[return-value]


def check_oid(value: object, *, what: str = "file oid") -> str:
    if not is_oid(value):
        raise _refuse(what, value, "a blob id must be a 40-hex git sha1 or a 64-hex sha256")
    return value  # type: ignore[return-value]


def check_repo_id(value: object, *, namespace: bool = False) -> str:
    if why := repo_id_problem(value, namespace=namespace):
        raise _refuse("repo id", value, why)
    return value  # type: ignore[return-value]


def check_ref_name(value: object, *, what: str = "revision") -> str:
    if not is_ref_name(value):
        raise _refuse(what, value, "not a valid git branch or tag name (no '..', '~', '^', ':', spaces, "
                                   "leading '.', trailing '/' or '.lock')")
    return value  # type: ignore[return-value]


def check_repo_path(value: object) -> str:
    if not is_repo_path(value):
        raise _refuse("remote file name", value, "it is empty, absolute, or contains '..', '.', '\\' or a "
                                                 "control character")
    return value  # type: ignore[return-value]


def check_pull_path(value: object) -> str:
    """``value`` if ``qtk pull`` may write it (:func:`pull_path_problem`), else UnsafePathError."""
    if why := pull_path_problem(value):
        err = _refuse("remote file name", value, why)
        if "starts with '.'" in why:  # a real repo may carry such files: the rest can still be pulled
            err.hint = ("Nothing was written. To pull the other files, leave it out with --exclude (e.g. "
                        "--exclude '.*' --exclude '*/.*'); if you did not expect it, report it to the endpoint.")
        raise err
    return value  # type: ignore[return-value]


def tree_conflict(paths) -> tuple[str, str] | None:
    """Two of ``paths`` that cannot both be files: the same path twice, or a path that another one needs
    as a directory (``a`` and ``a/b``, in either order); None if they can all be files at once."""
    seen: set[str] = set()
    for path in paths:
        if path in seen:
            return path, path
        seen.add(path)
    for path in sorted(seen):
        parts = path.split("/")
        for i in range(1, len(parts)):
            if (parent := "/".join(parts[:i])) in seen:
                return parent, path
    return None


def check_pull_tree(paths) -> None:
    """Refuse repo paths that cannot all be files at once (:func:`tree_conflict`): UnsafePathError."""
    if conflict := tree_conflict(paths):
        a, b = conflict
        why = "it is listed twice" if a == b else f"{a!r} is listed as a file, so it cannot also be a directory"
        raise _refuse("remote file name", b, why)
