"""`qtk pull` on the filesystem side: hostile names, shared blobs, torn blobs, read-only caches.

Every filesystem probe of issue 12 is a test here. A hostile endpoint is the real mirror whose
JSON answers are rewritten on the way out (``EvilHandler``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import rand
from hubtest import FaultyHandler, start_server, write_plain_repo

from qtk import errors
from qtk.hub.download import plan_pull, pull
from qtk.settings import Settings

SAFETENSORS = rand(2_000_000, 11)
FILES = {
    "config.json": b'{"model_type": "llama"}\n',
    "pkg/__init__.py": b"",
    "pkg/sub/__init__.py": b"",
    "model-a.safetensors": SAFETENSORS,
    "copy/model-b.safetensors": SAFETENSORS,  # same content: one blob
    "tokenizer.json": b'{"version": "1.0"}\n',
}


class EvilHandler(FaultyHandler):
    """Rewrites the commit sha of repo info and the oid of chosen tree entries (``server.evil``)."""

    def _send_json(self, obj, extra_headers=None):
        evil = getattr(self.server, "evil", {})
        if isinstance(obj, dict) and "sha" in obj and "sha" in evil:
            obj = {**obj, "sha": evil["sha"]}
        if isinstance(obj, list):
            obj = [{**e, "oid": evil["oids"][e["path"]]} if e.get("path") in evil.get("oids", {}) else e for e in obj]
            obj = [{**e, "lfs": {**e["lfs"], "oid": evil["lfs_oids"][e["path"]]}}
                   if e.get("path") in evil.get("lfs_oids", {}) and e.get("lfs") else e for e in obj]
        super()._send_json(obj, extra_headers)


@pytest.fixture(scope="module")
def evil_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evilmirror")
    write_plain_repo(root, "acme/dupes", FILES)
    return root


@pytest.fixture(scope="module")
def evil_server(evil_root):
    srv = start_server(evil_root, handler=EvilHandler)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def evil(evil_server, monkeypatch):
    evil_server.evil = {}
    monkeypatch.setenv("HF_ENDPOINT", evil_server.url)
    return evil_server


def _tree(path: Path) -> dict[str, tuple]:
    """Everything under ``path``: name -> (kind, size, mtime_ns, link target)."""
    out = {}
    if not path.exists():
        return out
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out[p.relative_to(path).as_posix()] = (st.st_mode >> 12, st.st_size, st.st_mtime_ns,
                                               os.readlink(p) if p.is_symlink() else None)
    return out


def _blobs(cache_dir: Path, repo: str = "acme/dupes") -> list[Path]:
    d = cache_dir / ("models--" + repo.replace("/", "--")) / "blobs"
    return sorted(p for p in d.iterdir() if "." not in p.name) if d.exists() else []


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "oid",
    [
        "../../x",
        "../../../../../../etc/hostname",
        "/etc/hostname",
        "blobs/../../" + "0" * 32,
        "A" * 40,  # uppercase
        "0" * 39,
        "0" * 41,
        "0" * 64,  # a sha256 for a non-LFS file
        "g" * 40,
        "",
    ],
)
def test_hostile_oid_is_refused_before_anything_is_written(qtk, evil, cache_dir, tmp_path, oid):
    evil.evil = {"oids": {"config.json": oid}}
    r = qtk("pull", "acme/dupes")
    assert r.exit_code == 21, r.stderr
    assert "config.json" in r.stderr
    assert not (cache_dir / "models--acme--dupes").exists()
    assert not (tmp_path / "x").exists() and not (cache_dir / "x").exists() and not (cache_dir.parent / "x").exists()


def test_hostile_lfs_oid_is_refused(qtk, evil, cache_dir, tmp_path):
    evil.evil = {"lfs_oids": {"model-a.safetensors": "../../x"}}
    r = qtk("pull", "acme/dupes", "--include", "*.safetensors")
    assert r.exit_code == 21, r.stderr
    assert not (cache_dir / "models--acme--dupes").exists() and not (cache_dir.parent / "x").exists()


@pytest.mark.parametrize("sha", ["../EVILSNAP", "../../../EVILSNAP" + "0" * 24, "0" * 39, "A" * 40, "0" * 64, "main"])
def test_hostile_commit_sha_is_refused(qtk, evil, cache_dir, sha):
    evil.evil = {"sha": sha}
    r = qtk("pull", "acme/dupes", "--include", "*.json")
    assert r.exit_code == 21, r.stderr
    assert not (cache_dir / "models--acme--dupes").exists()
    assert not list(cache_dir.parent.rglob("EVILSNAP*"))


@pytest.mark.parametrize("revision", ["../x", "../../../x", "refs/../../x", "a..b", "main.lock", " main", "ma in",
                                      "/main", "main/", "v1~1", "x:y", "@", "a@{1}", ".hidden", "a\\b", "x\x00y"])
def test_hostile_revision_is_refused(qtk, evil, cache_dir, tmp_path, revision):
    r = qtk("pull", "acme/dupes", "--revision", revision)
    assert r.exit_code == 21, r.stderr
    assert "--revision" in r.stderr
    assert not cache_dir.exists() or not any(cache_dir.rglob("*"))
    assert not (tmp_path / "x").exists() and not (cache_dir.parent / "x").exists()


def test_an_oid_naming_a_local_file_is_never_linked_in(qtk, evil, cache_dir, tmp_path):
    """A file of the advertised size outside the cache, reachable by the oid: refused, not linked."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"x" * len(FILES["config.json"]))
    rel = os.path.relpath(secret, cache_dir / "models--acme--dupes" / "blobs")
    evil.evil = {"oids": {"config.json": rel}}
    assert qtk("pull", "acme/dupes").exit_code == 21
    snap_links = list(cache_dir.rglob("config.json"))
    assert not snap_links


