"""A Hub-compatible HTTP server over a :class:`MirrorStore`: the subset of the Hub API that
huggingface_hub (``snapshot_download``, ``hf_hub_download``, ``HfApi``), transformers and qtk use.

Routes (GET and HEAD, and the one POST, paths-info; anything else is 405)::

    GET  /api/{models,datasets}/{ns}/{name}[/revision/{rev}]     repo info (id, sha, siblings)
    GET  /api/{models,datasets}/{ns}/{name}/tree/{rev}[/{path}]  ?recursive=&cursor= (paginated, Link)
    POST /api/{models,datasets}/{ns}/{name}/paths-info/{rev}     paths=...&paths=... (form or JSON)
    HEAD/GET /{ns}/{name}/resolve/{rev}/{path}                   bytes, Range, ETag, X-Repo-Commit
    HEAD/GET /datasets/{ns}/{name}/resolve/{rev}/{path}
    GET  /api/whoami-v2

Every request target goes through :func:`~qtk.mirror.request.parse_target` first (decode once,
validate); every repo route then asks one question, :meth:`MirrorHandler._repo`, on the repo's canonical
id (type + ``ns/name`` as spelled on disk; ids are case-insensitive, as on the Hub). Errors carry
``X-Error-Code`` / ``X-Error-Message`` as the Hub's do; header values are printable ASCII only. An
unexpected exception is logged and answered with a JSON 500. Access control (optional) comes from
:class:`MirrorAuth`: tokens, private repos, gated repos with an allow list.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import stat as stat_mod
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate, mktime_tz, parsedate_tz
from pathlib import Path
from urllib.parse import quote

from .. import __version__, errors
from ..tomlcheck import Array, read_toml
from ..hub.names import repo_id_problem
from .hashindex import file_key
from .request import MAX_BODY, MirrorRequest, Rejected, parse_paths_body, parse_target, safe_header
from .server import PooledHTTPServer, PooledRequestHandler
from .store import MirrorStore, RepoEntry, RepoRevision, StoredFile

__all__ = ["MirrorAuth", "MirrorUser", "MirrorServer", "MirrorHandler", "RepoPolicy", "load_auth"]

log = logging.getLogger("qtk.mirror")

TREE_PAGE_SIZE = 1000
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.\-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


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
    """Who may see what. An empty MirrorAuth serves everything to everyone and ignores tokens.

    ``repos`` keys are ``ns/name`` (models) or ``datasets/ns/name``, matched case-insensitively (as repo
    ids are on the Hub); when several keys match one repo, the strictest wins."""

    users: dict[str, MirrorUser] = field(default_factory=dict)  # sha256(token) -> user
    repos: dict[str, RepoPolicy] = field(default_factory=dict)
    require_token: bool = False
    source: Path | None = None  # the access file: never served, wherever it lives

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def add_user(self, token: str, user: MirrorUser) -> None:
        self.users[hashlib.sha256(token.encode()).hexdigest()] = user

    def user_for(self, token: str) -> MirrorUser | None:
        return self.users.get(hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest())

    def policy(self, repo_key: str) -> RepoPolicy:
        wanted = repo_key.lower()
        hits = [p for k, p in self.repos.items() if k.lower() == wanted]
        if len(hits) <= 1:
            return hits[0] if hits else RepoPolicy()
        allow = frozenset.intersection(*(p.allow for p in hits))
        return RepoPolicy(any(p.private for p in hits), any(p.gated for p in hits), allow)


_ACCESS_TOP = {"require_token": bool, "users": Array(dict), "repos": dict}
_ACCESS_USER = {"name": str, "token": str, "token_sha256": str, "role": str, "orgs": Array(str), "fullname": str}
_ACCESS_REPO = {"private": bool, "gated": bool, "allow": Array(str)}
_ROLES = ("read", "write", "fineGrained")  # the token roles the Hub's whoami reports
_ACCESS_HINT = ("Fix the access file (format: README.md, `qtk serve`): the mirror does not start with a rule it "
                "cannot read.")


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

    Fails closed: read with the manifests' checker (:mod:`qtk.tomlcheck`: size and nesting bounded), an
    unknown key (``privat``), a value of the wrong type (``allow = "acme"``), a repo key that names no repo,
    two keys for one repo (repo keys are case-insensitive), two users with one token, and ``require_token``
    without any user (no token could pass) are refused with the file, line and field: the server does not
    start."""
    data, c = read_toml(path, what="Access file", hint=_ACCESS_HINT)
    c.table(data, _ACCESS_TOP, ())
    auth = MirrorAuth(require_token=data.get("require_token", False), source=Path(path))
    for i, u in enumerate(data.get("users", [])):
        up = ("users", i)
        c.table(u, _ACCESS_USER, up, required=("name",))
        if not u["name"] or ("token" in u) == ("token_sha256" in u):
            raise c.fail(up, "needs a non-empty 'name' and one of 'token' or 'token_sha256'.")
        if u.get("role", "read") not in _ROLES:
            raise c.fail(up + ("role",), f"must be one of {', '.join(_ROLES)} (got {u['role']!r}).")
        digest = u["token_sha256"].lower() if "token_sha256" in u else hashlib.sha256(u["token"].encode()).hexdigest()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise c.fail(up + ("token_sha256",), "must be the 64 hex digits of the token's sha256.")
        if digest in auth.users:
            raise c.fail(up, f"has the same token as user {auth.users[digest].name!r}.", hint="Give each user a token.")
        auth.users[digest] = MirrorUser(u["name"], u.get("role", "read"), tuple(u.get("orgs", ())), u.get("fullname"))
    if auth.require_token and not auth.users:
        raise c.fail(("require_token",), "is true but the file has no [[users]]: no token could ever be accepted.",
                     hint="Add [[users]] with tokens, or remove require_token.")
    seen: dict[str, str] = {}
    for key, r in data.get("repos", {}).items():
        rp = ("repos", key)
        rid = key[len("datasets/"):] if key.lower().startswith("datasets/") else key
        if why := repo_id_problem(rid, namespace=True):
            raise c.fail(rp, f"{key!r} is not a repo id ('ns/name' or 'datasets/ns/name'): {why}.",
                         hint="Fix the key: a rule that names no repo would leave the repo it meant public.")
        if key.lower() in seen:
            raise c.fail(rp, f"[repos.{key!r}] and [repos.{seen[key.lower()]!r}] name the same repo "
                         "(repo ids are case-insensitive).", hint="Merge the two rules into one.")
        seen[key.lower()] = key
        c.table(r, _ACCESS_REPO, rp)
        auth.repos[key] = RepoPolicy(r.get("private", False), r.get("gated", False), frozenset(r.get("allow", ())))
    return auth


