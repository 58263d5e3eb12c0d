"""Locks on shared caches: flock where it works, exclusive lock files with a heartbeat where it does not.

The "filesystem whose flock fails" is simulated two ways: in-process by patching ``fcntl.flock`` as
qtk.hub._lock sees it, and for whole ``qtk pull`` processes by a ``sitecustomize`` that patches
``fcntl.flock`` (and, to model a second host, ``socket.gethostname``) before qtk starts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import rand
from hubtest import start_server, write_plain_repo

from qtk._proc import Owner
from qtk.hub import _lock
from qtk.hub._fetch import resumable_bytes
from qtk.hub._lock import EXCL_SUFFIX, EXCLUSIVE_FILE, FLOCK, Locker, LockWaitTimeout

BIG = 12 * 1024 * 1024 + 321
FILES = {"config.json": b'{"model_type": "llama"}\n', "a.safetensors": rand(BIG, 21), "b.safetensors": rand(BIG, 22)}
TOTAL = sum(len(v) for v in FILES.values())


@pytest.fixture(scope="module")
def lock_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("lockmirror")
    write_plain_repo(root, "acme/locks", FILES)
    srv = start_server(root)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def hub2(lock_hub, monkeypatch):
    lock_hub.faults.throttle_bps = 0
    monkeypatch.setenv("HF_ENDPOINT", lock_hub.url)
    return lock_hub


@pytest.fixture
def no_flock(monkeypatch):
    """This process's view of a filesystem where flock() fails with ENOLCK."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(_lock, "_modes", {})
    monkeypatch.setattr(_lock.fcntl, "flock", refuse)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------- in-process


def test_flock_mode_excludes_another_locker(tmp_path):
    p = tmp_path / "x.lock"
    one, two = Locker(), Locker()
    lock = one.try_acquire(p)
    assert lock is not None and lock.mode == FLOCK
    assert two.try_acquire(p) is None
    lock.release()
    again = two.try_acquire(p)
    assert again is not None
    again.release()


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_fallback_to_exclusive_files_when_flock_fails(tmp_path, monkeypatch, capsys, code):
    def refuse(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_lock, "_modes", {})
    monkeypatch.setattr(_lock.fcntl, "flock", refuse)
    one, two = Locker(), Locker()
    locks = [one.try_acquire(tmp_path / f"f{i}.lock") for i in range(3)]
    assert all(lk is not None and lk.mode == EXCLUSIVE_FILE for lk in locks)
    err = capsys.readouterr().err
    assert err.count("file locks do not work") == 1 and errno.errorcode[code] in err  # said once
    info = json.loads((tmp_path / f"f0.lock{EXCL_SUFFIX}").read_text())
    assert info["pid"] == os.getpid() and info["host"] and len(info["id"]) >= 16
    assert two.try_acquire(tmp_path / "f0.lock") is None
    locks[0].release()
    assert not (tmp_path / f"f0.lock{EXCL_SUFFIX}").exists()
    assert two.try_acquire(tmp_path / "f0.lock") is not None
    one.close()
    two.close()
    assert not list(tmp_path.glob(f"*{EXCL_SUFFIX}"))


def test_other_flock_errors_are_not_hidden(tmp_path, monkeypatch):
    def broken(fd, op):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(_lock, "_modes", {})
    monkeypatch.setattr(_lock.fcntl, "flock", broken)
    with pytest.raises(OSError) as info:
        Locker().try_acquire(tmp_path / "x.lock")
    assert info.value.errno == errno.EIO


def _write_holder(path: Path, **info) -> None:
    path.write_text(json.dumps({"id": "someone-else", "created": time.time(), **info}))


def test_lock_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path, no_flock):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    base = tmp_path / "x.lock"
    _write_holder(Path(str(base) + EXCL_SUFFIX), **{**Owner.current().to_dict(), "pid": dead.pid})
    said = []
    lock = Locker(notify=said.append).try_acquire(base)
    assert lock is not None
    assert len(said) == 1 and f"pid {dead.pid}" in said[0] and "gone" in said[0]