def test_a_planted_blob_symlink_is_not_present(qtk, evil, evil_root, cache_dir, tmp_path):
    """blobs/<oid> pointing at a foreign file of the right size (e.g. planted in a shared cache) is not
    trusted: the pull hashes it, re-fetches the file, and the snapshot ends up with the real bytes."""
    r = qtk("pull", "acme/dupes", "--include", "config.json", "--dry-run", "--json")
    (entry,) = json.loads(r.stdout)["files"]
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"y" * entry["size"])
    blob = cache_dir / "models--acme--dupes" / "blobs" / entry["oid"]
    blob.parent.mkdir(parents=True)
    os.symlink(foreign, blob)
    doc = json.loads(qtk("pull", "acme/dupes", "--include", "config.json", "--dry-run", "--json").stdout)
    assert doc["files"][0]["present"] is False and doc["files"][0]["damaged"] is True
    r = qtk("pull", "acme/dupes", "--include", "config.json")
    assert r.exit_code == 0, r.stderr
    assert (Path(r.stdout.strip()) / "config.json").read_bytes() == FILES["config.json"]
    assert not blob.is_symlink() and foreign.read_bytes() == b"y" * entry["size"]


# ------------------------------------------------------------------------------- identical content


@pytest.mark.parametrize("local_dir", [False, True])
def test_identical_files_share_one_blob_without_deadlock(qtk, evil, evil_root, cache_dir, tmp_path, local_dir):
    args = ["--local-dir", str(tmp_path / "ld")] if local_dir else []
    r = qtk("pull", "acme/dupes", "--json", *args)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    root = Path(doc["path"])
    for rel, data in FILES.items():
        assert (root / rel).read_bytes() == data, rel
    if local_dir:
        assert doc["stats"]["files_fetched"] == len(FILES)
        return
    # 6 paths, 4 distinct contents: one fetch and one blob per content
    assert doc["stats"]["files_fetched"] == 4
    assert doc["stats"]["bytes_downloaded"] == sum(len(d) for d in {v: 1 for v in FILES.values()})
    assert len(_blobs(cache_dir)) == 4
    a, b = root / "pkg/__init__.py", root / "pkg/sub/__init__.py"
    assert os.path.realpath(a) == os.path.realpath(b)
    assert os.path.realpath(root / "model-a.safetensors") == os.path.realpath(root / "copy/model-b.safetensors")
    # the plan counts the shared blob once
    assert doc["bytes_to_transfer"] == doc["stats"]["bytes_downloaded"]
    again = json.loads(qtk("pull", "acme/dupes", "--json").stdout)
    assert again["stats"]["bytes_downloaded"] == 0 and all(f["present"] for f in again["files"])