_HTTPError = Rejected  # the name subclasses (tests/hubtest.py) raise


def _networks(values) -> tuple:
    out = []
    for v in values or ():
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError as exc:
            raise errors.UsageError(f"--trusted-proxy {v!r} is not an IP address or network: {exc}") from exc
    return tuple(out)


class MirrorServer(PooledHTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        store: MirrorStore,
        *,
        auth: MirrorAuth | None = None,
        handler: type[PooledRequestHandler] | None = None,
        access_log: bool = False,
        tree_page_size: int = TREE_PAGE_SIZE,
        lfs_redirect_base: str | None = None,
        trusted_proxies=(),
        **server_options,
    ) -> None:
        self.store = store
        self.auth = auth or MirrorAuth()
        if self.auth.source is not None:
            store.exclude_file(self.auth.source)
        self.access_log = access_log
        self.tree_page_size = tree_page_size
        # Optional: answer LFS resolves with a 302 to ``{base}/{sha256}`` (another host serving blobs,
        # as the Hub does with its CDN). The target must serve ``/{sha256}`` itself.
        self.lfs_redirect_base = lfs_redirect_base.rstrip("/") if lfs_redirect_base else None
        self.trusted_proxies = _networks(trusted_proxies)
        server_options.setdefault("max_body", MAX_BODY)
        self.bytes_sent = 0
        self.requests = 0
        self.errors_500 = 0
        self._stats_mu = threading.Lock()
        self._tree_cache: dict[tuple, list[dict]] = {}
        super().__init__(address, handler or MirrorHandler, **server_options)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{port}"

    def count(self, nbytes: int = 0, request: bool = False) -> None:
        with self._stats_mu:
            self.bytes_sent += nbytes
            self.requests += int(request)

    def on_sent(self, nbytes: int) -> None:
        self.count(nbytes)

    def trusts(self, peer: str) -> bool:
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return self.exempt_from_client_limit(ip)

    def exempt_from_client_limit(self, ip) -> bool:
        """A trusted proxy carries many clients: ``max_per_client`` does not count its connections."""
        return any(ip in net for net in self.trusted_proxies)

    def tree_entries(self, snap: RepoRevision, prefix: str, recursive: bool) -> list[dict]:
        key = (snap.repo_type, snap.repo_id, snap.commit, id(snap.files), prefix, recursive)
        with self._stats_mu:
            hit = self._tree_cache.get(key)
        if hit is None:
            hit = _tree_entries(snap, prefix, recursive)
            with self._stats_mu:
                if len(self._tree_cache) > 64:
                    self._tree_cache.clear()
                self._tree_cache[key] = hit
        return hit

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="qtk-mirror", daemon=True)
        t.start()
        return t


