"""A hostile store for the `qtk serve` security tests: public, private, gated, dataset, HF-cache and
provision repos, secrets outside the served directory, the access file inside it, symlinks that point
out, special files, case variants. Every secret file holds a marker that must never reach an
unauthorised client.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
from pathlib import Path

from hubtest import ALICE, BOB, write_cache_repo, write_plain_repo

SECRETS = {  # marker -> what it guards
    b"SECRET-internal": "private model acme/internal",
    b"SECRET-gated": "gated model acme/gated",
    b"SECRET-outside": "a file beside the served directory",
    b"SECRET-dataset": "private dataset foo/secret",
    b"SECRET-provision": "a provision build that failed its gates",
    b"SECRET-access": "the access file",
    b"SECRET-cached": "private HF-cache repo acme/cached-private",
    b"SECRET-mixed": "private repo Acme2/Mixed (on-disk case)",
    b"SECRET-git": "a .git directory inside a public repo",
    b"SECRET-dup": "a repo whose id is ambiguous by case",
}
PUBLIC_FILES = {"config.json": b'{"public": true}\n', "sub/a.txt": b"public a\n", "model.safetensors": b"\0" * 4096}


def access_toml() -> str:
    import hashlib

    return f"""# SECRET-access
[[users]]
name = "alice"
token = "{ALICE}"
orgs = ["acme"]

[[users]]
name = "bob"
token_sha256 = "{hashlib.sha256(BOB.encode()).hexdigest()}"

[repos."acme/internal"]
private = true
allow = ["acme"]

[repos."acme/gated"]
gated = true
allow = ["alice"]

[repos."datasets/foo/secret"]
private = true
allow = ["alice"]

[repos."acme/cached-private"]
private = true
allow = ["alice"]

[repos."acme2/mixed"]
private = true
allow = ["alice"]

[repos."dup/model"]
private = true
allow = ["alice"]
"""


def build_hostile_store(base: Path) -> tuple[Path, Path]:
    """(served root, access file). The access file lives inside a public repo of the served root."""
    root = base / "store"
    outside = base / "outside"
    outside.mkdir(parents=True)
    (outside / "x.txt").write_bytes(b"SECRET-outside\n")
    (outside / "resolve").mkdir()
    public = write_plain_repo(root, "acme/public", PUBLIC_FILES)
    write_plain_repo(root, "acme/internal", {"secret.txt": b"SECRET-internal\n", "config.json": b'{"SECRET-internal": 1}'})
    write_plain_repo(root, "acme/gated", {"weights.bin": b"SECRET-gated" * 100, "config.json": b'{"gated": true}\n'})
    write_plain_repo(root, "foo/secret", {"data.txt": b"SECRET-dataset\n"}, repo_type="dataset")
    write_plain_repo(root, "Acme2/Mixed", {"secret.txt": b"SECRET-mixed\n"})
    write_plain_repo(root, "dup/Model", {"f.txt": b"SECRET-dup one\n"})
    write_plain_repo(root, "dup/model", {"f.txt": b"SECRET-dup two\n"})
    write_cache_repo(root, "acme/cached-private", {"v1": {"secret.txt": b"SECRET-cached\n"}}, refs={"main": "v1"})
    build = root / ".qtk-provision" / "builds" / "k1"
    build.mkdir(parents=True)
    (build / "model.safetensors").write_bytes(b"SECRET-provision")
    (root / ".qtk-provision" / "builds" / "resolve").mkdir()
    access = public / "access.toml"
    access.write_text(access_toml())
    os.symlink("access.toml", public / "link.toml")
    os.link(access, public / "hardlink.toml")
    (public / ".git").mkdir()
    (public / ".git" / "config").write_bytes(b"SECRET-git\n")
    (public / ".cache").mkdir()
    (public / ".cache" / "x").write_bytes(b"SECRET-git\n")
    os.symlink("../internal/secret.txt", public / "escape.txt")
    os.symlink(str(outside / "x.txt"), public / "abs.txt")
    os.symlink(str(outside), public / "outdir")
    os.symlink("/etc", public / "etc")
    os.symlink("nowhere.txt", public / "dangling.txt")
    os.symlink("loop", public / "loop")
    os.mkfifo(public / "fifo")
    with contextlib.suppress(OSError):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(public / "sock"))
        s.close()
    return root, access


def raw_request(port: int, target: bytes | str, *, method: str = "GET", headers: dict[str, str] | None = None,
                timeout: float = 10.0, body: bytes = b"") -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send the request target verbatim (no client-side normalisation) and read one response.
    Raises if the server drops the connection without answering."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Connection: close"]
    if not any(k.lower() == "host" for k in headers or {}):
        lines.insert(1, b"Host: 127.0.0.1:%d" % port)
    lines += [f"{k}: {v}".encode("latin-1") for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        body = resp.read()
        return resp.status, resp.msg, body


def parse_responses(data: bytes, method: str = "GET") -> list[tuple[int, dict[str, str], bytes]]:
    """Every final response in a reply stream: (status, headers with lower-case names, body). Interim
    (1xx) responses are skipped; a truncated response fails the test."""
    out = []
    while data:
        end = data.find(b"\r\n\r\n")
        assert end >= 0, f"a truncated response head: {data[:200]!r}"
        lines = data[:end].decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1."), f"not a response: {data[:200]!r}"
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        data = data[end + 4:]
        if 100 <= status < 200:
            continue
        n = 0 if method == "HEAD" or status in (204, 304) else int(headers.get("content-length", "0"))
        assert len(data) >= n, f"a truncated body: {n} bytes announced, {len(data)} sent"
        out.append((status, headers, data[:n]))
        data = data[n:]
    return out


def connect(port: int, source: str = "127.0.0.1", timeout: float | None = 10.0) -> socket.socket:
    """A connection to the server from ``source`` (any 127.x.y.z is this host: a distinct client address
    for the server's per-client connection bound)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))


def auth_header(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}
