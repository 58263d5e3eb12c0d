"""The one parser of ``qtk serve`` request targets: decode once, then validate, before anything is looked up.

What it guarantees to the routes (everything else is refused with :class:`Rejected`, a Hub-style error):

* the raw target is origin-form (``/...``), printable ASCII, at most ``MAX_TARGET`` characters;
* each ``/``-separated segment is percent-decoded exactly once, as strict UTF-8 (``%252e`` stays the
  literal ``%2e``: nothing is ever decoded twice);
* no decoded segment holds NUL, another control character or a backslash, and none is empty, ``.`` or
  ``..`` (one trailing ``/`` is allowed on API routes);
* route words (``api``, ``models``, ``resolve``, ``tree`` ...) match exactly;
* the repo id is two segments, ``namespace/name``, each by the Hub's rules (:func:`qtk.hub.names.is_repo_id`),
  so an encoded ``/`` (``%2F``), ``.``, ``..``, ``--`` or an empty part can never be part of it;
* the revision is one segment, a git ref name or a commit sha (:func:`~qtk.hub.names.is_ref_name`); as on
  the Hub, ``refs/pr/1`` arrives as ``refs%2Fpr%2F1``;
* the file path (resolve, tree) is the decoded segments joined with ``/`` and must be a clean relative
  repo path (:func:`~qtk.hub.names.is_repo_path`: no empty, ``.`` or ``..`` part). huggingface_hub sends a
  tree path as one segment with ``%2F``; both spellings give the same validated path;
* query: at most 16 fields, strict UTF-8, ``cursor`` a non-negative integer;
* a paths-info body (the one POST): at most 256 KiB and 1,000 paths, each a clean repo path; JSON nested
  deeper than the decoder allows is a 400 like any other malformed body.

The parser never touches the filesystem: the path it returns is only a key into the store's listing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote_to_bytes

from ..hub.names import is_ref_name, is_repo_id, is_repo_path

__all__ = ["MAX_TARGET", "Rejected", "MirrorRequest", "parse_target", "parse_paths_body", "safe_header"]

MAX_TARGET = 8192
MAX_QUERY_FIELDS = 16
MAX_CURSOR_DIGITS = 12
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]*")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
REPO_KINDS = {"models": "model", "datasets": "dataset"}


class Rejected(Exception):
    """A request refused before any lookup: status, X-Error-Code, message (the message never echoes
    raw request bytes; :func:`safe_header` still cleans it before it becomes a header)."""

    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _bad(what: str) -> Rejected:
    return Rejected(400, "BadRequest", f"Bad request: {what}.")


@dataclass(frozen=True)
class MirrorRequest:
    """A validated request. ``route`` is one of ``whoami``, ``info``, ``tree``, ``paths-info``, ``resolve``."""

    route: str
    repo_type: str = "model"
    repo_id: str = ""  # "ns/name" as spelled by the client (validated; the store canonicalizes the case)
    revision: str = "main"
    path: str = ""  # "" = the repo root (info, tree)
    query: dict[str, str] = field(default_factory=dict)

    @property
    def recursive(self) -> bool:
        return self.query.get("recursive", "false").lower() in ("1", "true")

    @property
    def cursor(self) -> int:
        return int(self.query.get("cursor") or 0)


def _decode_segment(raw: str) -> str:
    try:
        seg = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("a path segment is not valid UTF-8 after percent-decoding") from None
    if _BAD_CHARS.search(seg):
        raise _bad("a path segment contains a control character, NUL or backslash")
    return seg


def _parse_query(raw: str) -> dict[str, str]:
    if not raw:
        return {}
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=False, errors="strict",
                          max_num_fields=MAX_QUERY_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise _bad("the query string is malformed or has too many fields") from None
    query = {k: v for k, v in pairs}
    cursor = query.get("cursor")
    if cursor is not None and cursor != "" and not (cursor.isascii() and cursor.isdigit()
                                                      and len(cursor) <= MAX_CURSOR_DIGITS):
        raise _bad("cursor must be a non-negative integer")
    return query


def _repo_id(ns: str, name: str) -> str:
    repo_id = f"{ns}/{name}"
    if "/" in ns or "/" in name or not is_repo_id(repo_id):
        raise Rejected(400, "BadRequest", "Bad request: invalid repo id (expected 'namespace/name' by the Hub's rules).")
    return repo_id


def _revision(rev: str) -> str:
    if not is_ref_name(rev):
        raise Rejected(400, "BadRequest", "Bad request: invalid revision (a branch, tag or commit sha).")
    return rev


def _repo_path(parts: list[str], *, allow_empty: bool) -> str:
    path = "/".join(parts)
    if path == "" and allow_empty:
        return ""
    if not is_repo_path(path):
        raise Rejected(400, "BadRequest", "Bad request: invalid file path (empty, '.', '..' or control characters).")
    return path


def parse_target(target: str) -> MirrorRequest:
    """Parse a request target (``self.path`` of the request line) into a :class:`MirrorRequest`."""
    if len(target) > MAX_TARGET:
        raise Rejected(414, "BadRequest", "Request target too long.")
    if not target.startswith("/") or not _PRINTABLE_ASCII.fullmatch(target):
        raise _bad("the target must be an absolute path of printable ASCII (percent-encode the rest)")
    raw_path, _, raw_query = target.partition("?")
    raw_path = raw_path.partition("#")[0]
    query = _parse_query(raw_query.partition("#")[0])
    segs = [_decode_segment(s) for s in raw_path[1:].split("/")]
    for i, seg in enumerate(segs):
        if seg in (".", "..") or (seg == "" and i != len(segs) - 1):
            raise _bad("empty, '.' and '..' path segments are not allowed")
    return _route(segs, query)


def _route(segs: list[str], query: dict[str, str]) -> MirrorRequest:
    if segs == ["api", "whoami-v2"]:
        return MirrorRequest("whoami", query=query)
    if len(segs) >= 4 and segs[0] == "api" and segs[1] in REPO_KINDS:
        return _api_route(REPO_KINDS[segs[1]], segs[2:], query)
    repo_type = "model"
    if segs and segs[0] == "datasets":
        repo_type, segs = "dataset", segs[1:]
    if len(segs) >= 5 and segs[2] == "resolve":
        repo_id = _repo_id(segs[0], segs[1])
        return MirrorRequest("resolve", repo_type, repo_id, _revision(segs[3]),
                             _repo_path(segs[4:], allow_empty=False), query)
    raise Rejected(404, "NotFound", "No such route on this mirror.")


def _api_route(repo_type: str, rest: list[str], query: dict[str, str]) -> MirrorRequest:
    if len(rest) > 2 and rest[-1] == "":  # one trailing slash on an API route is harmless
        rest = rest[:-1]
    repo_id = _repo_id(rest[0], rest[1])
    tail = rest[2:]
    if not tail:
        return MirrorRequest("info", repo_type, repo_id, "main", "", query)
    if tail[0] == "revision" and len(tail) == 2:
        return MirrorRequest("info", repo_type, repo_id, _revision(tail[1]), "", query)
    if tail[0] == "paths-info" and len(tail) == 2:
        return MirrorRequest("paths-info", repo_type, repo_id, _revision(tail[1]), "", query)
    if tail[0] == "tree" and len(tail) >= 2:
        return MirrorRequest("tree", repo_type, repo_id, _revision(tail[1]),
                             _repo_path(tail[2:], allow_empty=True), query)
    raise Rejected(404, "NotFound", "No such route on this mirror.")


MAX_BODY = 256 * 1024
MAX_PATHS = 1000


def parse_paths_body(body: bytes, content_type: str) -> list[str]:
    """The ``paths`` of a paths-info POST (form-encoded as huggingface_hub sends it, or JSON), validated."""
    try:
        text = body.decode("utf-8")
        if content_type.split(";")[0].strip().lower() == "application/json":
            doc = json.loads(text)
            paths = doc.get("paths") if isinstance(doc, dict) else None
            paths = [paths] if isinstance(paths, str) else paths
        else:
            paths = [v for k, v in parse_qsl(text, keep_blank_values=True, errors="strict",
                                             max_num_fields=MAX_PATHS + 8) if k == "paths"]
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        raise _bad("the paths-info body is not valid form data or JSON") from None
    if not isinstance(paths, list) or not paths or len(paths) > MAX_PATHS:
        raise _bad(f"paths-info takes 1 to {MAX_PATHS} paths")
    for p in paths:
        if not isinstance(p, str) or not is_repo_path(p.strip("/")) or _BAD_CHARS.search(p):
            raise Rejected(400, "BadRequest", "Bad request: invalid file path (empty, '.', '..' or control characters).")
    return [p.strip("/") for p in paths]


def safe_header(text: str, limit: int = 300) -> str:
    """A header value from text that may contain request data: printable ASCII only (anything else,
    CR and LF included, becomes '?'), at most ``limit`` characters."""
    out = "".join(c if " " <= c <= "~" else "?" for c in str(text)[:limit])
    return out
