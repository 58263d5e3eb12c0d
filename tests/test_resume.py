"""Resume across processes: kill -9, Ctrl-C, and a network failure mid-file."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import BIG_SIZE

from qtk import errors
from qtk.hub import _fetch
from qtk.hub._fetch import workers
from qtk.hub.download import plan_pull, pull
from qtk.settings import Settings

pytestmark = pytest.mark.slow


def _start_pull(cache_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_CACHE": str(cache_dir)}
    return subprocess.Popen(
        [sys.executable, "-m", "qtk", "pull", "acme/big", "--connections", "4", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for_bytes(hub, start: int, target: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while hub.bytes_sent - start < target:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"pull ended early: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "download did not progress"
        time.sleep(0.01)


def _second_run_fraction(hub, cache_dir: Path) -> tuple[float, dict]:
    hub.faults.throttle_bps = 0
    before = hub.bytes_sent
    r = subprocess.run(
        [sys.executable, "-m", "qtk", "pull", "acme/big", "--json"],
        env={**os.environ, "HF_HUB_CACHE": str(cache_dir)}, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return (hub.bytes_sent - before) / BIG_SIZE, json.loads(r.stdout)


def _assert_complete(doc: dict, hub_root: Path) -> None:
    got = hashlib.sha256((Path(doc["path"]) / "model.safetensors").read_bytes()).hexdigest()
    assert got == hashlib.sha256((hub_root / "acme/big/model.safetensors").read_bytes()).hexdigest()
    assert not list(Path(doc["path"]).parents[1].rglob("*.qtk-part*"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_kill(hub, hub_root, cache_dir, sig):
    hub.faults.throttle_bps = 8e6  # per connection: 4 connections ~ 32 MB/s, so ~2 s for the file
    start = hub.bytes_sent
    proc = _start_pull(cache_dir)
    _wait_for_bytes(hub, start, BIG_SIZE // 2, proc)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "resume" in proc.stderr.read()
    parts = list(cache_dir.rglob("*.qtk-part"))
    assert len(parts) == 1 and parts[0].with_name(parts[0].name + ".state.json").exists()
    # a dry run sees what the killed run finished
    plan = plan_pull("acme/big", settings=Settings.from_env(hub_cache=cache_dir), check_access=False)
    (big,) = [p for p in plan.files if p.file.path == "model.safetensors"]
    assert big.resumable > BIG_SIZE // 4
    fraction, doc = _second_run_fraction(hub, cache_dir)
    assert fraction < 0.75, f"re-transferred {fraction:.0%} of the file"
    assert doc["stats"]["bytes_resumed"] > BIG_SIZE // 4
    _assert_complete(doc, hub_root)


def test_resume_after_network_failure(hub, hub_root, cache_dir, monkeypatch):
    monkeypatch.setattr(workers, "MAX_ATTEMPTS", 2)
    hub.faults.throttle_bps = 8e6
    settings = Settings.from_env(hub_cache=cache_dir)
    plan = plan_pull("acme/big", settings=settings, check_access=False)
    box: dict = {}

    def run():
        try:
            pull(plan, connections=4)
        except Exception as exc:
            box["exc"] = exc

    t = threading.Thread(target=run)
    start = hub.bytes_sent
    t.start()
    _wait_for_bytes(hub, start, BIG_SIZE // 2)
    hub.faults.reset_after = 0  # from now on every response is cut before its first byte
    hub.faults.resets["model.safetensors"] = 10**6
    t.join(timeout=60)
    assert isinstance(box.get("exc"), errors.NetworkError), box
    hub.faults.resets.clear()
    fraction, doc = _second_run_fraction(hub, cache_dir)
    assert fraction < 0.75
    _assert_complete(doc, hub_root)


def test_stale_state_for_other_content_starts_over(hub, hub_root, cache_dir):
    """A part file whose state describes another file (size/hash) is not trusted."""
    plan = plan_pull("acme/big", settings=Settings.from_env(hub_cache=cache_dir), check_access=False)
    (big,) = [p for p in plan.files if p.file.path == "model.safetensors"]
    part = plan.target.part_path(big.file)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"\0" * BIG_SIZE)
    state = {"version": 1, "size": BIG_SIZE, "digest": ["sha256", "0" * 64], "chunk_size": _fetch.DEFAULT_CHUNK,
             "done": [0, 1, 2], "partial": {}}
    part.with_name(part.name + ".state.json").write_text(json.dumps(state))
    result = pull(plan_pull("acme/big", settings=Settings.from_env(hub_cache=cache_dir), check_access=False))
    assert result.stats.bytes_resumed == 0 and result.stats.refetches == 0
    _assert_complete(result.to_dict(), hub_root)


def _peak_rss_mb(args: list[str], env: dict) -> float:
    """VmHWM of a qtk process, read by itself: ru_maxrss would include the forked pytest's RSS."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['qtk', *{args!r}]\n"
        "try:\n    runpy.run_module('qtk', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def test_peak_memory_stays_flat(hub, cache_dir):
    """Pulling a 64 MiB file costs no more memory than pulling a few kB (the benchmark does 1 GiB)."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache_dir)}
    small = _peak_rss_mb(["pull", "acme/paged", "-q"], env)
    big = _peak_rss_mb(["pull", "acme/big", "-q"], env)
    assert big < 250, big
    assert big - small < 60, (small, big)  # buffers: 1 MiB per connection + 4 MiB for hashing
