"""qtk provision on a store shared by several hosts: leases own temporaries, a second host's (or a
pod's own PID namespace's) live run is never cleaned, an expired lease is; per-run event files
lose nothing under concurrent writers. Fast: no model, no torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtk.provision.lease import Lease, LeaseInfo, fs_now, host_id, lease_expired
from qtk.provision.store import ProvisionStore

HOLDER = textwrap.dedent("""
    import sys, time
    from qtk.provision.store import ProvisionStore
    s = ProvisionStore(sys.argv[1]); s.init(); s.start_lease()
    ws = s.builds / s.tmp_name("k" * 24); ws.mkdir(); (ws / "part.safetensors").write_bytes(b"x" * 1000)
    (s.artifacts / s.tmp_name("v" * 24)).mkdir()
    s.log_event({"ts": "2026", "run": "holder", "step": "quantize", "result": "start"})
    print(s.lease.id, flush=True)
    time.sleep(600)
""")


def _holder(store: Path, env: dict | None = None, prefix: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([*(prefix or []), sys.executable, "-c", HOLDER, str(store)], stdout=subprocess.PIPE,
                         text=True, env={**os.environ, **(env or {})})
    lid = p.stdout.readline().strip()
    assert lid, "holder did not start"
    return p, lid


def _temps(store: ProvisionStore) -> list[str]:
    return sorted(p.name for d in (store.builds, store.artifacts) for p in d.glob(".*"))


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


@pytest.fixture
def store(tmp_path) -> ProvisionStore:
    s = ProvisionStore(tmp_path / "store")
    s.init()
    return s


def test_second_host_live_run_is_never_cleaned_expired_lease_is(store, monkeypatch):
    p, lid = _holder(store.root, {"QTK_HOST_ID": "node-b"})
    try:
        assert lid.startswith("node-b-")
        before = _temps(store)
        assert len(before) == 2 and all(n.endswith(f".tmp-{lid}") for n in before)
        monkeypatch.setenv("QTK_HOST_ID", "node-a")
        assert store.clean_stale() == []
        p.kill()  # the other host's process is gone, but this host cannot know: its heartbeat decides
        p.wait()
        assert store.clean_stale() == [] and _temps(store) == before
        _age(store.leases / f"{lid}.json", 121)  # heartbeat silent past the TTL (the filesystem's clock)
        removed = store.clean_stale()
        assert len(removed) == 2 and _temps(store) == []
        assert not (store.leases / f"{lid}.json").exists()
    finally:
        p.kill()
        p.wait()


def test_same_host_dead_process_is_cleaned_at_once(store):
    p, lid = _holder(store.root)
    assert lid.startswith(host_id() + "-")
    assert store.clean_stale() == []  # alive: kept
    p.kill()
    p.wait()
    assert len(store.clean_stale()) == 2 and _temps(store) == []


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare(1) for a separate PID namespace")
def test_pod_in_its_own_pid_namespace_same_host_name_is_not_cleaned(store):
    """A Kubernetes pod sharing the node's host name (hostNetwork) but not its PID namespace: its pid
    is a small number that is not alive (or is someone else) here. Only its heartbeat counts."""
    p, lid = _holder(store.root, prefix=["unshare", "--pid", "--fork", "--mount-proc"])
    try:
        info = LeaseInfo.read(store.leases / f"{lid}.json")
        assert info.host == host_id() and info.pid is not None and info.pid < 10  # pid inside the namespace
        assert store.clean_stale() == [] and len(_temps(store)) == 2
    finally:
        p.kill()
        p.wait()


def test_temporaries_without_lease_and_legacy_names_age_out(store):
    young = store.reports / f".x.json.tmp-{host_id()}-0123456789ab"  # a lease id whose lease file is gone
    old = store.reports / f".y.json.tmp-{host_id()}-ba9876543210"
    legacy = store.builds / ".k.qtk-tmp-999999"  # qtk before leases: pid only, maybe another host's
    for f in (young, old, legacy):
        f.write_text("{}")
    _age(old, 200)
    _age(legacy, 3600)
    assert store.clean_stale() == [str(old)]
    _age(legacy, 25 * 3600)
    assert store.clean_stale() == [str(legacy)]
    assert young.exists()


def test_build_workspace_owned_by_a_live_lease_waits_expired_one_is_taken_keeping_the_checkpoint(store, monkeypatch):
    key = "k" * 24
    monkeypatch.setenv("QTK_HOST_ID", "node-b")
    store.start_lease()
    ws = store.claim_workspace(key)
    (ws / f".{key}.qtk-work").mkdir()
    (ws / f".{key}.qtk-work" / "layer-3.pt").write_bytes(b"ckpt")
    (ws / f".{key}.qtk-tmp-4242").mkdir()  # the method's half-written output
    lease_b = store.lease
    monkeypatch.setenv("QTK_HOST_ID", "node-a")
    other = ProvisionStore(store.root)
    other.start_lease()
    try:
        assert other.clean_stale() == [] and (ws / f".{key}.qtk-tmp-4242").is_dir()
        with pytest.raises(Exception, match="still building"):
            other.claim_workspace(key, timeout=0.5, poll=0.1)  # node-b's run is alive: not taken
        lease_b._stop.set()  # node-b froze: no more heartbeats
        lease_b._thread.join()
        _age(lease_b.path, 500)
        assert other.clean_stale() == [str(ws)]
        assert sorted(p.name for p in ws.iterdir()) == [f".{key}.qtk-work"]  # the checkpoint stays at its path
        assert other.claim_workspace(key) == ws and (ws / ".owner").read_text() == other.lease.id
        other.release_workspace(key, finished=True)
        assert not ws.exists()
    finally:
        other.lease.close()


@pytest.mark.parametrize("content", [
    b"", b"not json", b"[1, 2]", b'"text"', b'{"pid": "12"}', b'{"pid": -1, "host": 5}', b'{"pid": 99999999999}',
    b'{"host": "\\u0000\\u001b[31m", "pid": true}', b"\xff\xfe", json.dumps({"pid": 1, "boot": None}).encode(),
])
def test_malformed_lease_files_never_crash_fresh_kept_old_cleaned(store, content):
    lid = "node-z-00000000000a"
    lp = store.leases / f"{lid}.json"
    lp.write_bytes(content)
    tmp = store.artifacts / f".v.tmp-{lid}"
    tmp.mkdir()
    assert store.clean_stale() == []  # unreadable or foreign owner + fresh heartbeat: alive
    _age(lp, 1000)
    assert store.clean_stale() == [str(tmp)] and not lp.exists()


def test_lease_expiry_uses_the_filesystems_clock(store):
    lease = Lease(store.leases).start()
    try:
        now = fs_now(store.leases)
        info = LeaseInfo.read(lease.path)
        assert not lease_expired(info, lease.path, now, ttl=5)
        assert lease_expired(info, lease.path, now + 6, ttl=5)
        assert lease_expired(None, store.leases / "missing.json", now, ttl=5)
    finally:
        lease.close()
    assert not lease.path.exists()


_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(_names, min_size=1, max_size=6, unique=True))
def test_clean_removes_only_expired_temporaries(store, names):
    """Any other file names in the store (outside input: other tools, users) survive a clean."""
    made = []
    for n in names:
        p = store.reports / n
        if n in (".", "..") or len(n.encode()) > 200:
            continue
        p.write_text("x")
        made.append(p)
    store.clean_stale()
    for p in made:
        assert p.exists() or ".tmp-" in p.name or ".qtk-link-" in p.name or ".qtk-tmp-" in p.name \
            or ".qtk-old-" in p.name, p
        p.unlink(missing_ok=True)


WRITER = textwrap.dedent("""
    import sys
    from qtk.provision.store import ProvisionStore
    s = ProvisionStore(sys.argv[1])
    for i in range(300):
        s.log_event({"ts": f"2026-01-01T00:00:{i % 60:02d}Z", "run": sys.argv[2], "i": i, "pad": "x" * 3000})
