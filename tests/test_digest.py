"""qtk._digest: the one file hasher (cache verify, the mirror's index, quantize's digests), against hashlib
and git's own blob ids; and qtk._fs.write_atomic reached through a directory fd (the pull's --local-dir
records)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qtk import _digest, _fs

# git hash-object of these contents (fixed: computed by git once)
GIT_IDS = {b"": "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391", b"hello\n": "ce013625030ba8dba906f756967f9e9ca394464a"}


@pytest.mark.parametrize("data", list(GIT_IDS))
def test_git_blob_sha1_is_gits(tmp_path, data):
    p = tmp_path / "f"
    p.write_bytes(data)
    assert _digest.file_digest(p, _digest.GIT_SHA1) == GIT_IDS[data]
    if shutil.which("git"):
        assert subprocess.run(["git", "hash-object", str(p)], capture_output=True, text=True).stdout.strip() == \
            GIT_IDS[data]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), chunk=st.sampled_from([1, 7, 4096]))
def test_both_digests_in_one_read_match_hashlib_whatever_the_piece_size(tmp_path, monkeypatch, data, chunk):
    monkeypatch.setattr(_digest, "CHUNK", chunk)
    p = tmp_path / "f"
    p.write_bytes(data)
    seen = []
    d = _digest.file_digests(p, (_digest.SHA256, _digest.GIT_SHA1), progress=seen.append)
    assert d == {"sha256": hashlib.sha256(data).hexdigest(),
                 "git-sha1": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
    assert sum(seen) == len(data) and all(0 < n <= chunk for n in seen)


def test_an_open_fd_is_read_from_byte_zero_and_its_offset_left_alone(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"0123456789" * 1000)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.lseek(fd, 1234, os.SEEK_SET)
        assert _digest.file_sha256(p) == _digest.file_digest(fd) == hashlib.sha256(p.read_bytes()).hexdigest()
        assert os.lseek(fd, 0, os.SEEK_CUR) == 1234
    finally:
        os.close(fd)


@pytest.mark.parametrize("told", [9999, 10001])
def test_a_file_of_another_length_than_the_caller_knows_is_refused(tmp_path, told):
    """The mirror's index passes the size it keyed the file by: a file that shrank or grew since is
    not hashed under that key."""
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10000)
    with pytest.raises(OSError, match="changed while being hashed"):
        _digest.file_digests(p, size=told)


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError):
        _digest.new_digest("md5", 0)


def test_the_mirror_index_and_the_cache_verify_use_it(tmp_path):
    from qtk.hub.cache import digest_file
    from qtk.mirror.hashindex import hash_file

    p = tmp_path / "f"
    p.write_bytes(b"hello\n")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert hash_file(fd, 6, sha1=True) == (hashlib.sha256(b"hello\n").hexdigest(), GIT_IDS[b"hello\n"])
        assert hash_file(fd, 6, sha1=False)[1] is None
        with pytest.raises(OSError):
            hash_file(fd, 5, sha1=True)
    finally:
        os.close(fd)
    assert digest_file(p, ("git-sha1", GIT_IDS[b"hello\n"])) == GIT_IDS[b"hello\n"]


# ------------------------------------------------------------------ write_atomic through a directory fd


def test_write_atomic_at_a_dir_fd_writes_there_and_fsyncs_it(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _fs.write_atomic("r.json", '{"a": 1}', dir_fd=fd)
    finally:
        os.close(fd)
    assert (d / "r.json").read_text() == '{"a": 1}' and os.listdir(d) == ["r.json"]
    assert synced[0].startswith(str(d / ".r.json.")) and synced[-1] == str(d)


def test_write_atomic_at_a_dir_fd_never_writes_through_a_planted_temporary(tmp_path, monkeypatch):
    """The temporary is created new there: a link someone planted at its name is refused, not followed."""
    d, outside = tmp_path / "d", tmp_path / "outside"
    d.mkdir()
    outside.write_text("keep")
    monkeypatch.setattr(_fs, "_tmp_path", lambda p: p.with_name(".planted"))
    os.symlink(outside, d / ".planted")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError):
            _fs.write_atomic("r.json", "x", dir_fd=fd)
    finally:
        os.close(fd)
    assert outside.read_text() == "keep" and not (d / "r.json").exists()


def test_tree_digest_names_the_files_not_the_bytecode(tmp_path):
    """One directory digest (the vendored converter's pin, task folders in provision's keys): a file's bytes
    or name change it; Python's bytecode beside imported sources, an excluded path and the order files were
    written in do not; a tree over ``max_bytes`` is refused before it is read."""
    d = tmp_path / "t"
    (d / "sub").mkdir(parents=True)
    (d / "a.py").write_text("x = 1\n")
    (d / "sub" / "b.jsonl").write_text('{"a": 1}\n')
    base = _digest.tree_digest(d)
    (d / "__pycache__").mkdir()
    (d / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0bytecode")
    (d / "sub" / "c.pyc").write_bytes(b"\0bytecode")
    (d / "RECORD.json").write_text("{}")
    assert _digest.tree_digest(d, exclude={"RECORD.json"}) == base
    assert _digest.tree_digest(d) != base
    (d / "RECORD.json").unlink()
    (d / "sub" / "b.jsonl").write_text('{"a": 2}\n')
    assert _digest.tree_digest(d) != base
    (d / "sub" / "b.jsonl").write_text('{"a": 1}\n')
    assert _digest.tree_digest(d) == base
    (d / "sub" / "b.jsonl").rename(d / "sub" / "B.jsonl")
    assert _digest.tree_digest(d) != base
    with pytest.raises(_digest.TreeTooLarge):
        _digest.tree_digest(d, max_bytes=5)