def _tree_entries(snap: RepoRevision, prefix: str, recursive: bool) -> list[dict]:
    entries: list[dict] = []
    dirs: set[str] = set()
    base = f"{prefix}/" if prefix else ""
    if prefix and prefix in snap.files:
        entries.append(snap.files[prefix].tree_entry())
    for p in sorted(snap.files):
        if not p.startswith(base):
            continue
        parts = p[len(base):].split("/")
        for i in range(1, len(parts)):  # directories on the way
            d = base + "/".join(parts[:i])
            if (recursive or i == 1) and d not in dirs:
                dirs.add(d)
                entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
        if recursive or len(parts) == 1:
            entries.append(snap.files[p].tree_entry())
    return entries


class MirrorHandler(PooledRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a garbage request line still gets a status line back
    disable_nagle_algorithm = True
    server_version = f"qtk-mirror/{__version__}"
    server: MirrorServer
    req: MirrorRequest | None = None

    # -- plumbing -----------------------------------------------------------------

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.server.access_log:
            super().log_message(format, *args)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._started = True
        super().send_response(code, message)

    def send_header(self, keyword: str, value) -> None:
        text = str(value)
        if not all(" " <= c <= "~" for c in text):
            text = safe_header(text, limit=8192)
        super().send_header(keyword, text)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by the stdlib's request-line and header parsing, in the mirror's JSON form."""
        self.close_connection = True
        if not hasattr(self, "request_version"):
            self.request_version = "HTTP/1.1"
        if not hasattr(self, "requestline"):
            self.requestline = ""
        code_name = "MethodNotAllowed" if code in (405, 501) else "BadRequest"
        self._send_error(Rejected(code, code_name, message or "Bad request."), getattr(self, "command", None) == "HEAD")

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _not_allowed(self) -> None:
        self.close_connection = True
        self._send_error(Rejected(405, "MethodNotAllowed", "This mirror is read-only: GET and HEAD only."),
                         self.command == "HEAD")  # a HEAD (to the POST route) gets no body

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def do_POST(self) -> None:
        """Only ``/api/{models,datasets}/{ns}/{name}/paths-info/{rev}`` (the Hub's, for huggingface_hub's
        get_paths_info): the same parser and the same access question as every other route. The server has
        read the body exactly (one Content-Length, checked), so the connection may be kept alive."""
        try:
            req = parse_target(self.path)
        except Rejected as exc:
            return self._send_error(exc, False)
        if req.route != "paths-info":
            return self._not_allowed()
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        self.server.count(request=True)
        self._started = False
        try:
            self.req = req = parse_target(self.path)
            if req.route == "whoami":
                return self._whoami(head)
            if req.route in ("info", "tree", "paths-info"):
                if (req.route == "paths-info") != (self.command == "POST"):
                    return self._not_allowed()
                return self._api(req, head)
            segs = [*req.repo_id.split("/"), "resolve", req.revision, *req.path.split("/")]
            return self._resolve(req.repo_type, segs, head)
        except Rejected as exc:
            self._send_error(exc, head)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, socket.timeout, ssl.SSLError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - logged, answered, the server goes on
            log.exception("internal error on %s %s", self.command, safe_header(self.path, 200))
            self.server.errors_500 += 1
            if self._started:
                self.close_connection = True
            else:
                with contextlib.suppress(OSError):
                    self._send_error(Rejected(500, "InternalError", "Internal server error (logged on the mirror)."), head)

    def _send_error(self, exc: Rejected, head: bool) -> None:
        body = json.dumps({"error": exc.message}).encode()
        self.send_response(exc.status)
        if exc.code:
            self.send_header("X-Error-Code", exc.code)
        self.send_header("X-Error-Message", safe_header(exc.message))
        if exc.status == 503:
            self.send_header("Retry-After", "2")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
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
        if self.command != "HEAD":
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
                raise Rejected(401, "Unauthorized", "This mirror requires a token: run `qtk login`.")
            return False, None
        user = auth.user_for(token)
        if user is None:
            raise Rejected(401, "InvalidToken", INVALID_CREDENTIALS)
        return True, user

    def _repo(self, repo_type: str, repo_id: str, download: bool) -> RepoEntry:
        """The one access decision, for every route: on the canonical repo (found case-insensitively)."""
        has_token, user = self._user()
        entry = self.server.store.find(repo_type, repo_id)
        not_found = Rejected(401 if not has_token else 404, "RepoNotFound", f"Repository Not Found: {repo_id}")
        if entry is None:
            raise not_found
        policy = self.server.auth.policy(entry.key)
        allowed = user is not None and (user.name in policy.allow or any(o in policy.allow for o in user.orgs))
        if policy.private and not allowed:
            raise not_found
        if policy.gated and download and not allowed:
            if not has_token:
                raise Rejected(401, "GatedRepo", f"Access to gated repo {entry.repo_id} requires a token. Run `qtk login`.")
            raise Rejected(403, "GatedRepo", f"Access to gated repo {entry.repo_id} is restricted: request access.")
        return entry

    def _whoami(self, head: bool = False) -> None:
        has_token, user = self._user()
        if user is None:  # no token, an unknown one, or a mirror without users (--access)
            raise Rejected(401, "InvalidToken", INVALID_CREDENTIALS)
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

    def _revision(self, entry: RepoEntry, rev: str) -> RepoRevision:
        snap = self.server.store.revision_of(entry, rev)
        if snap is None:
            raise Rejected(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return snap

    def _api(self, req: MirrorRequest, head: bool) -> None:
        entry = self._repo(req.repo_type, req.repo_id, download=False)
        snap = self._revision(entry, req.revision)
        if req.route == "info":
            return self._repo_info(entry, snap)
        if req.route == "paths-info":
            return self._paths_info(snap)
        return self._tree(snap, req)

    def _paths_info(self, snap: RepoRevision) -> None:
        length = self.content_length  # checked by the server's head parser (digits only, one field)
        if length is None:
            raise Rejected(411, "BadRequest", "paths-info needs a Content-Length body.")
        if not 0 < length <= MAX_BODY:
            raise Rejected(413, "BadRequest", f"paths-info body must be 1 to {MAX_BODY} bytes.")
        paths = parse_paths_body(self.body, self.headers.get("Content-Type", ""))
        entries, dirs = [], {p.rsplit("/", 1)[0] for p in snap.files if "/" in p}
        dirs |= {d.rsplit("/", i)[0] for d in dirs for i in range(1, d.count("/") + 1)}
        for p in dict.fromkeys(paths):
            if p in snap.files:
                entries.append(snap.files[p].tree_entry())
            elif p in dirs:
                entries.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p})
        self._send_json(entries)

    def _repo_info(self, entry: RepoEntry, snap: RepoRevision) -> None:
        policy = self.server.auth.policy(entry.key)
        when = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(snap.last_modified))
        repo_id = entry.repo_id
        self._send_json(
            {
                "_id": hashlib.sha1(f"{entry.repo_type}/{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                **({"modelId": repo_id} if entry.repo_type == "model" else {}),
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

    def _base_url(self) -> str:
        """Scheme and host for URLs this server builds: X-Forwarded-* only from a trusted proxy."""
        scheme = "https" if self.server.ssl_context else "http"
        host = self.headers.get("Host", "")
        if self.server.trusts(self.client_address[0]):
            proto = self.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
            scheme = proto if proto in ("http", "https") else scheme
            fwd = self.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
            host = fwd or host
        if not _HOST_RE.fullmatch(host or ""):
            host = self.server.url.split("://", 1)[1]
        return f"{scheme}://{host}"

    def _tree(self, snap: RepoRevision, req: MirrorRequest) -> None:
        entries = self.server.tree_entries(snap, req.path, req.recursive)
        if req.path and not entries:
            raise Rejected(404, "EntryNotFound", f"{req.path} does not exist on {snap.commit}")
        size = self.server.tree_page_size
        start = req.cursor
        page = entries[start : start + size]
        headers = {}
        if start + size < len(entries):
            qs = f"recursive={'True' if req.recursive else 'False'}&expand=False&cursor={start + size}"
            kind = "models" if snap.repo_type == "model" else "datasets"
            link = f"{self._base_url()}/api/{kind}/{quote(snap.repo_id)}/tree/{quote(snap.commit, safe='')}"
            if req.path:
                link += "/" + quote(req.path, safe="")
            headers["Link"] = f'<{link}?{qs}>; rel="next"'
        self._send_json(page, headers)

    # -- files --------------------------------------------------------------------

    def _resolve(self, repo_type: str, segs: list[str], head: bool) -> None:
        repo_id = "/".join(segs[:2])
        rev, path = segs[3], "/".join(segs[4:])
        entry = self._repo(repo_type, repo_id, download=True)
        snap = self._revision(entry, rev)
        f = snap.files.get(path)
        if f is not None and not self.server.store.current(f):
            self.server.store.invalidate(snap)  # changed on disk since listed: list (and hash) again
            snap = self._revision(entry, rev)
            f = snap.files.get(path)
        if f is None:
            raise Rejected(404, "EntryNotFound", f"{path} does not exist on {snap.commit}")
        common = {
            "X-Repo-Commit": snap.commit,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Last-Modified": formatdate(f.mtime, usegmt=True),
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

    def _open_listed(self, f: StoredFile) -> int:
        """Open exactly the file that was listed (same inode and version), never blocking on a FIFO."""
        try:
            fd = os.open(f.abspath, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            raise Rejected(503, "ServiceUnavailable", "The file changed while being served: retry.") from None
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode) or (f.key is not None and file_key(st) != f.key):
            os.close(fd)
            self.server.store.invalidate()
            raise Rejected(503, "ServiceUnavailable", "The file changed while being served: retry.")
        return fd

    def send_file(self, f: StoredFile, headers: dict[str, str], head: bool) -> None:
        """Answer a GET/HEAD for ``f``: the preconditions of RFC 9110 §13.2.2 (If-Match, If-Unmodified-Since,
        If-None-Match, If-Modified-Since: 412 or 304), then one ``Range``, honoured only while ``If-Range``
        (when sent) still matches the file."""
        etag, mtime = f'"{f.etag}"', int(f.mtime)
        verdict = _preconditions(self.headers, etag, mtime)
        if verdict == 412:
            raise Rejected(412, "PreconditionFailed", "Precondition failed: the file no longer matches If-Match "
                                                      "or If-Unmodified-Since.")
        if verdict == 304:
            self.send_response(304)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        size = f.size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng is not None and not _if_range_holds(self.headers.get("If-Range"), etag, mtime):
            rng = None  # the client's copy is stale: the whole file, 200 (RFC 9110 §13.1.5)
        parsed = _parse_range(rng, size) if rng is not None else None
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
        fd = -1 if head or length == 0 else self._open_listed(f)
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if fd >= 0:
                self.send_bytes(fd, start, length, f)
        finally:
            if fd >= 0:
                os.close(fd)

    def send_bytes(self, fd: int, offset: int, count: int, f: StoredFile) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` after the headers. The event loop does it
        (non-blocking ``sendfile``; ``pread`` + send under TLS), so a slow reader holds no worker; one that
        reads slower than the server's ``min_rate`` over an ``io_timeout`` window is cut. The test bed
        (tests/hubtest.py) overrides this to throttle, reset or corrupt a body."""
        self.stream_file(fd, offset, count)

    def reset_connection(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0), as a dropped connection looks to a client."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()


_ETAG = re.compile(r'[ \t]*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"[ \t]*')
_RANGE_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)")
MAX_RANGE_SPEC = 256  # longer: ignored (the whole file), never parsed


