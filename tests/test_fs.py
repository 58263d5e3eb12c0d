"""qtk._fs: the one atomic (and durable) write, completion records, directory swaps. Fast, no model."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtk import _fs


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The paths fsynced, in order (the file descriptor's target at the time of the call)."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.parametrize("data", [b"", b"\x00\xff" * 5000, "text é\n", json.dumps({"a": 1})])
def test_write_atomic_writes_bytes_or_text_and_leaves_no_temporary(tmp_path, data):
    p = tmp_path / "sub" / "f"
    _fs.write_atomic(p, data)
    assert p.read_bytes() == (data.encode() if isinstance(data, str) else data)
    assert os.listdir(p.parent) == ["f"]


@pytest.mark.parametrize("durable", [True, False])
def test_durable_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, synced, monkeypatch, durable):
    order: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(f"rename {Path(b).name}"), real(a, b))[1])
    p = tmp_path / "f.json"
    _fs.write_atomic(p, "{}", durable=durable)
    if durable:
        assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".f.json.")) and synced[1] == str(tmp_path)
    else:
        assert synced == []
    assert order == ["rename f.json"]


def test_mode_is_set_before_the_first_byte_and_the_umask_otherwise(tmp_path, monkeypatch):
    modes = []
    real_write = os.write

    def write(fd, data):
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    old = os.umask(0o002)
    try:
        _fs.write_atomic(tmp_path / "token", "secret", mode=0o600)
        _fs.write_atomic(tmp_path / "shared", "x")
    finally:
        os.umask(old)
    assert modes == [0o600, 0o664]
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o664


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_a_failed_write_keeps_the_old_content_and_removes_its_temporary(tmp_path, monkeypatch, fail_at):
    p = tmp_path / "f"
    p.write_text("old")

    def boom(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fail_at, boom)
    with pytest.raises(OSError):
        _fs.write_atomic(p, "new" * 1000)
    monkeypatch.undo()
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["f"]


def test_a_named_temporary_is_used_and_write_json_formats(tmp_path, monkeypatch):
    names = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (names.append(Path(a).name), real(a, b))[1])
    _fs.write_json(tmp_path / "r.json", {"b": [1, 2]}, tmp=tmp_path / ".r.json.tmp-lease")
    assert names == [".r.json.tmp-lease"]
    assert (tmp_path / "r.json").read_text() == json.dumps({"b": [1, 2]}, indent=2) + "\n"
    _fs.write_json(tmp_path / "c.json", {"a": 1}, indent=None, newline=False)
    assert (tmp_path / "c.json").read_text() == '{"a": 1}'


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_the_file_is_always_one_of_the_two_contents(tmp_path_factory, first, second):
    d = tmp_path_factory.mktemp("prop")
    _fs.write_atomic(d / "f", first)
    _fs.write_atomic(d / "f", second)
    assert (d / "f").read_bytes() == second and os.listdir(d) == ["f"]


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "x.bin").write_bytes(b"x")
    (root / "a" / "y.bin").write_bytes(b"y")
    (root / "a" / "b" / "z.bin").write_bytes(b"z")


def test_seal_fsyncs_every_file_and_directory_then_writes_the_record_last(tmp_path, synced):
    root = tmp_path / "build"
    _tree(root)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"o")
    (root / "link").symlink_to(outside)  # an entry of its directory; its target is not ours to sync
    _fs.seal(root, "done.json", "{}")
    record = next(i for i, p in enumerate(synced) if Path(p).name.startswith(".done.json."))
    before = set(synced[:record])
    for p in ("x.bin", "a/y.bin", "a/b/z.bin", "a/b", "a", ""):
        assert str(root / p).rstrip("/") in before, p
    assert str(outside) not in synced
    assert synced[record + 1:] == [str(root)]  # the record's directory entry, last
    assert (root / "done.json").read_text() == "{}"
    assert synced.index(str(root / "a" / "b")) < synced.index(str(root / "a")) < synced.index(str(root))


def test_exchange_and_noreplace(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    if _fs.exchange(a, b):
        assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"
    with pytest.raises(FileExistsError):
        _fs.rename_noreplace(a, b)
    _fs.rename_noreplace(a, tmp_path / "c")
    assert (tmp_path / "c" / "f").exists() and not a.exists()


@pytest.mark.parametrize("swap", [True, False], ids=["renameat2", "without renameat2"])
@pytest.mark.parametrize("overwrite, exists, result", [
    (False, False, "new"), (True, False, "new"), (True, True, "swapped"), (False, True, "refused")])
def test_install_dir(tmp_path, monkeypatch, swap, overwrite, exists, result):
    if not swap:
        monkeypatch.setattr(_fs, "_rename2", lambda src, dst, flags: False)
    elif not _fs.exchange(tmp_path, tmp_path):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    new, dest, aside = tmp_path / ".new", tmp_path / "dest", tmp_path / ".aside"
    new.mkdir()
    (new / "v").write_text("2")
    if exists:
        dest.mkdir()
        (dest / "v").write_text("1")
    if result == "refused":
        with pytest.raises(FileExistsError):
            _fs.install_dir(new, dest, aside=aside, overwrite=overwrite)
        assert (dest / "v").read_text() == "1" and new.is_dir()
        return
    how = _fs.install_dir(new, dest, aside=aside, overwrite=overwrite)
    assert how == ("new" if result == "new" else "exchanged" if swap else "renamed aside")
    assert (dest / "v").read_text() == "2" and sorted(os.listdir(tmp_path)) == ["dest"]


def test_without_renameat2_a_failed_second_rename_puts_the_old_back(tmp_path, monkeypatch):
    monkeypatch.setattr(_fs, "_rename2", lambda src, dst, flags: False)
    new, dest, aside = tmp_path / ".new", tmp_path / "dest", tmp_path / ".aside"
    new.mkdir()
    dest.mkdir()
    (dest / "v").write_text("1")
    real = os.rename

    def rename(a, b):
        if Path(a) == new:
            raise OSError(errno.EIO, "I/O error")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        _fs.install_dir(new, dest, aside=aside, overwrite=True)
    assert (dest / "v").read_text() == "1" and not aside.exists()


def test_fs_now_is_the_file_systems_clock(tmp_path):
    t = _fs.fs_now(tmp_path)
    (tmp_path / "f").write_text("x")
    assert abs((tmp_path / "f").stat().st_mtime - t) < 5 and os.listdir(tmp_path) == ["f"]