""")


def test_concurrent_writers_lose_and_interleave_no_event(store):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store.root), f"run{w}"]) for w in range(4)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    evs = store.events()
    assert len(evs) == 1200
    for w in range(4):
        assert [e["i"] for e in evs if e["run"] == f"run{w}"] == sorted(range(300), key=lambda i: i % 60)


def _cache_files(root: Path, names: list[str]) -> dict[str, Path]:
    out = {}
    for n in names:
        p = root / "snapshots" / "c0ffee" / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(n.encode())
        out[n] = p
    return out


def test_source_view_holds_exactly_the_planned_files_and_is_reused(store, tmp_path):
    files = _cache_files(tmp_path / "hf", ["config.json", "model.safetensors", "sub/tokenizer.json"])
    (tmp_path / "hf" / "snapshots" / "c0ffee" / "consolidated.safetensors").write_bytes(b"not planned")
    view = store.source_view("k" * 24, files)
    got = sorted(str(p.relative_to(view)) for p in view.rglob("*") if not p.is_dir())
    assert got == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert all((view / n).is_symlink() and (view / n).read_bytes() == n.encode() for n in files)
    ino = view.stat().st_ino
    assert store.source_view("k" * 24, files) == view and view.stat().st_ino == ino  # reused, not rebuilt
    assert not [p for p in store.sources.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize("damage", ["dangling", "extra", "missing", "wrong-target", "a-file"])
def test_source_view_damaged_is_rebuilt(store, tmp_path, damage):
    files = _cache_files(tmp_path / "hf", ["config.json", "model.safetensors"])
    view = store.source_view("d" * 24, files)
    if damage == "dangling":
        (view / "config.json").unlink()
        (view / "config.json").symlink_to(tmp_path / "gone")
    elif damage == "extra":
        (view / "consolidated.safetensors").write_bytes(b"x")
    elif damage == "missing":
        (view / "model.safetensors").unlink()
    elif damage == "wrong-target":
        (view / "config.json").unlink()
        (view / "config.json").symlink_to(files["model.safetensors"])
    else:
        (view / "config.json").unlink()
        (view / "config.json").write_bytes(b"a copy")
    view = store.source_view("d" * 24, files)
    assert sorted(p.name for p in view.iterdir()) == ["config.json", "model.safetensors"]
    assert all(os.readlink(view / n) == str(t) for n, t in files.items())


def test_source_view_refuses_files_missing_from_the_cache(store, tmp_path):
    from qtk import errors

    files = _cache_files(tmp_path / "hf", ["config.json"])
    files["model.safetensors"] = tmp_path / "hf" / "snapshots" / "c0ffee" / "model.safetensors"  # never pulled
    with pytest.raises(errors.LocalNotFoundError, match="model.safetensors"):
        store.source_view("m" * 24, files)
    assert not (store.sources / ("m" * 24)).exists() and not list(store.sources.iterdir())