def _field(headers, name: str) -> str | None:
    """A list-valued field, all its lines joined (RFC 9110 §5.3); None when absent."""
    values = headers.get_all(name)
    return None if not values else ", ".join(values)


def _entity_tags(value: str) -> list[tuple[bool, str]] | None:
    """``W/"x", "y"`` -> [(weak, opaque tag)]; None when the list is malformed. Empty elements are skipped
    (RFC 9110 §5.6.1.2); a tag may contain a comma, so the list is scanned, not split."""
    out, pos = [], 0
    while pos < len(value):
        if value[pos] in ", \t":
            pos += 1
            continue
        m = _ETAG.match(value, pos)
        if m is None:
            return None
        out.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
        if pos < len(value) and value[pos] != ",":
            return None
    return out


def _etag_matches(value: str, etag: str, *, weak: bool) -> bool:
    """Does the If-Match / If-None-Match list ``value`` name ``etag``? ``*`` names any current file.
    Weak comparison (If-None-Match) ignores ``W/``; strong comparison (If-Match) needs both tags strong.
    A malformed list matches nothing."""
    if value.strip(" \t") == "*":
        return True
    tags = _entity_tags(value)
    ours = etag.strip('"')
    return bool(tags) and any(tag == ours and (weak or not is_weak) for is_weak, tag in tags)


