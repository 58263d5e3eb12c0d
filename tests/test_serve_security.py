"""`qtk serve` as an attacker sees it: every request of issue 11's table, and variants, sent verbatim.

Each row: request target (bytes on the wire), who asks (no token / bob: valid user without access /
alice: has access), expected status. Every response must be a complete HTTP response; an error carries
X-Error-Code and a printable-ASCII X-Error-Message; no unauthorised body holds a secret marker.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from hubtest import ALICE, BOB, start_server
from servetest import PUBLIC_FILES, SECRETS, auth_header, build_hostile_store, raw_request

from qtk.mirror.app import load_auth

ANON, B, A = None, BOB, ALICE


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    root, access = build_hostile_store(base)
    srv = start_server(root, auth=load_auth(access), tree_page_size=3)
    yield srv
    srv.shutdown()
    srv.server_close()


def check(srv, target, token, status, *, method="GET", allowed_marker: bytes | None = None, headers=None):
    got, hdrs, body = raw_request(srv.server_address[1], target, method=method,
                                  headers={**auth_header(token), **(headers or {})})
    assert got == status, (target, token, got, body[:300])
    for marker in SECRETS:
        if marker != allowed_marker:
            assert marker not in body, (target, marker)
    if got >= 400:
        assert hdrs.get("X-Error-Code"), (target, dict(hdrs))
        msg = hdrs.get("X-Error-Message", "")
        assert all(" " <= c <= "~" for c in msg), msg
        if method != "HEAD":
            assert "error" in json.loads(body)
    for name in hdrs.keys():  # no header smuggled in through the request
        assert name.lower() not in ("set-cookie", "x-injected"), dict(hdrs)
    return got, hdrs, body


# -- issue 11's table, as reported, and their variants ------------------------------------------------
TABLE = [
    # (target, token, status)
    ("/acme%2Finternal/%2E/resolve/main/secret.txt", ANON, 400),
    ("/acme%2Finternal/%2E/resolve/main/secret.txt", A, 400),
    ("/%2E%2E/outside/resolve/main/x.txt", ANON, 400),
    ("/..%2F..%2F../outside/resolve/main/x.txt", ANON, 400),
    ("/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/ssl/resolve/main/openssl.cnf", ANON, 400),
    ("/acme/%2E%2E/resolve/main/acme/internal/secret.txt", ANON, 400),
    ("/acme/%2E%2E/resolve/main/acme/internal/secret.txt", A, 400),
    ("/acme%2Fgated/%2E/resolve/main/weights.bin", ANON, 400),
    ("/acme%2Fgated/%2E/resolve/main/weights.bin", B, 400),
    ("/datasets/foo/resolve/main/secret/data.txt", ANON, 404),  # a dataset path is never a model route
    ("/api/models/datasets/foo/tree/main", ANON, 401),  # "datasets" is never a model namespace
    ("/api/models/datasets/foo/tree/main", A, 404),
    ("/api/models/acme%2Finternal/%2E/tree/main", ANON, 400),
    ("/.qtk-provision/builds/resolve/main/model.safetensors", ANON, 400),
    ("/.qtk-provision/builds/resolve/main/k1/model.safetensors", A, 400),
    ("/acme/%2e%2e/%2e/resolve/main/acme/public/access.toml", ANON, 400),
    ("/acme/internal%2F/resolve/main/secret.txt", ANON, 400),
    ("/acme//resolve/main/internal/secret.txt", ANON, 400),
    ("/models--acme--cached-private/blobs/" + hashlib.sha1(b"x").hexdigest(), ANON, 404),
    ("/models--acme--cached-private/snapshots/resolve/main/secret.txt", ANON, 400),
    ("/api/models/%2e/%2e/tree/main?recursive=1", ANON, 400),
    ("/api/models/%2e%2e/%2e%2e", ANON, 400),
    ("/api/models/%2e%2e/%2e%2e/tree/main?recursive=1", A, 400),
    # double encoding: decoded once, '%' is not a repo-id character; in a file path it is a literal name
    ("/acme/%252e%252e/resolve/main/acme/internal/secret.txt", ANON, 400),
    ("/acme/public/resolve/main/%252e%252e/internal/secret.txt", ANON, 404),
    ("/acme/public/resolve/main/%2e%2e/internal/secret.txt", ANON, 400),
    ("/acme/public/resolve/main/..%2Finternal%2Fsecret.txt", ANON, 400),
    ("/acme/public/resolve/main/sub/../../internal/secret.txt", ANON, 400),
    ("/acme/public/resolve/main/sub/./a.txt", ANON, 400),
    ("/acme/public/resolve/main/%2Fetc%2Fpasswd", ANON, 400),
    ("/acme/public/resolve/main/sub%5Ca.txt", ANON, 400),
    ("/acme/public/resolve/main/a%00.txt", ANON, 400),
    ("/acme/public/resolve/..%2F..%2Finternal/secret.txt", ANON, 400),
    ("/acme/public/resolve/%2e%2e/config.json", ANON, 400),
    # header injection through the echoed path: refused, or echoed cleaned
    ("/acme/public/resolve/main/x%0D%0ASet-Cookie:%20a=b", ANON, 400),
    ("/acme/public/resolve/main%0D%0AX-Injected:%201/config.json", ANON, 400),
    ("/acme/public/resolve/main/%E2%80%A8%0A", ANON, 400),
    ("/acme/public/resolve/main/%E6%97%A5%E6%9C%AC.txt", ANON, 404),  # non-Latin-1 on a 404
    ("/acme/public/resolve/main/%C3%28.txt", ANON, 400),  # not UTF-8
    ("/acme/public/resolve/main/%FF", ANON, 400),
    (b"/acme/public/resolve/main/\xe6\x97\xa5.txt", ANON, 400),  # raw non-ASCII on the wire
    ("/api/models/acme/public/tree/main?cursor=abc", ANON, 400),
    ("/api/models/acme/public/tree/main?cursor=-1", ANON, 400),
    ("/api/models/acme/public/tree/main?cursor=99999999999999999999", ANON, 400),
    ("/api/models/acme/public/tree/main?cursor=%FF", ANON, 400),
    ("/api/models/acme/public/tree/main?cursor=999", ANON, 200),  # past the end: an empty page
    # dot-entries, the access file, links out of the repo, special files: never served
    ("/acme/public/resolve/main/.git/config", ANON, 404),
    ("/acme/public/resolve/main/.git/config", A, 404),
    ("/acme/public/resolve/main/.cache/x", A, 404),
    ("/acme/public/resolve/main/access.toml", ANON, 404),
    ("/acme/public/resolve/main/access.toml", A, 404),
    ("/acme/public/resolve/main/link.toml", A, 404),
    ("/acme/public/resolve/main/hardlink.toml", A, 404),
    ("/acme/public/resolve/main/escape.txt", ANON, 404),
    ("/acme/public/resolve/main/escape.txt", A, 404),
    ("/acme/public/resolve/main/abs.txt", A, 404),
    ("/acme/public/resolve/main/outdir/x.txt", A, 404),
    ("/acme/public/resolve/main/etc/passwd", A, 404),
    ("/acme/public/resolve/main/dangling.txt", ANON, 404),
    ("/acme/public/resolve/main/loop", ANON, 404),
    ("/acme/public/resolve/main/fifo", ANON, 404),
    ("/acme/public/resolve/main/sock", ANON, 404),
    ("/acme/public/resolve/main/config.json", ANON, 200),  # the rest of that repo still works
    ("/acme/public/resolve/main/sub/a.txt", ANON, 200),
    # trailing slashes
    ("/acme/public/resolve/main/config.json/", ANON, 400),
    ("/acme/public/resolve/main/sub/", ANON, 400),
    ("/api/models/acme/public/tree/main/", ANON, 200),
    ("/api/models/acme/internal/", ANON, 401),
    ("/api/models/acme/internal/", A, 200),
    # case variants reach the same policy (ids are case-insensitive, canonical = the case on disk)
    ("/ACME/INTERNAL/resolve/main/secret.txt", ANON, 401),
    ("/ACME/INTERNAL/resolve/main/secret.txt", B, 404),
    ("/Acme/Internal/resolve/main/secret.txt", A, 200),
    ("/api/models/ACME/Internal", ANON, 401),
    ("/api/models/acme/INTERNAL/tree/main?recursive=1", B, 404),
    ("/Acme/Gated/resolve/main/weights.bin", ANON, 401),
    ("/Acme/Gated/resolve/main/weights.bin", B, 403),
    ("/acme2/mixed/resolve/main/secret.txt", ANON, 401),
    ("/ACME2/MIXED/resolve/main/secret.txt", B, 404),
    ("/Acme2/Mixed/resolve/main/secret.txt", B, 404),
    ("/acme2/MIXED/resolve/main/secret.txt", A, 200),
    ("/DATASETS/foo/secret/resolve/main/data.txt", A, 404),  # route words are exact
    ("/datasets/FOO/Secret/resolve/main/data.txt", ANON, 401),
    ("/datasets/FOO/Secret/resolve/main/data.txt", A, 200),
    ("/dup/model/resolve/main/f.txt", A, 404),  # dup/Model and dup/model: ambiguous, neither served
    ("/dup/Model/resolve/main/f.txt", A, 404),
    # the HF-cache layout's private repo, every way in
    ("/acme/cached-private/resolve/main/secret.txt", ANON, 401),
    ("/Acme/Cached-Private/resolve/main/secret.txt", B, 404),
    ("/acme/cached-private/resolve/main/secret.txt", A, 200),
    # limits and methods
    ("/" + "a" * 9000, ANON, 414),
    ("/api/whoami-v2", ANON, 401),
    ("/api/whoami-v2", "hf_not_a_known_token", 401),
    ("/acme/public/resolve/main/config.json", "hf_not_a_known_token", 401),
    ("/", ANON, 404),
    ("*", ANON, 400),
    ("http://evil.example/acme/public/resolve/main/config.json", ANON, 400),
]

ROUTES = [  # every route of a private model and a private dataset: (target, marker in an allowed answer)
    ("/api/models/acme/internal", None),
    ("/api/models/acme/internal/revision/main", None),
    ("/api/models/acme/internal/tree/main?recursive=true", None),
    ("/api/models/acme/internal/tree/main/secret.txt", None),
    ("/acme/internal/resolve/main/secret.txt", b"SECRET-internal"),
    ("/api/datasets/foo/secret", None),
    ("/api/datasets/foo/secret/tree/main", None),
    ("/datasets/foo/secret/resolve/main/data.txt", b"SECRET-dataset"),
    ("/api/models/acme/cached-private/revision/main", None),
    ("/acme/cached-private/resolve/main/secret.txt", b"SECRET-cached"),
]


def _marker_of(target: str | bytes) -> bytes | None:
    t = target.lower() if isinstance(target, str) else ""
    for marker, needle in ((b"SECRET-internal", "acme/internal/resolve"), (b"SECRET-mixed", "acme2/mixed/resolve"),
                           (b"SECRET-dataset", "foo/secret/resolve"), (b"SECRET-cached", "cached-private/resolve")):
        if needle in t:
            return marker
    return None


@pytest.mark.parametrize("target,token,status", TABLE, ids=[f"{i}" for i in range(len(TABLE))])
def test_issue_table(hostile, target, token, status):
    allowed = _marker_of(target) if status == 200 and token == A else None
    check(hostile, target, token, status, allowed_marker=allowed)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("target,marker", ROUTES)
def test_every_route_asks_the_same_question(hostile, target, marker, method):
    check(hostile, target, ANON, 401, method=method)
    check(hostile, target, B, 404, method=method)
    _, _, body = check(hostile, target, A, 200, method=method, allowed_marker=marker)
    if marker and method == "GET":
        assert marker in body


def test_gated_listing_is_public_download_is_not(hostile):
    _, _, body = check(hostile, "/api/models/acme/gated", ANON, 200)
    assert json.loads(body)["gated"] == "manual"
    check(hostile, "/acme/gated/resolve/main/weights.bin", ANON, 401)
    check(hostile, "/acme/gated/resolve/main/weights.bin", B, 403)
    check(hostile, "/acme/gated/resolve/main/weights.bin", A, 200, allowed_marker=b"SECRET-gated")


def test_listing_hides_dot_entries_links_out_special_files_and_the_access_file(hostile):
    _, _, body = check(hostile, "/api/models/acme/public", ANON, 200)
    info = json.loads(body)
    assert sorted(s["rfilename"] for s in info["siblings"]) == sorted(PUBLIC_FILES)
    paths, cursor = [], 0
    while True:  # page size 3 on this server
        _, hdrs, body = check(hostile, f"/api/models/acme/public/tree/main?recursive=true&cursor={cursor}", A, 200)
        paths += [e["path"] for e in json.loads(body) if e["type"] == "file"]
        if "Link" not in hdrs:
            break
        cursor += 3
    assert sorted(paths) == sorted(PUBLIC_FILES)
    assert ("model", "dup/model") not in hostile.store.list_repos()
    assert ("model", "Acme2/Mixed") in hostile.store.list_repos()


def test_case_variants_answer_with_the_canonical_id(hostile):
    _, _, body = check(hostile, "/api/models/ACME2/mixed", A, 200)
    assert json.loads(body)["id"] == "Acme2/Mixed"


def test_headers_never_carry_raw_request_bytes(hostile):
    got, hdrs, _ = check(hostile, "/acme/public/resolve/main/%E2%80%A8%E6%97%A5.txt", ANON, 404)
    assert "\u2028" not in hdrs["X-Error-Message"]
    # the Link of a paginated tree uses the validated Host, never a forged X-Forwarded-Host
    _, hdrs, _ = check(hostile, "/api/models/acme/public/tree/main?recursive=true", ANON, 200,
                       headers={"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"})
    assert hdrs["Link"].startswith(f"<http://127.0.0.1:{hostile.server_address[1]}/api/models/acme/public/tree/")
    _, hdrs, _ = check(hostile, "/api/models/acme/public/tree/main?recursive=true", ANON, 200,
                       headers={"Host": "bad host\x01"})
    assert "bad" not in hdrs["Link"]


def test_other_methods_and_oversized_heads(hostile):
    check(hostile, "/acme/public/resolve/main/config.json", ANON, 405, method="POST")
    check(hostile, "/acme/public/resolve/main/config.json", ANON, 405, method="DELETE")
    check(hostile, "/acme/public/resolve/main/config.json", ANON, 431, headers={"X-Big": "a" * 20000})


def test_garbage_request_lines_get_an_answer(hostile):
    import socket

    port = hostile.server_address[1]
    for raw in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw)
            data = s.recv(65536)
        assert data.startswith(b"HTTP/1."), (raw, data[:100])


def test_unexpected_exception_is_a_logged_json_500(hostile, monkeypatch, caplog):
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(hostile.store, "find", boom)
    before = hostile.errors_500
    got, hdrs, body = raw_request(hostile.server_address[1], "/api/models/acme/public")
    assert got == 500 and hdrs["X-Error-Code"] == "InternalError" and json.loads(body)["error"]
    assert hostile.errors_500 == before + 1


def _post(srv, target, body: bytes, token=None, content_type="application/x-www-form-urlencoded"):
    return raw_request(srv.server_address[1], target, method="POST",
                       headers={**auth_header(token), "Content-Type": content_type,
                                "Content-Length": str(len(body))}, body=body)


@pytest.mark.parametrize("target,body,token,status", [
    ("/api/models/acme/internal/paths-info/main", b"paths=secret.txt", ANON, 401),
    ("/api/models/acme/internal/paths-info/main", b"paths=secret.txt", B, 404),
    ("/api/models/ACME/Internal/paths-info/main", b"paths=secret.txt", A, 200),
    ("/api/models/acme/public/paths-info/main", b"paths=..%2Finternal%2Fsecret.txt", ANON, 400),
    ("/api/models/acme/public/paths-info/main", b"paths=access.toml&paths=.git%2Fconfig&paths=escape.txt", A, 200),
    ("/api/models/acme/public/paths-info/main", b"paths=%FF", ANON, 400),
    ("/api/models/acme/public/paths-info/main", b"", ANON, 413),
    ("/api/models/acme/public/paths-info/main", b"paths=a" * 40000, ANON, 413),
    ("/api/models/acme%2Finternal/%2E/paths-info/main", b"paths=secret.txt", ANON, 400),
    ("/api/datasets/foo/secret/paths-info/main", b"paths=data.txt", ANON, 401),
    ("/acme/public/resolve/main/config.json", b"x", ANON, 405),
])
def test_paths_info_asks_the_same_question(hostile, target, body, token, status):
    got, hdrs, data = _post(hostile, target, body, token)
    assert got == status, (target, got, data[:200])
    for marker in SECRETS:
        assert marker not in data
    if got == 200 and b"access" in body:
        assert json.loads(data) == []  # hidden entries do not exist, even by exact name


def test_paths_info_answers_files_and_folders(hostile):
    got, _, data = _post(hostile, "/api/models/acme/public/paths-info/main",
                         json.dumps({"paths": ["sub", "config.json", "nope"]}).encode(), content_type="application/json")
    assert got == 200
    assert [(e["type"], e["path"]) for e in json.loads(data)] == [("directory", "sub"), ("file", "config.json")]
    got, _, _ = raw_request(hostile.server_address[1], "/api/models/acme/public/paths-info/main")
    assert got == 405  # GET on the POST route
