"""One rule for "is the process that owns this file gone" (qtk._proc), and every consumer follows it: the
cache's exclusive lock files (and `qtk cache prune`), provision's leases, quantize's temporaries. A process
on another host, boot or PID namespace is never judged dead by its pid; on this one, a pid that is gone or
was reused (another start time) is. Fast: no model, no torch."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtk import _proc
from qtk._proc import GONE, Owner, is_provably_dead


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


HERE = Owner("node-a", "boot-1", "pid:[1]", 100, "5000")


# ------------------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize("owner, table, dead", [
    (HERE, {100: "5000"}, False),  # the same process, alive
    (HERE, {}, True),  # gone
    (HERE, {100: "7777"}, True),  # pid reused: another process started at another time
    (replace(HERE, start=None), {100: "7777"}, False),  # no start time recorded: a live pid proves nothing
    (HERE, {100: None}, False),  # alive, start time unreadable (another user's process)
    (replace(HERE, host="node-b"), {}, False),  # another host: its pid means nothing here
    (replace(HERE, host="node-b"), {100: "7777"}, False),  # ... reused or not
    (replace(HERE, boot="boot-0"), {}, False),  # this host before a reboot, or a host with the same name
    (replace(HERE, pidns="pid:[2]"), {}, False),  # a pod in its own PID namespace
    (replace(HERE, boot=None), {}, False),  # an older qtk's record: no boot id
    (replace(HERE, pidns=None), {}, False),
    (replace(HERE, host=None), {}, False),
    (replace(HERE, pid=None), {}, False),
], ids=["alive", "gone", "reused", "reused-no-start", "alive-start-unknown", "other-host-gone", "other-host-reused",
        "other-boot", "other-pidns", "no-boot", "no-pidns", "no-host", "no-pid"])
def test_the_rule(owner, table, dead):
    probe = lambda pid: table[pid] if pid in table else GONE  # noqa: E731
    assert is_provably_dead(owner, here=HERE, probe=probe) is dead


_HOSTS = st.sampled_from([None, "node-a", "node-b"])
_BOOTS = st.sampled_from([None, "boot-1", "boot-0"])
_NS = st.sampled_from([None, "pid:[1]", "pid:[2]"])
_PIDS = st.sampled_from([None, 100, 101, 4194304])
_STARTS = st.sampled_from([None, "5000", "7777", "0"])


@settings(max_examples=400, deadline=None)
@given(_HOSTS, _BOOTS, _NS, _PIDS, _STARTS, st.dictionaries(st.sampled_from([100, 101, 4194304]), _STARTS, max_size=3))
def test_never_dead_unless_same_machine_and_pid_gone_or_reused(host, boot, ns, pid, start, table):
    """Property: dead <=> host, boot and PID namespace known and equal to this process's, and the pid is
    gone from the process table, or it is there with a known start time other than the recorded one."""
    owner = Owner(host, boot, ns, pid, start)
    probe = lambda p: table[p] if p in table else GONE  # noqa: E731
    same = None not in (host, boot, ns) and (host, boot, ns) == (HERE.host, HERE.boot, HERE.pidns)
    now = table.get(pid, GONE) if pid is not None else None
    gone_or_reused = pid is not None and (now is GONE or (start is not None and now is not None and now != start))
    assert is_provably_dead(owner, here=HERE, probe=probe) == (same and gone_or_reused)


def test_against_the_real_process_table(monkeypatch):
    monkeypatch.setenv("QTK_HOST_ID", "node-a")
    me = Owner.current()
    assert me.host == "node-a" and me.pid == os.getpid() and me.start and me.boot and me.pidns
    dead = _dead_pid()
    assert not is_provably_dead(me)
    assert is_provably_dead(replace(me, pid=dead, start=None))
    assert is_provably_dead(replace(me, start=str(int(me.start) + 1)))  # this pid, another start: reused
    assert not is_provably_dead(replace(me, pid=dead, host="node-b"))
    monkeypatch.setenv("QTK_HOST_ID", "node-b")  # the same files, seen from "another host"
    assert not is_provably_dead(replace(me, pid=dead))


@pytest.mark.parametrize("raw", [None, [], "x", 1, {}, {"pid": "12"}, {"pid": True}, {"pid": 0}, {"pid": -3},
                                 {"pid": 2 ** 70}, {"pid": 1.5}, {"host": ["x"]}, {"host": ""}, {"host": "h" * 300},
                                 {"boot": {"a": 1}}, {"start": -1}, {"start": [1]}, {"pidns": 7}])
def test_records_from_anyone_become_owners_with_unknown_fields(raw):
    o = Owner.from_dict(raw)
    assert all(v is None for v in (o.host, o.boot, o.pidns, o.pid, o.start))
    assert not is_provably_dead(o)
    assert o.describe().startswith("pid ")


def test_a_record_round_trips_and_an_integer_start_is_read():
    me = Owner.current()
    assert Owner.from_dict(json.loads(json.dumps(me.to_dict()))) == me
    assert Owner.from_dict({**me.to_dict(), "start": int(me.start)}).start == me.start


@pytest.mark.parametrize("env, expected", [("node-7", "node-7"), ("a b/c\td..", "a_b_c_d.."), ("x" * 100, "x" * 64)])
def test_host_id_from_the_environment_is_safe_in_file_names(monkeypatch, env, expected):
    monkeypatch.setenv("QTK_HOST_ID", env)
    assert _proc.host_id() == expected


def test_probe_tells_gone_from_alive():
    assert _proc.probe_pid(_dead_pid()) is GONE
    assert _proc.probe_pid(os.getpid()) == _proc.start_time(os.getpid())


# ------------------------------------------------------------------ every consumer follows the rule

_VARIANTS = {  # name -> (owner fields relative to this process, freed?)
    "same machine, pid gone": (lambda me, dead: replace(me, pid=dead, start=None), True),
    "same machine, pid reused": (lambda me, dead: replace(me, start=str(int(me.start) + 1)), True),
    "same machine, alive": (lambda me, dead: me, False),
    "other host, pid gone": (lambda me, dead: replace(me, pid=dead, host="node-b"), False),
    "other boot, pid gone": (lambda me, dead: replace(me, pid=dead, boot="0" * 36), False),
    "other pid namespace, pid gone": (lambda me, dead: replace(me, pid=dead, pidns="pid:[1]"), False),
    "older record without boot and namespace, pid gone": (
        lambda me, dead: replace(me, pid=dead, boot=None, pidns=None), False),
}


def _lock_consumer(tmp_path: Path, owner: Owner, monkeypatch) -> bool:
    from qtk.hub import _lock

    monkeypatch.setattr(_lock, "_modes", {})
    monkeypatch.setattr(_lock.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no")))
    base = tmp_path / "x.lock"
    Path(str(base) + _lock.EXCL_SUFFIX).write_text(json.dumps({**owner.to_dict(), "id": "theirs"}))
    locked = _lock.is_locked(base)
    locker = _lock.Locker(stale_after=3600, notify=lambda s: None)
    taken = locker.try_acquire(base) is not None
    locker.close()
    assert taken is not locked
    return taken


def _lease_consumer(tmp_path: Path, owner: Owner, monkeypatch) -> bool:
    from qtk.provision.lease import LeaseInfo, fs_now, lease_expired

    p = tmp_path / "node-x-0123456789ab.json"
    p.write_text(json.dumps(owner.to_dict()))
    return lease_expired(LeaseInfo.read(p), p, fs_now(tmp_path), ttl=3600)


def _quantize_consumer(tmp_path: Path, owner: Owner, monkeypatch) -> bool:
    from qtk.quantize._output import OutputRun, recover

    run = OutputRun(tmp_path / "out", "0123456789abcdef")
    run.record.write_text(json.dumps(owner.to_dict()))
    run.tmp.mkdir()
    (run.tmp / "model.safetensors").write_bytes(b"half")
    recover(run.out)
    assert run.record.exists() is run.tmp.exists()  # the record goes with (after) the temporary
    return not run.tmp.exists()


@pytest.mark.parametrize("consumer", [_lock_consumer, _lease_consumer, _quantize_consumer],
                         ids=["cache lock", "provision lease", "quantize temporary"])
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_every_consumer_frees_exactly_what_the_rule_proves_dead(tmp_path, monkeypatch, consumer, variant):
    monkeypatch.delenv("QTK_HOST_ID", raising=False)
    make, freed = _VARIANTS[variant]
    owner = make(Owner.current(), _dead_pid())
    assert is_provably_dead(owner) is freed
    assert consumer(tmp_path, owner, monkeypatch) is freed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["host", "boot", "pidns", "pid", "start", "id"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=40) | st.lists(st.integers()),
                       max_size=6))
def test_any_owner_record_is_handled_by_quantize_cleanup(tmp_path_factory, raw):
    """Whatever a record holds, recovery neither crashes nor removes what it cannot prove dead."""
    from qtk.quantize._output import OutputRun, recover

    d = tmp_path_factory.mktemp("rec")
    run = OutputRun(d / "out", "fedcba9876543210")
    run.record.write_text(json.dumps(raw))
    run.tmp.mkdir()
    recover(run.out)
    assert run.tmp.exists() is not is_provably_dead(Owner.from_dict(raw))


def test_lease_file_and_lock_file_name_the_same_identity(tmp_path, monkeypatch):
    """A lease and an exclusive lock file written by one process carry the same owner fields."""
    from qtk.hub import _lock
    from qtk.provision.lease import Lease, LeaseInfo

    monkeypatch.setenv("QTK_HOST_ID", "node-q")
    monkeypatch.setattr(_lock, "_modes", {})
    monkeypatch.setattr(_lock.fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no")))
    with Lease(tmp_path / "leases", heartbeat=3600) as lease:
        info = LeaseInfo.read(lease.path)
        locker = _lock.Locker(heartbeat=3600)
        held = locker.try_acquire(tmp_path / "x.lock")
        from_lock = Owner.from_dict(_lock.holder_info(held.path))
        locker.close()
    assert info.owner == from_lock == Owner.current()
    assert from_lock.host == "node-q"
