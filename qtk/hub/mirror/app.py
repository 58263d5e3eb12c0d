"""A Hub-compatible HTTP server over a :class:`MirrorStore`: the subset of the Hub API that
huggingface_hub (``snapshot_download``, ``hf_hub_download``, ``HfApi``), transformers and qtk use.

Routes::

    GET  /api/{models,datasets}/{ns}/{name}[/revision/{rev}]     repo info (id, sha, siblings)
    GET  /api/{models,datasets}/{ns}/{name}/tree/{rev}[/{path}]  ?recursive=&cursor= (paginated, Link)
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}                   bytes, Range, ETag, X-Repo-Commit
    HEAD/GET /datasets/{ns}/{name}/resolve/{rev}/{path}
    GET  /api/whoami-v2

Errors carry ``X-Error-Code`` / ``X-Error-Message`` as the Hub's do. Access control (optional) comes
from :class:`MirrorAuth`: tokens, private repos, gated repos with an allow list.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ... import __version__, errors
from .store import MirrorStore, RepoRevision, StoredFile

__all__ = ["MirrorAuth", "MirrorUser", "MirrorServer", "MirrorHandler", "load_auth"]

TREE_PAGE_SIZE = 1000
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class MirrorUser:
    name: str
    role: str = "read"
    orgs: tuple[str, ...] = ()
    fullname: str | None = None


@dataclass(frozen=True)
class RepoPolicy:
    private: bool = False
    gated: bool = False
    allow: frozenset[str] = frozenset()  # user or org names with access


@dataclass
class MirrorAuth:
    """Who may see what. An empty MirrorAuth serves everything to everyone and ignores tokens."""

    users: dict[str, MirrorUser] = field(default_factory=dict)  # sha256(token) -> user
    repos: dict[str, RepoPolicy] = field(default_factory=dict)  # "ns/name" (datasets: "datasets/ns/name")
    require_token: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def add_user(self, token: str, user: MirrorUser) -> None:
        self.users[hashlib.sha256(token.encode()).hexdigest()] = user

    def user_for(self, token: str) -> MirrorUser | None:
        return self.users.get(hashlib.sha256(token.encode()).hexdigest())

    def policy(self, repo_key: str) -> RepoPolicy:
        return self.repos.get(repo_key, RepoPolicy())


def load_auth(path: str | Path) -> MirrorAuth:
    """Read an access file (TOML)::

        require_token = false            # true: every request needs a valid token

        [[users]]
        name = "alice"
        token_sha256 = "..."             # or: token = "hf_..." (keep the file private then)
        role = "read"
        orgs = ["acme"]

        [repos."acme/llama-3-8b"]
        gated = true                     # listing is public, downloads need access
        allow = ["alice", "acme"]        # users or orgs with access

        [repos."acme/internal"]
        private = true
        allow = ["acme"]
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise errors.UsageError(f"Access file {path} not found.") from exc
    except tomllib.TOMLDecodeError as exc:
        raise errors.UsageError(f"Access file {path} is not valid TOML: {exc}") from exc
    auth = MirrorAuth(require_token=bool(data.get("require_token", False)))
    for i, u in enumerate(data.get("users", [])):
        if "name" not in u or not ("token" in u or "token_sha256" in u):
            raise errors.UsageError(f"{path}: users[{i}] needs 'name' and 'token' or 'token_sha256'.")
        user = MirrorUser(u["name"], u.get("role", "read"), tuple(u.get("orgs", ())), u.get("fullname"))
        digest = u.get("token_sha256") or hashlib.sha256(u["token"].encode()).hexdigest()
        auth.users[digest.lower()] = user
    for key, r in (data.get("repos") or {}).items():
        auth.repos[key] = RepoPolicy(bool(r.get("private")), bool(r.get("gated")), frozenset(r.get("allow", ())))
    return auth


class _HTTPError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        store: MirrorStore,
        *,
        auth: MirrorAuth | None = None,
        handler: type[BaseHTTPRequestHandler] | None = None,
        access_log: bool = False,
        tree_page_size: int = TREE_PAGE_SIZE,
        lfs_redirect_base: str | None = None,
    ) -> None:
        self.store = store
        self.auth = auth or MirrorAuth()
        self.access_log = access_log
        self.tree_page_size = tree_page_size
        # Optional: answer LFS resolves with a 302 to ``{base}/{sha256}`` (another host serving blobs,
        # as the Hub does with its CDN). The target must serve ``/{sha256}`` itself.
        self.lfs_redirect_base = lfs_redirect_base.rstrip("/") if lfs_redirect_base else None
        self.bytes_sent = 0
        self.requests = 0
        self._stats_mu = threading.Lock()
        super().__init__(address, handler or MirrorHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, nbytes: int = 0, request: bool = False) -> None:
        with self._stats_mu:
            self.bytes_sent += nbytes
            self.requests += int(request)

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="qtk-mirror", daemon=True)
        t.start()
        return t


class MirrorHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms stalls
    server_version = f"qtk-mirror/{__version__}"
    server: MirrorServer

    # -- plumbing -----------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.server.access_log:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        self.server.count(request=True)
        try:
            url = urlsplit(self.path)
            segs = [unquote(s) for s in url.path.split("/")[1:]]
            query = parse_qs(url.query)
            if segs[:2] == ["api", "whoami-v2"]:
                return self._whoami()
            if len(segs) >= 4 and segs[0] == "api" and segs[1] in ("models", "datasets"):
                return self._api(segs[1][:-1], segs[2:], query, head)
            if segs and segs[0] == "datasets" and len(segs) >= 6 and segs[3] == "resolve":
                return self._resolve("dataset", segs[1:], head)
            if len(segs) >= 5 and segs[2] == "resolve":
                return self._resolve("model", segs, head)
            raise _HTTPError(404, None, f"No route for {url.path}")
        except _HTTPError as exc:
            self._send_error(exc, head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_error(self, exc: _HTTPError, head: bool) -> None:
        body = json.dumps({"error": exc.message}).encode()
        self.send_response(exc.status)
        if exc.code:
            self.send_header("X-Error-Code", exc.code)
        self.send_header("X-Error-Message", exc.message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, obj, extra_headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra_headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    # -- auth ---------------------------------------------------------------------

    def _user(self):
        """(token given, user or None). Raises 401 for a token the mirror does not know."""
        header = self.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        auth = self.server.auth
        if not auth.enabled:
            return bool(token), None
        if not token:
            if auth.require_token:
                raise _HTTPError(401, None, "This mirror requires a token: run `qtk login`.")
            return False, None
        user = auth.user_for(token)
        if user is None:
            raise _HTTPError(401, None, INVALID_CREDENTIALS)
        return True, user

    def _check_repo(self, repo_type: str, repo_id: str, download: bool) -> None:
        auth = self.server.auth
        has_token, user = self._user()
        key = repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"
        policy = auth.policy(key)
        allowed = user is not None and (user.name in policy.allow or any(o in policy.allow for o in user.orgs))
        not_found = _HTTPError(401 if not has_token else 404, "RepoNotFound", f"Repository Not Found: {repo_id}")
        if not self.server.store.exists(repo_type, repo_id):
            raise not_found
        if policy.private and not allowed:
            raise not_found
        if policy.gated and download and not allowed:
            if not has_token:
                raise _HTTPError(401, "GatedRepo", f"Access to gated repo {repo_id} requires a token. Run `qtk login`.")
            raise _HTTPError(403, "GatedRepo", f"Access to gated repo {repo_id} is restricted: request access.")

    def _whoami(self) -> None:
        has_token, user = self._user()
        if user is None:  # no token, an unknown one, or a mirror without users (--access)
            raise _HTTPError(401, None, INVALID_CREDENTIALS)
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
                "name": user.name,
                "fullname": user.fullname or user.name,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "orgs": [{"type": "org", "name": o, "fullname": o} for o in user.orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": f"{user.name}-token", "role": user.role}},
            }
        )

    # -- API ----------------------------------------------------------------------

    def _revision(self, repo_type: str, repo_id: str, rev: str) -> RepoRevision:
        snap = self.server.store.revision(repo_type, repo_id, rev)
        if snap is None:
            raise _HTTPError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return snap

    def _api(self, repo_type: str, rest: list[str], query: dict, head: bool) -> None:
        repo_id = "/".join(rest[:2])
        tail = rest[2:]
        self._check_repo(repo_type, repo_id, download=False)
        if not tail or tail[0] == "revision":
            rev = tail[1] if len(tail) >= 2 else "main"
            return self._repo_info(repo_type, repo_id, self._revision(repo_type, repo_id, rev))
        if tail[0] == "tree" and len(tail) >= 2:
            snap = self._revision(repo_type, repo_id, tail[1])
            return self._tree(snap, "/".join(tail[2:]), query)
        raise _HTTPError(404, None, f"No route for {self.path}")

    def _repo_info(self, repo_type: str, repo_id: str, snap: RepoRevision) -> None:
        key = repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"
        policy = self.server.auth.policy(key)
        when = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(snap.last_modified))
        self._send_json(
            {
                "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                **({"modelId": repo_id} if repo_type == "model" else {}),
                "author": repo_id.split("/")[0],
                "sha": snap.commit,
                "lastModified": when,
                "createdAt": when,
                "private": policy.private,
                "gated": "manual" if policy.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(snap.files)],
            }
        )

    def _tree(self, snap: RepoRevision, path: str, query: dict) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = path.strip("/")
        entries: list[dict] = []
        dirs: set[str] = set()
        base = f"{prefix}/" if prefix else ""
        if prefix and prefix in snap.files:
            entries.append(snap.files[prefix].tree_entry())
        for p in sorted(snap.files):
            if not p.startswith(base):
                continue
            rel = p[len(base):]
            parts = rel.split("/")
            for i in range(1, len(parts)):  # directories on the way
                d = base + "/".join(parts[:i])
                if (recursive or i == 1) and d not in dirs:
                    dirs.add(d)
                    entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
            if recursive or len(parts) == 1:
                entries.append(snap.files[p].tree_entry())
        if prefix and not entries:
            raise _HTTPError(404, "EntryNotFound", f"{prefix} does not exist on {snap.commit}")
        size = self.server.tree_page_size
        start = int(query.get("cursor", ["0"])[0] or 0)
        page = entries[start : start + size]
        headers = {}
        if start + size < len(entries):
            host = self.headers.get("Host") or "%s:%d" % self.server.server_address[:2]
            qs = f"recursive={'True' if recursive else 'False'}&expand=False&cursor={start + size}"
            kind = "models" if snap.repo_type == "model" else "datasets"
            link = f"http://{host}/api/{kind}/{snap.repo_id}/tree/{quote(snap.commit, safe='')}"
            if prefix:
                link += "/" + quote(prefix)
            headers["Link"] = f'<{link}?{qs}>; rel="next"'
        self._send_json(page, headers)

    # -- files --------------------------------------------------------------------

    def _resolve(self, repo_type: str, segs: list[str], head: bool) -> None:
        repo_id = "/".join(segs[:2])
        rev, path = segs[3], "/".join(segs[4:])
        self._check_repo(repo_type, repo_id, download=True)
        snap = self._revision(repo_type, repo_id, rev)
        f = snap.files.get(path)
        if f is None:
            raise _HTTPError(404, "EntryNotFound", f"{path} does not exist on {snap.commit}")
        common = {
            "X-Repo-Commit": snap.commit,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(f.abspath.stat().st_mtime, usegmt=True),
        }
        if f.lfs:
            common["X-Linked-Etag"] = f'"{f.sha256}"'
            common["X-Linked-Size"] = str(f.size)
        if f.lfs and self.server.lfs_redirect_base:
            self.send_response(302)
            for k, v in common.items():
                self.send_header(k, v)
            self.send_header("Location", f"{self.server.lfs_redirect_base}/{f.sha256}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_file(f, common, head)

    def send_file(self, f: StoredFile, headers: dict[str, str], head: bool) -> None:
        """Answer a GET/HEAD for ``f`` honouring a single ``Range``."""
        size = f.size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        parsed = _parse_range(rng, size) if rng else None
        if parsed is False:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if parsed:
            start, end = parsed
            status = 206
        length = max(0, end - start + 1)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head or length == 0:
            return
        with open(f.abspath, "rb") as fh:
            self.send_bytes(fh.fileno(), start, length, f)

    def send_bytes(self, fd: int, offset: int, count: int, f: StoredFile) -> None:
        """Copy ``count`` bytes from ``fd`` at ``offset`` to the client (sendfile: no copies in Python)."""
        sock = self.connection
        while count > 0:
            sent = os.sendfile(sock.fileno(), fd, offset, min(count, 8 * 1024 * 1024))
            if sent == 0:
                raise BrokenPipeError
            offset += sent
            count -= sent
            self.server.count(sent)

    def reset_connection(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), as a dropped connection looks to a client."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()


def _parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (start, end).

    None: a form this server does not support (multiple ranges, other units): send the whole file.
    False: unsatisfiable (416).
    """
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size - 1) if n > 0 and size > 0 else False
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        return False
    return (start, min(end, size - 1))
