"""`qtk serve`'s store: hashes once per content (persistent, across restarts), never an old hash for new
bytes, no rescans per request, every kept provision version under its own commit."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest

from hubtest import write_plain_repo
from servetest import raw_request

from qtk.mirror import hashindex
from qtk.mirror.app import MirrorServer
from qtk.mirror.hashindex import HashIndex
from qtk.mirror.service import open_store
from qtk.mirror.store import MirrorStore


def serve(store: MirrorStore, **kw) -> MirrorServer:
    srv = MirrorServer(("127.0.0.1", 0), store, **kw)
    srv.serve_in_thread()
    return srv


def stop(srv: MirrorServer) -> None:
    srv.shutdown()
    srv.server_close()


def count_hashing(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = hashindex.hash_file

    def counting(fd, size, **kw):
        calls.append(size)
        return real(fd, size, **kw)

    monkeypatch.setattr(hashindex, "hash_file", counting)
    return calls


def test_index_survives_restart_and_requests_never_hash(tmp_path, monkeypatch):
    root = tmp_path / "store"
    files = {f"f{i}.bin": os.urandom(1000 + i) for i in range(5)} | {"config.json": b"{}"}
    write_plain_repo(root, "acme/m", files)
    calls = count_hashing(monkeypatch)
    store = open_store(root)
    assert store.index.path == root / ".qtk-serve" / "hash-index.sqlite"
    stats = store.index_all()
    assert (stats.files, stats.hashed_files) == (6, 6) and len(calls) == 6
    store.index.close()

    calls.clear()
    store2 = open_store(root)  # a restart: same index file
    assert store2.index_all().hashed_files == 0 and calls == []
    srv = serve(store2)
    try:
        for name, data in files.items():
            status, hdrs, body = raw_request(srv.server_address[1], f"/acme/m/resolve/main/{name}")
            assert status == 200 and body == data
        assert calls == []  # nothing hashed while answering
        status, _, body = raw_request(srv.server_address[1], "/api/models/acme/m/tree/main")
        assert status == 200 and {e["path"] for e in json.loads(body)} == set(files)
    finally:
        stop(srv)
        store2.index.close()


def test_unwritable_dir_indexes_in_the_user_cache_or_index_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    assert hashindex.default_index_dir(not_a_dir).parent == tmp_path / "xdg" / "qtk" / "serve"
    root = tmp_path / "ro"
    write_plain_repo(root, "acme/m", {"a.txt": b"a"})
    idx = tmp_path / "elsewhere"
    store = open_store(root, index_dir=idx)
    store.index_all()
    assert (idx / "hash-index.sqlite").is_file() and not (root / ".qtk-serve").exists()
    store.index.close()


@pytest.mark.parametrize("how", ["in_place", "rename"])
def test_republished_file_with_same_size_and_mtime_gets_its_new_hash(tmp_path, how):
    root = tmp_path / "store"
    d = write_plain_repo(root, "acme/m", {"w.bin": b"A" * 5000, "config.json": b"{}"})
    f = d / "w.bin"
    os.utime(f, ns=(1_700_000_000_000_000_000,) * 2)
    store = MirrorStore(root, index=HashIndex(tmp_path / "idx.sqlite"))
    srv = serve(store)
    port = srv.server_address[1]
    try:
        _, h1, b1 = raw_request(port, "/acme/m/resolve/main/w.bin", method="GET")
        assert b1 == b"A" * 5000
        if how == "in_place":
            with open(f, "r+b") as fh:
                fh.write(b"B" * 5000)
        else:
            tmp = d / ".w.tmp"
            tmp.write_bytes(b"B" * 5000)
            os.replace(tmp, f)
        os.utime(f, ns=(1_700_000_000_000_000_000,) * 2)  # same size, same mtime: only ctime/inode tell
        _, h2, _ = raw_request(port, "/acme/m/resolve/main/w.bin", method="HEAD")
        _, h3, b3 = raw_request(port, "/acme/m/resolve/main/w.bin")
        want = hashlib.sha256(b"B" * 5000).hexdigest()
        assert h2["ETag"] == h3["ETag"] == f'"{want}"' != h1["ETag"]
        assert b3 == b"B" * 5000 and h3["X-Repo-Commit"] != h1["X-Repo-Commit"]
        time.sleep(store.listing_ttl + 0.1)  # the listing revalidates by stat after its TTL
        _, _, tree = raw_request(port, "/api/models/acme/m/tree/main")
        (entry,) = [e for e in json.loads(tree) if e["path"] == "w.bin"]
        assert entry["lfs"]["oid"] == want
    finally:
        stop(srv)


def test_simultaneous_first_requests_hash_each_file_once(tmp_path, monkeypatch):
    root = tmp_path / "store"
    files = {f"shard-{i}.safetensors": os.urandom(200_000) for i in range(4)}
    write_plain_repo(root, "acme/m", files)
    calls = count_hashing(monkeypatch)
    srv = serve(MirrorStore(root))  # not indexed ahead: the first requests race to list
    port = srv.server_address[1]
    results = []

    def get(name):
        results.append(raw_request(port, f"/acme/m/resolve/main/{name}")[2] == files[name])

    threads = [threading.Thread(target=get, args=(n,)) for n in list(files) * 2]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [True] * 8
        assert sorted(calls) == sorted(len(v) for v in files.values())  # each content hashed once
    finally:
        stop(srv)


def test_requests_do_not_rescan_the_repo(tmp_path, monkeypatch):
    root = tmp_path / "store"
    write_plain_repo(root, "acme/m", {f"d{i % 7}/f{i}.txt": b"%d" % i for i in range(300)})
    store = MirrorStore(root, listing_ttl=3600)
    store.index_all()
    walks = []
    real_walk = store.walk
    monkeypatch.setattr(store, "walk", lambda *a: walks.append(1) or real_walk(*a))
    srv = serve(store)
    try:
        for i in range(0, 300, 13):
            assert raw_request(srv.server_address[1], f"/acme/m/resolve/main/d{i % 7}/f{i}.txt")[2] == b"%d" % i
        assert walks == []
    finally:
        stop(srv)


def test_dangling_link_and_fifo_do_not_break_or_block_the_repo(tmp_path):
    root = tmp_path / "store"
    d = write_plain_repo(root, "acme/m", {"config.json": b"{}", "z.txt": b"z"})
    os.symlink("missing", d / "a-dangling")
    os.mkfifo(d / "b-fifo")
    store = MirrorStore(root)
    srv = serve(store, workers=2)
    try:
        for _ in range(4):  # more requests than workers: a blocked worker would hang this
            assert raw_request(srv.server_address[1], "/acme/m/resolve/main/z.txt", timeout=10)[0] == 200
            assert raw_request(srv.server_address[1], "/acme/m/resolve/main/b-fifo", timeout=10)[0] == 404
        assert sorted(store.revision("model", "acme/m", "main").files) == ["config.json", "z.txt"]
    finally:
        stop(srv)


def _publish(ps, repo_id: str, key: str, content: bytes, previous: str | None) -> None:
    build = ps.builds / key
    build.mkdir(parents=True)
    (build / "model.safetensors").write_bytes(content)
    (build / "config.json").write_text(json.dumps({"key": key}))
    ps.publish(repo_id, key, build, {"qtk_provision.json": json.dumps({"key": key})})
    ps.write_json(ps.record_path(repo_id), {"repo_id": repo_id, "published": {"key": key}, "previous": previous})


def test_provision_store_serves_each_kept_version_under_its_commit(tmp_path):
    from qtk.provision.store import ProvisionStore

    ps = ProvisionStore(tmp_path / "store")
    ps.init()
    _publish(ps, "qtk/m-gptq", "k1", b"one" * 1000, None)
    store = MirrorStore(ps.root, versions=ps)  # what qtk serve passes in
    srv = serve(store)
    port = srv.server_address[1]
    try:
        _, _, info1 = raw_request(port, "/api/models/qtk/m-gptq")
        c1 = json.loads(info1)["sha"]
        _publish(ps, "qtk/m-gptq", "k2", b"two" * 1000, "k1")
        _, _, info2 = raw_request(port, "/api/models/qtk/m-gptq/revision/main")
        c2 = json.loads(info2)["sha"]
        assert c1 != c2
        # a node that resolved the previous commit finishes its download
        status, hdrs, body = raw_request(port, f"/qtk/m-gptq/resolve/{c1}/model.safetensors")
        assert (status, body, hdrs["X-Repo-Commit"]) == (200, b"one" * 1000, c1)
        status, hdrs, body = raw_request(port, "/qtk/m-gptq/resolve/main/model.safetensors")
        assert (status, body, hdrs["X-Repo-Commit"]) == (200, b"two" * 1000, c2)
        _, _, tree = raw_request(port, f"/api/models/qtk/m-gptq/tree/{c1}")
        assert {e["path"] for e in json.loads(tree)} == {"model.safetensors", "config.json", "qtk_provision.json"}
        # pruned (not kept by the record any more): gone
        _publish(ps, "qtk/m-gptq", "k3", b"three" * 1000, "k2")
        ps.prune_artifacts({"k2", "k3"})
        assert raw_request(port, f"/qtk/m-gptq/resolve/{c1}/model.safetensors")[0] == 404
        assert raw_request(port, f"/qtk/m-gptq/resolve/{c2}/model.safetensors")[2] == b"two" * 1000
        # bookkeeping is never a repo
        assert store.list_repos() == [("model", "qtk/m-gptq")]
        assert raw_request(port, "/api/models/qtk/m-gptq/tree/main/.qtk-provision")[0] == 404
    finally:
        stop(srv)


def test_hf_cache_links_out_of_their_repo_are_not_served(tmp_path):
    from hubtest import write_cache_repo

    root = tmp_path / "cache"
    shas = write_cache_repo(root, "acme/pub", {"v1": {"config.json": b"{}"}}, refs={"main": "v1"})
    write_cache_repo(root, "acme/priv", {"v1": {"secret.txt": b"SECRET"}}, refs={"main": "v1"})
    snap = root / "models--acme--pub" / "snapshots" / shas["v1"]
    (priv_blob,) = (root / "models--acme--priv" / "blobs").iterdir()
    os.symlink(os.path.relpath(priv_blob, snap), snap / "stolen.txt")  # into another repo's blobs
    (root / "models--acme--pub" / "refs" / "evil").write_text("../../models--acme--priv")
    store = MirrorStore(root)
    snapshot = store.revision("model", "ACME/PUB", "main")
    assert snapshot.repo_id == "acme/pub" and sorted(snapshot.files) == ["config.json"]
    assert store.revision("model", "acme/pub", "evil") is None
    assert not (root / ".qtk-serve").exists()
    assert hashindex.default_index_dir(root) != root / ".qtk-serve"  # an HF cache stays clean


def test_index_forgets_versions_no_longer_in_the_store(tmp_path):
    root = tmp_path / "store"
    d = write_plain_repo(root, "acme/m", {"a.txt": b"a", "b.txt": b"b"})
    store = open_store(root)
    assert store.index_all().hashed_files == 2
    (d / "b.txt").unlink()
    (d / "a.txt").write_bytes(b"A")  # a new version of a.txt
    stats = store.index_all()
    assert (stats.hashed_files, stats.dropped, len(store.index)) == (1, 2, 1)
    store.index.close()
