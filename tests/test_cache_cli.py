"""`qtk cache ls / verify / prune` against caches made by real pulls (qtk's and huggingface_hub's)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import rand
from hubtest import start_server, write_plain_repo

from qtk import errors
from qtk.hub._lock import EXCL_SUFFIX, Locker
from qtk.hub.download import plan_pull
from qtk.hub.scan import list_cache, parse_duration, prune_cache
from qtk.settings import Settings

BIG = 24 * 1024 * 1024 + 5
FILES = {"config.json": b'{"model_type": "llama"}\n', "model.safetensors": rand(BIG, 31),
         "a/__init__.py": b"", "b/__init__.py": b""}
SMALL = {"config.json": b'{"v": 2}\n', "weights.bin": rand(300_000, 32)}
DAY = 86400


@pytest.fixture(scope="module")
def cache_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("cachemirror")
    write_plain_repo(root, "acme/one", FILES)
    write_plain_repo(root, "acme/two", SMALL)
    srv = start_server(root)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def hub3(cache_hub, monkeypatch):
    cache_hub.faults.throttle_bps = 0
    monkeypatch.setenv("HF_ENDPOINT", cache_hub.url)
    return cache_hub


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _repo(cache_dir: Path, name: str = "one") -> Path:
    return cache_dir / f"models--acme--{name}"


def _interrupted_pull(hub, cache_dir: Path) -> None:
    """A real partial download: a pull of acme/one killed (-9) halfway through model.safetensors."""
    hub.faults.throttle_bps = 6e6
    start = hub.bytes_sent
    p = subprocess.Popen([sys.executable, "-m", "qtk", "pull", "acme/one", "--connections", "2", "-q"],
                         env={**os.environ, "HF_HUB_CACHE": str(cache_dir)}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while hub.bytes_sent - start < BIG // 3:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    hub.faults.throttle_bps = 0


# ------------------------------------------------------------------------------------------------ ls


def test_ls_shows_repos_revisions_and_resumable_partials(qtk, hub3, cache_dir):
    assert qtk("pull", "acme/two").exit_code == 0
    _interrupted_pull(hub3, cache_dir)
    doc = json.loads(qtk("cache", "ls", "--json").stdout)
    by_id = {r["repo_id"]: r for r in doc["repos"]}
    assert set(by_id) == {"acme/one", "acme/two"}
    (rev,) = by_id["acme/two"]["revisions"]
    assert rev["refs"] == ["main"] and rev["nb_files"] == 2 and rev["size_on_disk"] == sum(map(len, SMALL.values()))
    (part,) = [p for p in doc["partials"] if p["kind"] == "qtk"]
    plan = plan_pull("acme/one", settings=Settings.from_env(), check_access=False)
    (big,) = [p for p in plan.files if p.file.path == "model.safetensors"]
    assert part["repo_id"] == "acme/one" and part["oid"] == _sha(FILES["model.safetensors"])
    assert part["size"] == BIG and part["resumable_bytes"] == big.resumable > 0 and not part["in_use"]
    assert by_id["acme/one"]["partials"] == [part]
    # the same numbers as huggingface_hub's own scan (what `hf cache ls` shows)
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache_dir)
    assert {r.repo_id: r.size_on_disk for r in info.repos} == {k: v["size_on_disk"] for k, v in by_id.items()}
    text = qtk("cache", "ls")
    assert text.exit_code == 0 and "acme/two" in text.stdout and "resumable" in text.stdout
    assert [r["repo_id"] for r in json.loads(qtk("cache", "ls", "acme/two", "--json").stdout)["repos"]] == ["acme/two"]


def test_ls_of_a_missing_or_read_only_cache(qtk, tmp_path):
    doc = json.loads(qtk("cache", "ls", "--cache-dir", str(tmp_path / "nowhere"), "--json").stdout)
    assert doc["repos"] == [] and doc["partials"] == []
    assert not (tmp_path / "nowhere").exists()


def test_ls_marks_a_partial_being_downloaded(hub3, cache_dir):
    _interrupted_pull(hub3, cache_dir)
    lock = Locker().try_acquire(cache_dir / ".locks" / "models--acme--one" / f"{_sha(FILES['model.safetensors'])}.qtk.lock")
    try:
        (p,) = [p for p in list_cache(cache_dir).partials if p.kind == "qtk"]
        assert p.in_use
    finally:
        lock.release()
    (p,) = [p for p in list_cache(cache_dir).partials if p.kind == "qtk"]
    assert not p.in_use


# -------------------------------------------------------------------------------------------- verify


def _tamper(blob: Path) -> None:
    """Flip bytes but keep size and mtime: only a re-hash can tell."""
    st = blob.stat()
    with open(blob, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_verify_finds_and_repairs_a_damaged_blob(qtk, hub3, cache_dir):
    assert qtk("pull", "acme/one").exit_code == 0 and qtk("pull", "acme/two").exit_code == 0
    r = qtk("cache", "verify")
    assert r.exit_code == 0 and r.stdout.strip() == "ok"
    blob = _repo(cache_dir) / "blobs" / _sha(FILES["model.safetensors"])
    _tamper(blob)
    r = qtk("cache", "verify")
    assert r.exit_code == 20, r.stderr
    assert "model.safetensors" in r.stderr and "MISMATCH" in r.stderr and "--repair" in r.stderr
    doc = json.loads(qtk("cache", "verify", "acme/one", "--json").stdout)
    assert [m["oid"] for m in doc["mismatches"]] == [blob.name] and doc["exit_code"] == 20
    assert json.loads(qtk("cache", "verify", "acme/two", "--json").stdout)["mismatches"] == []
    r = qtk("cache", "verify", "--repair")
    assert r.exit_code == 0, r.stderr
    assert "repaired" in r.stderr
    assert blob.read_bytes() == FILES["model.safetensors"]
    assert qtk("cache", "verify").exit_code == 0


def test_verify_adopts_blobs_placed_by_huggingface_hub(qtk, hub3, cache_dir):
    from huggingface_hub import snapshot_download

    snapshot_download("acme/two", cache_dir=cache_dir, endpoint=hub3.url)
    r = qtk("cache", "verify", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["blobs_checked"] == 2
    records = _repo(cache_dir, "two") / ".qtk" / "verified"
    assert len(list(records.iterdir())) == 2
    hub3.faults.auth_headers.clear()
    doc = json.loads(qtk("pull", "acme/two", "--json").stdout)
    assert doc["stats"]["bytes_downloaded"] == 0


def test_verify_repair_offline_keeps_exit_20(qtk, hub3, cache_dir, monkeypatch):
    assert qtk("pull", "acme/two").exit_code == 0
    blob = _repo(cache_dir, "two") / "blobs" / _sha(SMALL["weights.bin"])
    _tamper(blob)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = qtk("cache", "verify", "--repair")
    assert r.exit_code == 20, r.stderr


# --------------------------------------------------------------------------------------------- prune


def _age(path: Path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t), follow_symlinks=False)


def test_prune_removes_only_what_no_pull_needs(qtk, hub3, cache_dir):
    assert qtk("pull", "acme/two").exit_code == 0
    _interrupted_pull(hub3, cache_dir)
    repo, locks = _repo(cache_dir), cache_dir / ".locks" / "models--acme--one"
    part = repo / "blobs" / f"{_sha(FILES['model.safetensors'])}.qtk-part"
    assert part.exists()
    # stale things, each of a different kind
    old_part = repo / "blobs" / ("1" * 64 + ".qtk-part")  # idle for 30 days, resumable state
    old_part.write_bytes(b"x" * 10)
    old_part.with_name(old_part.name + ".state.json").write_text("{}")
    _age(old_part, 30)
    hf_incomplete = repo / "blobs" / ("2" * 64 + ".incomplete")
    hf_incomplete.write_bytes(b"y" * 20)
    _age(hf_incomplete, 1)
    unref_old, unref_new = repo / "blobs" / ("3" * 40), repo / "blobs" / ("4" * 40)
    unref_old.write_bytes(b"z" * 30)
    unref_new.write_bytes(b"w" * 40)
    _age(unref_old, 1)
    orphan = repo / ".qtk" / "verified" / ("5" * 40)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_text("{}")
    free_lock = locks / ("6" * 40 + ".qtk.lock")
    free_lock.write_text("")
    stale_excl = locks / ("7" * 40 + f".qtk.lock{EXCL_SUFFIX}")
    stale_excl.write_text(json.dumps({"host": "node-9", "pid": 1, "id": "x"}))
    _age(stale_excl, 1)
    set_aside = locks / ("7" * 40 + f".qtk.lock{EXCL_SUFFIX}.broken-0a1b2c")  # a take-over that crashed midway
    set_aside.write_text("{}")
    _age(set_aside, 1)
    held_path = locks / ("8" * 40 + ".qtk.lock")
    held = Locker().try_acquire(held_path)
    try:
        dry = json.loads(qtk("cache", "prune", "--dry-run", "--json").stdout)
        planned = {Path(a["path"]) for a in dry["removed"]}
        expected = {old_part, old_part.with_name(old_part.name + ".state.json"), hf_incomplete, unref_old, orphan,
                    free_lock, stale_excl, set_aside}
        assert expected <= planned
        keep = {part, unref_new, held_path, *(p for p in (repo / "blobs").iterdir() if p.name in (
            _sha(FILES["config.json"]),))}
        assert not (keep & planned)
        assert all(p.exists() for p in expected)  # dry run: nothing removed
        r = qtk("cache", "prune", "--json")
        assert r.exit_code == 0
        assert {Path(a["path"]) for a in json.loads(r.stdout)["removed"]} == planned
        assert not any(p.exists() for p in expected)
        assert part.exists() and unref_new.exists() and held_path.exists()
    finally:
        held.release()
    # the cache is still whole: acme/two needs nothing, the interrupted acme/one resumes
    assert json.loads(qtk("pull", "acme/two", "--json").stdout)["stats"]["bytes_downloaded"] == 0
    doc = json.loads(qtk("pull", "acme/one", "--json").stdout)
    assert doc["stats"]["bytes_resumed"] > 0
    from huggingface_hub import scan_cache_dir

    assert not scan_cache_dir(cache_dir).warnings


def test_prune_partials_older_than(hub3, cache_dir):
    _interrupted_pull(hub3, cache_dir)
    (p,) = [p for p in list_cache(cache_dir).partials if p.kind == "qtk"]
    _age(p.path, 2)
    assert not [a for a in prune_cache(cache_dir, dry_run=True) if a.kind == "partial"]  # default 7 days
    gone = [a for a in prune_cache(cache_dir, partials_older_than=DAY) if a.kind == "partial"]
    assert {a.path for a in gone} == {p.path, p.path.with_name(p.path.name + ".state.json")}


@pytest.mark.parametrize("text,seconds", [("90", 90), ("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 7 * DAY),
                                          ("2w", 14 * DAY), ("1.5h", 5400), (" 3d ", 3 * DAY)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1d", "7 days", "1y", "d7", "1e3s"])
def test_parse_duration_refuses(qtk, text):
    with pytest.raises(errors.UsageError):
        parse_duration(text)
    assert qtk("cache", "prune", "--partials-older-than", text).exit_code == 2


@pytest.mark.parametrize("state", ["", "garbage", "[]", "{}", '{"size": "x", "digest": 5}', '{"size": 1e999}',
                                   '{"size": 10, "digest": ["sha256", "0"], "version": 99}', "\xff\xfe"])
def test_malformed_resume_state_is_listed_as_nothing_resumable_and_pruned(qtk, cache_dir, state):
    blobs = _repo(cache_dir) / "blobs"
    blobs.mkdir(parents=True)
    (_repo(cache_dir) / "snapshots").mkdir()
    part = blobs / ("9" * 64 + ".qtk-part")
    part.write_bytes(b"p" * 10)
    part.with_name(part.name + ".state.json").write_bytes(state.encode("latin-1"))
    doc = json.loads(qtk("cache", "ls", "--json").stdout)
    (p,) = doc["partials"]
    assert p["resumable_bytes"] == 0 and p["size"] == 10
    r = qtk("cache", "prune", "--json")
    assert r.exit_code == 0 and not part.exists()