def _http_date(value: str | None) -> int | None:
    """Seconds since the epoch of an HTTP-date; None when absent or not a date (ASCII only: nothing
    reaches ``int()`` that Python would read as a digit and the RFC would not)."""
    if value is None or len(value) > 64 or not value.isascii():
        return None
    try:
        parts = parsedate_tz(value)
        return None if parts is None else int(mktime_tz(parts))
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _preconditions(headers, etag: str, mtime: int) -> int | None:
    """RFC 9110 §13.2.2 for GET/HEAD: 412, 304 or None (go on). If-Match is evaluated before (and
    replaces) If-Unmodified-Since, If-None-Match before (and replaces) If-Modified-Since. A malformed
    If-Match fails (412: fail closed); a malformed If-None-Match or date is ignored (the full answer)."""
    if_match = _field(headers, "If-Match")
    if if_match is not None:
        if not _etag_matches(if_match, etag, weak=False):
            return 412
    else:
        since = _http_date(headers.get("If-Unmodified-Since"))
        if since is not None and mtime > since:
            return 412
    if_none = _field(headers, "If-None-Match")
    if if_none is not None:
        return 304 if _etag_matches(if_none, etag, weak=True) else None
    since = _http_date(headers.get("If-Modified-Since"))
    return 304 if since is not None and mtime <= since else None


