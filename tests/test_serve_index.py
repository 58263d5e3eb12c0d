"""`qtk serve`'s sha256 index as an attacker with write access to it would use it: a planted row (the
right file key, a wrong hash) is trusted by design, so only the serving user may write the index. It is
created private (dir 0700, database 0600 whatever the umask), and one that others could write, or that
another user owns, is rebuilt or refused rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat

import pytest

from hubtest import write_plain_repo
from servetest import raw_request

from qtk import errors
from qtk.mirror import hashindex
from qtk.mirror.app import MirrorServer
from qtk.mirror.hashindex import file_key
from qtk.mirror.service import INDEX_FILE, open_store

CONTENT = os.urandom(3000)
TRUE_SHA = hashlib.sha256(CONTENT).hexdigest()
FORGED = "f" * 64


def _mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def store_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "store"
    write_plain_repo(root, "acme/m", {"w.safetensors": CONTENT, "config.json": b"{}"})
    return root


def served_sha(store) -> tuple[str, str]:
    """(X-Linked-Etag of the resolve, lfs oid of the tree listing) for w.safetensors, from a real server."""
    store.index_all()
    srv = MirrorServer(("127.0.0.1", 0), store)
    srv.serve_in_thread()
    try:
        port = srv.server_address[1]
        status, hdrs, body = raw_request(port, "/acme/m/resolve/main/w.safetensors")
        assert status == 200 and body == CONTENT
        _, _, tree = raw_request(port, "/api/models/acme/m/tree/main")
        oid = next(e["lfs"]["oid"] for e in json.loads(tree) if e["path"] == "w.safetensors")
        return hdrs["X-Linked-Etag"].strip('"'), oid
    finally:
        srv.shutdown()
        srv.server_close()
        store.index.close()


def plant(db, path) -> None:
    """What an attacker who can write the index does: a row with the file's current key, a forged hash."""
    con = sqlite3.connect(str(db), isolation_level=None)
    con.execute("INSERT OR REPLACE INTO hashes VALUES (?,?,?,?,?,?,?)", (*file_key(os.stat(path)), FORGED, None))
    con.close()


def test_the_index_is_private_whatever_the_umask(store_dir):
    old = os.umask(0)
    try:
        store = open_store(store_dir)
        store.index_all()
    finally:
        os.umask(old)
    d = store_dir / ".qtk-serve"
    assert _mode(d) == 0o700
    files = [d / INDEX_FILE, d / (INDEX_FILE + "-wal"), d / (INDEX_FILE + "-shm")]
    assert files[0].exists() and all(_mode(f) == 0o600 for f in files if f.exists()), [oct(_mode(f)) for f in files if f.exists()]
    store.index.close()


def test_an_index_from_before_is_narrowed_and_kept(store_dir):
    """An index made by an older qtk (dir 0755, file 0644: only its owner could write) keeps its rows."""
    store = open_store(store_dir)
    store.index_all()
    store.index.close()
    d = store_dir / ".qtk-serve"
    os.chmod(d, 0o755)
    os.chmod(d / INDEX_FILE, 0o644)
    store = open_store(store_dir)
    assert store.index_all().hashed_files == 0
    assert _mode(d) == 0o700 and _mode(d / INDEX_FILE) == 0o600
    store.index.close()


def _group_writable_db(d):
    os.chmod(d / INDEX_FILE, 0o664)


def _world_writable_dir(d):
    os.chmod(d, 0o777)


def _group_writable_wal(d):
    wal = d / (INDEX_FILE + "-wal")
    wal.touch()
    os.chmod(wal, 0o620)


def _db_of_another_user(d):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    os.chown(d / INDEX_FILE, 65534, 65534)


def _db_is_a_symlink(d):
    real = d.parent / "elsewhere.sqlite"
    os.replace(d / INDEX_FILE, real)
    os.symlink(real, d / INDEX_FILE)


@pytest.mark.parametrize("expose", [_group_writable_db, _world_writable_dir, _group_writable_wal, _db_of_another_user,
                                    _db_is_a_symlink])
def test_a_planted_row_in_an_index_others_could_write_is_not_trusted(store_dir, expose):
    store = open_store(store_dir)
    store.index_all()
    store.index.close()
    d = store_dir / ".qtk-serve"
    plant(d / INDEX_FILE, store_dir / "acme" / "m" / "w.safetensors")
    expose(d)
    assert served_sha(open_store(store_dir)) == (TRUE_SHA, TRUE_SHA)  # rebuilt: hashed again, not read
    assert _mode(d / INDEX_FILE) == 0o600 and os.lstat(d / INDEX_FILE).st_uid == os.geteuid()


def test_a_state_dir_of_another_user_is_not_used(store_dir, tmp_path, monkeypatch):
    store = open_store(store_dir)
    store.index_all()
    store.index.close()
    state = store_dir / ".qtk-serve"
    plant(state / INDEX_FILE, store_dir / "acme" / "m" / "w.safetensors")
    if os.geteuid() == 0:
        os.chown(state, 65534, 65534)
        store = open_store(store_dir)
        assert store.index.path.is_relative_to(tmp_path / "xdg")  # the user's cache instead
    else:  # pretend: every directory then belongs to someone else (the cache too: an in-memory index)
        monkeypatch.setattr(hashindex, "_euid", lambda: os.geteuid() + 1)
        store = open_store(store_dir)
        assert store.index.path is None or not store.index.path.is_relative_to(state)
        monkeypatch.undo()
    assert served_sha(store) == (TRUE_SHA, TRUE_SHA)


def test_an_explicit_index_dir_of_another_user_is_refused(store_dir, tmp_path, monkeypatch):
    mine = tmp_path / "idx"
    mine.mkdir()
    monkeypatch.setattr(hashindex, "_euid", lambda: os.geteuid() + 1)
    with pytest.raises(errors.NotWritableError) as info:
        open_store(store_dir, index_dir=mine)
    assert "owned by uid" in str(info.value) and "you own" in info.value.hint


def test_a_row_for_an_earlier_version_of_a_file_is_never_used(store_dir):
    """Rewritten in place with the same size and mtime: the ctime moved, so the key did; hashed again."""
    store = open_store(store_dir)
    store.index_all()
    store.index.close()
    p = store_dir / "acme" / "m" / "w.safetensors"
    before = os.stat(p)
    new = os.urandom(len(CONTENT))
    with open(p, "r+b") as fh:
        fh.write(new)
    os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(p)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    store = open_store(store_dir)
    store.index_all()
    srv = MirrorServer(("127.0.0.1", 0), store)
    srv.serve_in_thread()
    try:
        status, hdrs, body = raw_request(srv.server_address[1], "/acme/m/resolve/main/w.safetensors")
        assert body == new and hdrs["X-Linked-Etag"] == f'"{hashlib.sha256(new).hexdigest()}"'
    finally:
        srv.shutdown()
        srv.server_close()
        store.index.close()