def test_lock_of_another_host_is_taken_over_when_its_heartbeat_stops(tmp_path, no_flock):
    base = tmp_path / "x.lock"
    _write_holder(Path(str(base) + EXCL_SUFFIX), host="node-17", pid=1)
    said = []
    locker = Locker(stale_after=0.3, notify=said.append)
    assert locker.try_acquire(base) is None  # first sight: the clock starts now
    time.sleep(0.35)
    lock = locker.try_acquire(base)
    assert lock is not None and "node-17" in said[0] and "heartbeat" in said[0]
    locker.close()


def test_a_live_holder_keeps_its_lock_by_heartbeat(tmp_path, no_flock):
    base = tmp_path / "x.lock"
    holder = Locker(heartbeat=0.05)
    held = holder.try_acquire(base)
    # the holder's host is remote as far as the waiter knows: only the heartbeat can keep the lock
    waiter = Locker(stale_after=2.0)
    waiter.host = "another-host"
    with pytest.raises(LockWaitTimeout) as info:
        waiter.acquire(base, timeout=3.0, poll=0.05)
    assert info.value.holder["pid"] == os.getpid()
    assert not held.lost
    holder.close()


def test_a_holder_notices_when_its_lock_was_taken_over(tmp_path, no_flock):
    base = tmp_path / "x.lock"
    said = []
    holder = Locker(heartbeat=0.05, notify=said.append)
    held = holder.try_acquire(base)
    path = Path(str(base) + EXCL_SUFFIX)
    path.unlink()
    _write_holder(path, host="node-3", pid=42)  # someone broke it and took it
    deadline = time.monotonic() + 10
    while not held.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert held.lost and "taken over" in said[0]
    held.release()
    assert json.loads(path.read_text())["host"] == "node-3"  # the new holder's file is left alone
    holder.close()


def test_breaking_never_removes_a_fresh_lock(tmp_path):
    path = tmp_path / f"x.lock{EXCL_SUFFIX}"
    _write_holder(path, host="h", pid=1)
    ino = path.stat().st_ino
    path.unlink()
    _write_holder(path, host="h2", pid=2, id="fresh")  # replaced between the staleness check and the break
    assert Locker._break(path, "someone-else", ino) is False
    assert json.loads(path.read_text())["host"] == "h2"


@pytest.mark.parametrize(
    "fstype,options,local_only",
    [
        ("nfs4", "rw,relatime,vers=4.2,local_lock=none", False),
        ("nfs4", "rw,relatime,vers=4.2,local_lock=flock", True),
        ("nfs", "rw,vers=3,nolock,local_lock=all", True),
        ("lustre", "rw,flock", False),
        ("lustre", "rw,localflock", True),
        ("beegfs", "rw", True),
        ("gpfs", "rw", False),
        ("ext4", "rw,relatime", False),
    ],
)
def test_filesystems_where_flock_is_local_only(monkeypatch, tmp_path, fstype, options, local_only):
    monkeypatch.setattr(_lock, "_mount_of", lambda path: (fstype, options, "/mnt/x"))
    assert _lock.flock_is_local_only(tmp_path) is local_only


def test_mount_of_finds_the_mount_holding_a_path(tmp_path):
    fstype, _, mnt = _lock._mount_of(tmp_path)
    assert fstype and str(tmp_path).startswith(mnt)


# ------------------------------------------------------------------------------------- whole processes

SITE = """
import errno, fcntl, os, socket
def _refuse(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = _refuse
if os.environ.get("FAKE_HOSTNAME"):
    socket.gethostname = lambda: os.environ["FAKE_HOSTNAME"]
if os.environ.get("FAKE_STALE_AFTER"):
    import qtk.hub._lock as L
    L.STALE_AFTER_S = float(os.environ["FAKE_STALE_AFTER"])
    L.HEARTBEAT_S = L.STALE_AFTER_S / 10
"""


def _env(tmp_path: Path, cache: Path, host: str, *, no_flock: bool = True, stale: float | None = None) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITE))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "FAKE_HOSTNAME": host}
    if no_flock:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    if stale is not None:
        env["FAKE_STALE_AFTER"] = str(stale)
    return env