def _if_range_holds(value: str | None, etag: str, mtime: int) -> bool:
    """RFC 9110 §13.1.5: a Range applies only if If-Range (when sent) still names the file: an entity tag
    by strong comparison (a weak tag never does), or a date equal to Last-Modified that is a strong
    validator (at least a second old)."""
    if value is None:
        return True
    value = value.strip(" \t")
    if value.startswith(('"', "W/")):
        tags = _entity_tags(value)
        return tags is not None and len(tags) == 1 and not tags[0][0] and tags[0][1] == etag.strip('"')
    date = _http_date(value)
    return date is not None and date == mtime and time.time() - mtime >= 1


def _parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (start, end).

    None: send the whole file (another unit, which RFC 9110 §14.2 says to ignore; several ranges, which
    this server does not combine; a spec over ``MAX_RANGE_SPEC`` characters).
    False: 416 (``Content-Range: bytes */size``): unsatisfiable, or not a valid bytes range: digits are
    ASCII ``0-9`` only (Python's ``int()`` would also read ``²`` or ``٣``), ``last < first`` is invalid
    (§14.1.1), and §14.2 lets a server reject an invalid range.
    """
    unit, eq, spec = header.partition("=")
    if unit.strip(" \t").lower() != "bytes":
        return None
    if len(spec) > MAX_RANGE_SPEC:
        return None
    specs = [s.strip(" \t") for s in spec.split(",")]
    specs = [s for s in specs if s]
    if not eq or not spec.isascii() or not specs or not all(_RANGE_SPEC.fullmatch(s) for s in specs):
        return False
    if len(specs) > 1:
        return None
    m = _RANGE_SPEC.fullmatch(specs[0])
    if m.group(3) is not None:  # the last n bytes
        n = int(m.group(3))
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else False
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if m.group(2) and end < start:
        return False
    if start >= size:
        return False
    return (start, min(end, size - 1))