# --------------------------------------------------------------------------------------- durability


def _repo_dir(cache_dir: Path) -> Path:
    return cache_dir / "models--acme--dupes"


def test_verified_record_is_written_after_the_blob(qtk, evil, cache_dir):
    assert qtk("pull", "acme/dupes").exit_code == 0
    for blob in _blobs(cache_dir):
        record = json.loads((_repo_dir(cache_dir) / ".qtk" / "verified" / blob.name).read_text())
        st = blob.stat()
        assert record["source"] == "qtk" and (record["size"], record["ino"], record["mtime_ns"]) == (
            st.st_size, st.st_ino, st.st_mtime_ns)
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache_dir)  # qtk's records do not disturb huggingface_hub's view of the cache
    (repo,) = info.repos
    assert not info.warnings and repo.nb_files == 4  # huggingface_hub counts blobs
    assert sum(len(rev.files) for rev in repo.revisions) == len(FILES)


@pytest.mark.parametrize("keep_record", [False, True])
def test_torn_blob_after_a_crash_is_fetched_again(qtk, evil, cache_dir, keep_record):
    """A full-size blob of zeros (what a crash can leave when the data never reached the disk)."""
    assert qtk("pull", "acme/dupes").exit_code == 0
    big = _repo_dir(cache_dir) / "blobs" / _sha256(SAFETENSORS)
    record = _repo_dir(cache_dir) / ".qtk" / "verified" / big.name
    if not keep_record:
        record.unlink()
    big.write_bytes(b"\0" * len(SAFETENSORS))  # new mtime: a kept record no longer vouches for it
    doc = json.loads(qtk("pull", "acme/dupes", "--dry-run", "--json").stdout)
    damaged = sorted(f["path"] for f in doc["files"] if f["damaged"])
    assert damaged == ["copy/model-b.safetensors", "model-a.safetensors"]
    assert doc["bytes_to_transfer"] == len(SAFETENSORS)
    r = qtk("pull", "acme/dupes", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["bytes_downloaded"] == len(SAFETENSORS)
    assert big.read_bytes() == SAFETENSORS


def test_verify_rehashes_and_repairs_what_a_record_vouches_for(qtk, evil, cache_dir):
    """Bytes changed under a valid record (same inode, size and mtime): a plain pull trusts the record,
    --verify re-hashes, reports and repairs."""
    assert qtk("pull", "acme/dupes").exit_code == 0
    blob = _repo_dir(cache_dir) / "blobs" / _sha256(SAFETENSORS)
    st = blob.stat()
    with open(blob, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\xff\xfe")
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert json.loads(qtk("pull", "acme/dupes", "--json").stdout)["stats"]["bytes_downloaded"] == 0
    r = qtk("pull", "acme/dupes", "--verify")
    assert r.exit_code == 0, r.stderr
    assert "do not match their hash" in r.stderr and "model-a.safetensors" in r.stderr
    assert blob.read_bytes() == SAFETENSORS
    doc = json.loads(qtk("pull", "acme/dupes", "--verify", "--json").stdout)
    assert doc["stats"]["bytes_downloaded"] == 0 and not any(f["damaged"] for f in doc["files"])


def test_blobs_placed_by_huggingface_hub_are_adopted_after_one_hash(qtk, evil, cache_dir):
    from huggingface_hub import snapshot_download

    snapshot_download("acme/dupes", cache_dir=cache_dir, endpoint=evil.url)
    records = _repo_dir(cache_dir) / ".qtk" / "verified"
    assert not records.exists()
    doc = json.loads(qtk("pull", "acme/dupes", "--json").stdout)
    assert doc["stats"]["bytes_downloaded"] == 0 and all(f["present"] for f in doc["files"])
    assert sorted(p.name for p in records.iterdir()) == sorted(b.name for b in _blobs(cache_dir))
    assert {json.loads(p.read_text())["source"] for p in records.iterdir()} == {"adopted"}


def test_offline_pull_with_a_damaged_blob_is_an_integrity_error(qtk, evil, cache_dir, monkeypatch):
    assert qtk("pull", "acme/dupes").exit_code == 0
    blob = _repo_dir(cache_dir) / "blobs" / _sha256(SAFETENSORS)
    blob.write_bytes(b"\0" * len(SAFETENSORS))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = qtk("pull", "acme/dupes")
    assert r.exit_code == 20, r.stderr
    assert "model-a.safetensors" in r.stderr and "online" in r.stderr


def test_refs_are_written_only_when_they_change(qtk, evil, cache_dir):
    assert qtk("pull", "acme/dupes").exit_code == 0
    before = _tree(cache_dir)
    assert qtk("pull", "acme/dupes").exit_code == 0
    assert _tree(cache_dir) == before  # nothing rewritten: refs, links, records
    ref = _repo_dir(cache_dir) / "refs" / "main"
    commit = ref.read_text()
    ref.write_text("0" * 40)
    assert qtk("pull", "acme/dupes").exit_code == 0
    assert ref.read_text() == commit


# ---------------------------------------------------------------------------------------- read-only


def _readonly_runner(ro_dir: Path):
    """A command prefix under which ``ro_dir`` is read-only: a private read-only bind mount when root
    (EROFS, like a read-only NFS export), else plain permissions (EACCES)."""
    if os.geteuid() == 0:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{ro_dir}" "{ro_dir}"'],
                               capture_output=True) if shutil.which("unshare") else None
        if probe is None or probe.returncode != 0:
            pytest.skip("root without mount namespaces: cannot make a directory read-only here")
        return ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(ro_dir)], None
    modes = {}
    for p in [ro_dir, *ro_dir.rglob("*")]:
        if not p.is_symlink():
            modes[p] = p.stat().st_mode
            p.chmod(modes[p] & ~0o222)
    return [], modes


