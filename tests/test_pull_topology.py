"""`qtk pull` on the Hub's topology: the endpoint redirects LFS files to a second origin (tests/cdntest.py)
with signed URLs that expire, GET only, rate limits and faults. Every test also checks, on the CDN's
request log, that the token never reached it and that no HEAD did."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cdntest import route_of, start_topology
from conftest import rand
from hubtest import ALICE, test_auth, write_plain_repo

from qtk import errors
from qtk.hub._fetch import resolver
from qtk.hub._retry import RetryPolicy
from qtk.hub.download import plan_pull, pull
from qtk.mirror.app import RepoPolicy
from qtk.settings import Settings

BIG = 64 * 1024 * 1024 + 4321  # 32 ranges of ~2 MiB at 16 connections
SMALL = 5 * 1024 * 1024 + 17  # LFS (.bin), 3 ranges of 2 MiB


@pytest.fixture(scope="module")
def topo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("topology")
    write_plain_repo(root, "acme/cdn-gated", {"config.json": b'{"cdn": true}\n', "model.safetensors": rand(BIG, 11)})
    write_plain_repo(root, "acme/cdn-small", {"config.json": b"{}\n", "weights.bin": rand(SMALL, 12)})
    # not LFS (a text file under 10 MB): the endpoint serves it itself, in 3 ranges
    write_plain_repo(root, "acme/plain", {"notes.txt": rand(SMALL, 13).hex().encode()[:SMALL]})
    return root


@pytest.fixture(scope="module")
def topo_server(topo_root):
    auth = test_auth()
    auth.repos["acme/cdn-gated"] = RepoPolicy(gated=True, allow=frozenset({"alice"}))
    t = start_topology(topo_root, auth=auth)
    yield t
    t.close()


@pytest.fixture
def topo(topo_server, monkeypatch):
    topo_server.reset()
    topo_server.signer.ttl = 3600.0
    monkeypatch.setenv("HF_ENDPOINT", topo_server.endpoint.url)
    yield topo_server
    topo_server.cdn.stall_release.set()  # free server threads held by a stall
    topo_server.endpoint.stall_release.set()
    cdn = list(topo_server.cdn.log)
    assert not [e for e in cdn if e.method != "GET"], "a HEAD (or other non-GET) reached the CDN"
    assert not [e for e in cdn if "Authorization" in e.headers], "the token reached the CDN"


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _resolves(topo, name: str) -> list:
    return [e for e in topo.endpoint.log if route_of(e.path) == "resolve" and e.path.endswith("/" + name)]


def _pull(repo: str, **kw):
    retry = kw.pop("retry", None)
    plan = plan_pull(repo, settings=Settings.from_env(), retry=retry)
    return pull(plan, retry=retry, **kw)


@pytest.mark.slow
def test_gated_pull_completes_while_urls_expire_every_second(topo, topo_root, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    topo.signer.ttl = 1.0
    topo.cdn.faults.throttle_bps = 1e6  # 16 connections x 1 MB/s: ~4 s, so URLs expire mid-pull
    result = _pull("acme/cdn-gated", connections=16)
    assert sha256(result.path / "model.safetensors") == sha256(topo_root / "acme/cdn-gated/model.safetensors")
    expired = [e for e in topo.cdn.log if e.status == 403]
    assert expired, "no URL expired during the pull: the test did not test anything"
    resolves = _resolves(topo, "model.safetensors")
    # one resolve per expired URL at most, however many of the 16 connections held it
    distinct_expired = {e.query for e in expired}
    assert len(resolves) >= 2
    assert len(resolves) <= 1 + len(distinct_expired)
    assert all(e.method == "HEAD" and e.headers.get("Authorization") == f"Bearer {ALICE}" for e in resolves)


def test_hash_mismatch_on_a_gated_repo_is_refetched_with_the_token(topo, topo_root, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    topo.cdn.faults.corrupt = 1
    result = _pull("acme/cdn-gated", connections=8)
    assert result.stats.refetches == 1
    assert sha256(result.path / "model.safetensors") == sha256(topo_root / "acme/cdn-gated/model.safetensors")
    resolves = _resolves(topo, "model.safetensors")
    assert len(resolves) >= 2  # the first resolve, and the one for the re-fetch from zero
    assert all(e.headers.get("Authorization") == f"Bearer {ALICE}" for e in resolves)


def test_a_fresh_url_that_is_refused_ends_after_a_few_tries(topo, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    monkeypatch.setattr(resolver, "MAX_REFUSED_URLS", 2)
    topo.signer.ttl = -10.0  # every signed URL is already expired when it arrives
    with pytest.raises(errors.AccessDeniedError, match="keep being refused"):
        _pull("acme/cdn-gated", connections=4, retry=RetryPolicy(base_delay=0.05))
    # the first resolve, then one per refused URL up to the budget; not one per connection
    assert len(_resolves(topo, "model.safetensors")) == 1 + 2


@pytest.mark.parametrize(
    "where,arm",
    [
        ("cdn", lambda t: setattr(t.cdn.faults, "too_many", 1)),
        ("resolve", lambda t: t.endpoint.endpoint_faults.too_many.update(resolve=1)),
        ("info", lambda t: t.endpoint.endpoint_faults.too_many.update(info=1)),
        ("tree", lambda t: t.endpoint.endpoint_faults.too_many.update(tree=1)),
    ],
)
def test_retry_after_is_honoured(topo, where, arm):
    """A 429 with Retry-After: 2 on each kind of request: the next request of that kind comes >= 2 s
    later (measured on the server's log; backoff alone would wait 0.25-0.75 s)."""
    topo.cdn.faults.retry_after = topo.endpoint.endpoint_faults.retry_after = "2"
    arm(topo)
    _pull("acme/cdn-small", connections=1)
    if where == "cdn":
        log = list(topo.cdn.log)
        i = next(k for k, e in enumerate(log) if e.status == 429)
    else:
        log = [e for e in topo.endpoint.log if route_of(e.path) == where]
        i = 0  # the fault hit the first request of that kind
    gap = log[i + 1].t - log[i].t
    assert 1.9 <= gap < 30, gap


@pytest.mark.parametrize("where", ["cdn", "resolve", "info"])
def test_retry_after_beyond_the_cap_fails_at_once_with_the_number(topo, where):
    topo.cdn.faults.retry_after = topo.endpoint.endpoint_faults.retry_after = "3600"
    if where == "cdn":
        topo.cdn.faults.too_many = 100
    else:
        topo.endpoint.endpoint_faults.too_many[where] = 100
    with pytest.raises(errors.NetworkError, match="retry after 3600 s") as exc:
        _pull("acme/cdn-small", connections=1)
    assert exc.value.exit_code == 30
    hits = [e for e in (topo.cdn.log if where == "cdn" else topo.endpoint.log)
            if where == "cdn" or route_of(e.path) == where]
    assert len(hits) == 1  # not retried early


@pytest.mark.parametrize(
    "fault",
    [
        {"drops": 3},  # TCP reset mid-body
        {"stalls": 1, "stall_s": 30},  # body stops: the read timeout (HF_HUB_DOWNLOAD_TIMEOUT=1) fires
        {"missing": 0, "too_many": 2, "retry_after": "0"},  # 429 with Retry-After: 0
    ],
)
def test_transient_cdn_faults_are_retried(topo, topo_root, monkeypatch, fault):
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    for k, v in fault.items():
        setattr(topo.cdn.faults, k, v)
    result = _pull("acme/cdn-small", connections=2)
    assert sha256(result.path / "weights.bin") == sha256(topo_root / "acme/cdn-small/weights.bin")
    assert result.stats.retries >= 1


def test_a_404_from_the_cdn_is_a_server_error_not_a_missing_file(topo, qtk):
    topo.cdn.faults.missing = 100
    r = qtk("pull", "acme/cdn-small", "--connections", "2")
    assert r.exit_code == 30, r.stderr
    assert "404" in r.stderr and "download server" in r.stderr
    assert "not found in" not in r.stderr
    assert "Signature" not in r.stderr and "Expires" not in r.stderr  # a signed URL's query is a credential


@pytest.mark.parametrize("connections", [1, 16])
def test_a_cdn_that_ignores_range_is_streamed_whole(topo, topo_root, qtk, connections):
    topo.cdn.faults.ignore_range = True
    r = qtk("pull", "acme/cdn-small", "--connections", str(connections), "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sha256(Path(doc["path"]) / "weights.bin") == sha256(topo_root / "acme/cdn-small/weights.bin")
    assert {e.status for e in topo.cdn.log} == {200}
    # at most one whole-file body per connection that asked for a range, plus the one stream
    assert len(list(topo.cdn.log)) <= min(connections, 3) + 1


@pytest.mark.parametrize("connections", [1, 16])
def test_an_endpoint_that_ignores_range_is_streamed_whole(topo, topo_root, qtk, connections):
    """The probe: "re-run with --connections 1" led to the same error. Now any --connections works."""
    topo.endpoint.endpoint_faults.ignore_range = True
    r = qtk("pull", "acme/plain", "--connections", str(connections), "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (Path(doc["path"]) / "notes.txt").read_bytes() == (topo_root / "acme/plain/notes.txt").read_bytes()
    gets = [e for e in topo.endpoint.log if e.method == "GET" and e.path.endswith("/notes.txt")]
    assert 1 <= len(gets) <= min(connections, 3) + 1


def test_token_never_printed_and_never_sent_to_the_cdn_through_the_cli(topo, qtk, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    r = qtk("pull", "acme/cdn-gated", "--include", "*.json", "--json")
    assert r.exit_code == 0, r.stderr
    assert ALICE not in r.stdout + r.stderr


def test_huggingface_hub_downloads_from_the_same_topology(topo, topo_root, tmp_path):
    """The fixture is Hub-like enough for the reference client: hf's own snapshot_download works."""
    from huggingface_hub import snapshot_download

    p = snapshot_download("acme/cdn-gated", cache_dir=tmp_path / "hf", endpoint=topo.endpoint.url, token=ALICE,
                          allow_patterns=["*.json"])
    assert (Path(p) / "config.json").read_bytes() == (topo_root / "acme/cdn-gated/config.json").read_bytes()