def _pull(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qtk", "pull", "acme/locks", "--connections", "4", "--json", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_bytes(hub, start: int, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while hub.bytes_sent - start < n:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)


def _check_snapshot(doc: dict) -> None:
    for rel, data in FILES.items():
        assert (Path(doc["path"]) / rel).read_bytes() == data


@pytest.mark.slow
def test_two_hosts_pull_into_a_cache_where_flock_fails(hub2, cache_dir, tmp_path):
    hub2.faults.throttle_bps = 10e6
    start = hub2.bytes_sent
    procs = [_pull(_env(tmp_path, cache_dir, host)) for host in ("node-a", "node-b")]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        # said at most once per process; a host that started late may find every file placed and need no lock
        assert err.count("file locks do not work") <= 1
        _check_snapshot(json.loads(out))
    assert any("file locks do not work" in err for _, err in outs)
    assert hub2.bytes_sent - start < 1.3 * TOTAL  # each file crossed the network about once
    assert not list(cache_dir.rglob(f"*{EXCL_SUFFIX}")) and not list(cache_dir.rglob("*.qtk-part*"))


@pytest.mark.slow
def test_a_killed_holder_on_another_host_is_taken_over_and_its_work_resumed(hub2, cache_dir, tmp_path):
    hub2.faults.throttle_bps = 4e6
    start = hub2.bytes_sent
    a = _pull(_env(tmp_path, cache_dir, "node-a", stale=1.5))
    _wait_bytes(hub2, start, TOTAL // 3)
    a.send_signal(signal.SIGKILL)
    a.wait(timeout=30)
    assert list(cache_dir.rglob(f"*{EXCL_SUFFIX}")), "node-a's lock files stay behind after kill -9"
    hub2.faults.throttle_bps = 0
    b = _pull(_env(tmp_path, cache_dir, "node-b", stale=1.5))
    out, err = b.communicate(timeout=120)
    assert b.returncode == 0, err
    assert "took over the stale lock" in err and "node-a" in err
    doc = json.loads(out)
    assert doc["stats"]["bytes_resumed"] > 0  # node-a's state file was taken over with its lock
    _check_snapshot(doc)
    assert not list(cache_dir.rglob(f"*{EXCL_SUFFIX}"))


def _lock_path(cache_dir: Path, data: bytes) -> Path:
    return cache_dir / ".locks" / "models--acme--locks" / f"{_sha(data)}.qtk.lock"


def _part(cache_dir: Path, data: bytes) -> Path:
    return cache_dir / "models--acme--locks" / "blobs" / f"{_sha(data)}.qtk-part"


@pytest.mark.slow
def test_state_keeps_being_flushed_while_waiting_for_a_lock(hub2, cache_dir, tmp_path):
    """a.safetensors is locked by another process; b.safetensors downloads meanwhile. A kill -9 during
    the wait keeps what b got."""
    locker = Locker()
    held = locker.try_acquire(_lock_path(cache_dir, FILES["a.safetensors"]))
    try:
        hub2.faults.throttle_bps = 4e6
        start = hub2.bytes_sent
        p = _pull(_env(tmp_path, cache_dir, "node-a", no_flock=False))
        _wait_bytes(hub2, start, BIG // 2)
        time.sleep(0.3)  # > the 50 ms flush period
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        part = _part(cache_dir, FILES["b.safetensors"])
        done = resumable_bytes(part, BIG, ("sha256", _sha(FILES["b.safetensors"])))
        assert done >= BIG // 4, done
    finally:
        held.release()
        locker.close()


def test_lock_timeout_is_exit_22(qtk, hub2, cache_dir):
    locker = Locker()
    held = locker.try_acquire(_lock_path(cache_dir, FILES["a.safetensors"]))
    try:
        r = qtk("pull", "acme/locks", "--lock-timeout", "0.5")
        assert r.exit_code == 22, r.stderr
        assert "a.safetensors" in r.stderr and "--lock-timeout" in r.stderr
    finally:
        held.release()
        locker.close()
    r = qtk("pull", "acme/locks", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["stats"]["bytes_downloaded"] == BIG  # only a.safetensors was still missing
    _check_snapshot(doc)


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_lock_timeout_must_be_a_non_negative_number(qtk, value):
    r = qtk("pull", "acme/locks", "--lock-timeout", value)
    assert r.exit_code == 2


@pytest.mark.slow
def test_a_holder_whose_lock_is_taken_over_stops_writing_state_and_places_nothing(hub2, cache_dir, no_flock,
                                                                                 monkeypatch):
    import threading

    from qtk import errors
    from qtk.hub.download import plan_pull, pull
    from qtk.settings import Settings

    monkeypatch.setattr(_lock, "HEARTBEAT_S", 0.05)
    hub2.faults.throttle_bps = 2e6
    plan = plan_pull("acme/locks", settings=Settings.from_env(hub_cache=cache_dir), check_access=False,
                     include=["a.safetensors"])
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", _capture(lambda: pull(plan, connections=2))))
    start = hub2.bytes_sent
    t.start()
    _wait_bytes(hub2, start, 2 * 1024 * 1024)
    excl = Path(str(_lock_path(cache_dir, FILES["a.safetensors"])) + EXCL_SUFFIX)
    excl.unlink()  # another host broke the lock (this holder looked dead to it) and took it
    excl.write_text(json.dumps({"host": "node-b", "pid": 7, "id": "theirs"}))
    time.sleep(0.5)  # >> the heartbeat: the holder has noticed
    state = _part(cache_dir, FILES["a.safetensors"]).with_name(_part(cache_dir, FILES["a.safetensors"]).name
                                                                + ".state.json")
    before = state.read_bytes()
    assert hub2.bytes_sent - start < BIG, "still downloading while we watch"
    time.sleep(0.5)
    assert state.read_bytes() == before  # not written without the lock
    hub2.faults.throttle_bps = 0
    t.join(timeout=60)
    assert isinstance(box["r"], errors.LockTimeoutError), box
    assert not (cache_dir / "models--acme--locks" / "blobs" / _sha(FILES["a.safetensors"])).exists()
    assert json.loads(excl.read_text())["id"] == "theirs"  # the new holder's lock is left alone


def _capture(fn):
    try:
        return fn()
    except Exception as exc:  # returned to the test thread
        return exc


def test_lock_files_follow_the_umask_for_team_caches(tmp_path):
    old = os.umask(0o002)
    try:
        lock = Locker().try_acquire(tmp_path / "x.lock")
    finally:
        os.umask(old)
    assert (tmp_path / "x.lock").stat().st_mode & 0o777 == 0o664
    lock.release()


def test_a_lock_file_this_user_cannot_write_still_locks(tmp_path):
    """Another user's lock file (no write access for us): flock works on a read-only descriptor."""
    p = tmp_path / "x.lock"
    p.write_text("")
    p.chmod(0o444)
    code = ("import sys; from qtk.hub._lock import Locker; lk = Locker().try_acquire(sys.argv[1]); "
            "print(lk.mode if lk else None)")
    drop = (["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"] if os.geteuid() == 0 else [])
    if drop and subprocess.run([*drop, "true"]).returncode != 0:
        pytest.skip("cannot drop root's file-permission override here")
    r = subprocess.run([*drop, sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "flock"


# ------------------------------------------------------------------ lock files written by anyone (outside input)

_GARBAGE = ["", "not json", "[]", "null", "42", '"str"', '{"pid": "12"}', '{"pid": -1, "host": "%s"}',
            '{"pid": 0, "host": "%s"}', '{"pid": 99999999999999999999, "host": "%s"}', '{"pid": true, "host": "%s"}',
            '{"host": ["x"], "id": {"a": 1}}', '{"host": "\\u001b[31mred", "pid": 1.5}', "\x00\xff\xfe"]


@pytest.mark.parametrize("content", _GARBAGE)
def test_malformed_lock_files_are_never_a_crash_nor_an_instant_takeover(tmp_path, no_flock, content):
    host = Locker().host
    base = tmp_path / "x.lock"
    excl = Path(str(base) + EXCL_SUFFIX)
    excl.write_bytes(content.replace("%s", host).encode("utf-8", "surrogateescape") if "%s" in content
                     else content.encode("latin-1"))
    said = []
    locker = Locker(stale_after=3600, notify=said.append)
    assert locker.try_acquire(base) is None  # unreadable holder: only a stopped heartbeat frees it
    assert _lock.is_locked(base)
    assert not said
    info = _lock.holder_info(excl)
    assert info is None or isinstance(info, dict)


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=8),
       st.sampled_from(["host", "pid", "start", "id", "created"]))
def test_any_json_in_a_lock_file_is_handled(tmp_path_factory, value, key):
    d = tmp_path_factory.mktemp("anyjson")
    base = d / "x.lock"
    Path(str(base) + EXCL_SUFFIX).write_text(json.dumps({"host": Locker().host, "pid": 1, key: value}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_lock, "_modes", {})
        mp.setattr(_lock.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no locks")))
        locker = Locker(stale_after=3600, notify=lambda text: None)
        lock = locker.try_acquire(base)  # pid 1 is alive: kept, unless the value made the pid unusable
        assert lock is None or lock.mode == EXCLUSIVE_FILE
        assert isinstance(_lock.is_locked(base), bool)
        locker.close()


# ------------------------------------------------- two hosts on one cache (QTK_HOST_ID), prune takes the lock

HOLD = textwrap.dedent("""
    import errno, sys, time
    from qtk.hub import _lock
    _lock.fcntl.flock = lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "No locks available"))
    held = _lock.Locker(heartbeat=3600).try_acquire(sys.argv[1])
    print(held.mode, flush=True)
    time.sleep(600)
""")


def _partial(cache_dir: Path) -> tuple[Path, Path]:
    """A partial download with nothing resumable in it (a prune candidate at any age) and its lock base."""
    oid = _sha(b"partial")
    part = cache_dir / "models--acme--locks" / "blobs" / f"{oid}.qtk-part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"p" * 1000)
    return part, cache_dir / ".locks" / "models--acme--locks" / f"{oid}.qtk.lock"


def test_a_second_host_never_takes_nor_prunes_the_first_hosts_lock(cache_dir, tmp_path, no_flock, monkeypatch):
    """node-a holds a partial's lock (an exclusive lock file: flock does not work there), then its process
    disappears from *this* machine's view (killed here; on a real second host it would never have been
    visible). node-b, sharing the cache, cannot know node-a is gone: it neither takes the lock nor prunes
    the partial (before: the lock file named the host by gethostname(), equal for both, and the pid gone
    here counted as dead). The same machine as node-a (same host id, boot, PID namespace) may."""
    from qtk.hub.scan import prune_cache

    part, base = _partial(cache_dir)
    base.parent.mkdir(parents=True)
    a = subprocess.Popen([sys.executable, "-c", HOLD, str(base)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "QTK_HOST_ID": "node-a"})
    try:
        assert a.stdout.readline().strip() == EXCLUSIVE_FILE
    finally:
        a.kill()
        a.wait()
    excl = Path(str(base) + EXCL_SUFFIX)
    monkeypatch.setenv("QTK_HOST_ID", "node-b")
    said = []
    assert _lock.is_locked(base)
    assert Locker(stale_after=3600, notify=said.append).try_acquire(base) is None and not said
    assert prune_cache(cache_dir) == [] and part.exists() and excl.exists()
    assert json.loads(excl.read_text())["host"] == "node-a"
    monkeypatch.setenv("QTK_HOST_ID", "node-a")  # node-a itself, after the crash: provably dead
    assert not _lock.is_locked(base)
    gone = prune_cache(cache_dir)
    assert part in [g.path for g in gone] and not part.exists()


def test_prune_takes_the_partials_lock_and_skips_it_when_a_pull_holds_it(cache_dir, monkeypatch):
    """A pull may take the partial's lock after prune listed it as idle: prune takes the lock (without
    waiting) before removing the file, so the pull's file stays. Before, the listing's check was all."""
    from qtk.hub import scan

    part, base = _partial(cache_dir)
    pull = Locker()
    held = pull.try_acquire(base)
    assert held is not None and held.mode == FLOCK
    monkeypatch.setattr(scan, "is_locked", lambda path: False)  # listed while no one held it
    try:
        actions = scan.prune_cache(cache_dir)
        assert part.exists() and not [a for a in actions if a.path == part]
    finally:
        held.release()
        pull.close()
    base.unlink()
    actions = scan.prune_cache(cache_dir)
    assert [a.path for a in actions] == [part] and not part.exists()
    assert not base.exists()  # the lock file prune made to hold it is gone with it
