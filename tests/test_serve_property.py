"""Property: whatever request target a client without access (no token, a valid user without access, an
unknown token) sends to `qtk serve`, the answer is a complete HTTP response and never carries bytes of a
file it may not read (private/gated repos, files beside or inside the served directory that are not part
of a public repo, the access file).

Targets are sent verbatim over a raw socket: no client-side normalisation of '..', '%2e' or case.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hubtest import BOB, start_server  # noqa: E402
from servetest import SECRETS, build_hostile_store, raw_request  # noqa: E402

from qtk.mirror.app import load_auth  # noqa: E402

TOKENS = [
    "acme", "ACME", "Acme", "internal", "INTERNAL", "public", "gated", "foo", "secret", "cached-private",
    "acme2", "mixed", "dup", "model", "outside", "x.txt", "secret.txt", "data.txt", "weights.bin",
    "access.toml", "link.toml", "hardlink.toml", "escape.txt", "abs.txt", "outdir", "etc", "passwd", "fifo",
    "api", "models", "datasets", "resolve", "tree", "revision", "paths-info", "main", "v1", "blobs", "snapshots", "refs",
    ".qtk-provision", "builds", "k1", "model.safetensors", ".git", "config", ".cache",
    "models--acme--cached-private", ".", "..", "", "%2e", "%2E", "%2e%2e", "%2E%2E", "%2f", "%2F", "..%2F",
    "%252e%252e", "%252F", "%00", "%0d%0a", "%0A", "%5c", "\\", "%C3%A9", "%E6%97%A5", "%FF", "%C3%28", "~",
    "%2e%2e%2f%2e%2e%2f", "acme%2Finternal", "acme%2Fgated", "foo%2Fsecret", "*", ";", "%3B", "@", "%40",
]
QUERIES = ["", "?recursive=1", "?recursive=True&cursor=abc", "?cursor=-5", "?cursor=2", "?cursor=%FF",
           "?a=%ZZ", "?" + "&".join(f"k{i}=v" for i in range(30))]

segments = st.one_of(st.sampled_from(TOKENS), st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                                                      max_size=8))
targets = st.builds(lambda segs, q: "/" + "/".join(segs) + q, st.lists(segments, min_size=1, max_size=9),
                    st.sampled_from(QUERIES))
api_targets = st.builds(lambda kind, ns, name, route, rev: f"/api/{kind}/{ns}/{name}/{route}/{rev}",
                        st.sampled_from(["models", "datasets", "Models"]), st.sampled_from(TOKENS[:20] + ["%2e%2e"]),
                        st.sampled_from(TOKENS[:20] + ["%2e"]), st.sampled_from(["paths-info", "tree", "revision"]),
                        st.sampled_from(["main", "v1", "%2e%2e", "refs%2Fpr%2F1"]))
raw_targets = st.binary(min_size=1, max_size=60).map(lambda b: b"/" + b.replace(b" ", b"%20").replace(b"\r", b"")
                                                     .replace(b"\n", b""))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root, access = build_hostile_store(tmp_path_factory.mktemp("prop"))
    srv = start_server(root, auth=load_auth(access), tree_page_size=4)
    yield srv
    srv.shutdown()
    srv.server_close()


BODIES = [b"paths=secret.txt&paths=x.txt", b"paths=..%2F..%2Foutside%2Fx.txt", b"paths=access.toml",
          b'{"paths": ["secret.txt", "data.txt", "../x.txt"]}', b"\xff\xfe", b""]


def _check(srv, target, method, token=None, body=b""):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if method == "POST":
        headers |= {"Content-Length": str(len(body)), "Content-Type": "application/x-www-form-urlencoded"}
    status, hdrs, body = raw_request(srv.server_address[1], target, method=method,  # raises on a dropped connection
                                     headers=headers, body=body if method == "POST" else b"")
    assert 100 <= status < 600
    for marker in SECRETS:
        assert marker not in body, (target, marker, status)
    if status >= 400:
        assert hdrs.get("X-Error-Code")
        assert all(" " <= c <= "~" for c in hdrs.get("X-Error-Message", ""))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.one_of(targets, api_targets), method=st.sampled_from(["GET", "HEAD", "POST"]), token=st.sampled_from([None, BOB, "hf_unknown"]),
       body=st.sampled_from(BODIES))
def test_composed_targets_never_leak_or_drop(hostile, target, method, token, body):
    _check(hostile, target, method, token, body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=raw_targets)
def test_raw_bytes_targets_never_leak_or_drop(hostile, target):
    _check(hostile, target, "GET")