def _run_qtk_readonly(ro_dir: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    prefix, modes = _readonly_runner(ro_dir)
    try:
        return subprocess.run([*prefix, sys.executable, "-m", "qtk", *args], env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        for p, mode in (modes or {}).items():
            p.chmod(mode)


def test_fully_present_pull_on_a_read_only_cache_writes_nothing(qtk, evil, cache_dir):
    assert qtk("pull", "acme/dupes").exit_code == 0
    before = _tree(cache_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(cache_dir)}
    r = _run_qtk_readonly(cache_dir, ["pull", "acme/dupes"], env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == _repo_dir(cache_dir) / "snapshots"
    assert _tree(cache_dir) == before


def test_read_only_cache_with_unrecorded_blobs_is_used_by_hashing(qtk, evil, cache_dir):
    """Blobs another tool placed, on a cache this user cannot write: hashed (not recorded), and used."""
    assert qtk("pull", "acme/dupes").exit_code == 0
    shutil.rmtree(_repo_dir(cache_dir) / ".qtk")
    before = _tree(cache_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(cache_dir)}
    r = _run_qtk_readonly(cache_dir, ["pull", "acme/dupes", "--json"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["bytes_downloaded"] == 0
    assert _tree(cache_dir) == before


@pytest.mark.parametrize("local_dir", [False, True])
def test_read_only_destination_is_exit_41(qtk, evil, cache_dir, tmp_path, local_dir):
    dest = tmp_path / ("ld" if local_dir else "cache")
    dest.mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(dest)}
    args = ["pull", "acme/dupes", *(["--local-dir", str(dest)] if local_dir else [])]
    r = _run_qtk_readonly(dest, args, env)
    assert r.returncode == 41, r.stderr
    assert "Cannot write to" in r.stderr and str(dest) in r.stderr and "likely a bug" not in r.stderr
    assert not any(dest.rglob("*"))


def test_not_writable_maps_only_permission_errors(tmp_path):
    import errno

    from qtk.hub.cache import not_writable

    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        err = not_writable(OSError(code, os.strerror(code), str(tmp_path)), tmp_path)
        assert isinstance(err, errors.NotWritableError) and err.exit_code == 41
    for code in (errno.ENOSPC, errno.EIO, errno.ENOENT):
        assert not_writable(OSError(code, os.strerror(code)), tmp_path) is None
    assert not_writable(errors.AccessDeniedError("gated"), tmp_path) is None  # an HTTP 403 is not a disk problem


def test_library_pull_maps_a_read_only_cache_too(evil, cache_dir, monkeypatch):
    """The same mapping through the library API (in-process; the failure is injected at the lock dir)."""
    plan = plan_pull("acme/dupes", settings=Settings.from_env(hub_cache=cache_dir), check_access=False)
    import qtk.hub._lock as lockmod

    real_mkdir = Path.mkdir

    def refuse(self, *a, **kw):
        if ".locks" in self.parts:
            import errno

            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(lockmod.Path, "mkdir", refuse)
    with pytest.raises(errors.NotWritableError):
        pull(plan, connections=2)


def test_a_blob_linked_into_huggingface_hubs_shared_store_is_adopted(qtk, evil, cache_dir):
    """huggingface_hub 2.x may make blobs/<oid> a symlink into $HF_HUB_CACHE/blobs/<xx>/<xet hash>:
    such a blob is hashed once and then counts as present; a link out of the cache never does."""
    assert qtk("pull", "acme/dupes").exit_code == 0
    blob = _repo_dir(cache_dir) / "blobs" / _sha256(SAFETENSORS)
    store = cache_dir / "blobs" / "ab" / ("ab" + "0" * 62)
    store.parent.mkdir(parents=True)
    os.replace(blob, store)
    os.symlink(os.path.relpath(store, blob.parent), blob)
    shutil.rmtree(_repo_dir(cache_dir) / ".qtk")
    doc = json.loads(qtk("pull", "acme/dupes", "--json").stdout)
    assert doc["stats"]["bytes_downloaded"] == 0 and all(f["present"] for f in doc["files"])
    record = json.loads((_repo_dir(cache_dir) / ".qtk" / "verified" / blob.name).read_text())
    assert record["source"] == "adopted" and record["ino"] == store.stat().st_ino
    assert blob.is_symlink()  # left as huggingface_hub made it


from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402


@hsettings(max_examples=300, deadline=None)
@given(oid=st.one_of(st.text(max_size=80), st.from_regex(r"[0-9a-fA-F./]{38,66}", fullmatch=True)),
       commit=st.one_of(st.text(max_size=60), st.from_regex(r"[0-9a-f./]{38,42}", fullmatch=True)),
       path=st.text(min_size=1, max_size=40))
def test_no_name_leaves_the_repo_folder(tmp_path_factory, oid, commit, path):
    """Whatever a server sends as oid, commit and path: either refused (UnsafePathError) or a path inside
    the repo folder."""
    from qtk.hub.cache import CacheTarget, RemoteFile
    from qtk.hub.download import _check_names

    cache = Path("/nonexistent/cache")
    target = CacheTarget(cache, "acme/dupes")
    f = RemoteFile(path, 1, oid, lfs=len(oid) == 64)
    try:
        _check_names([f])
        dests = [target.blob_path(f), target.part_path(f), target.lock_path(f), target.visible_path(commit, f),
                 target.marker_path(f.oid)]
    except errors.UnsafePathError:
        return
    for d in dests:
        assert os.path.normpath(d) == str(d)  # no '..' left to resolve
        assert str(d).startswith(str(cache) + "/")
    assert target.blob_path(f).parent == target.repo_dir / "blobs"
    assert target.root(commit) in target.visible_path(commit, f).parents
