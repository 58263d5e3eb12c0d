"""`qtk pull` against a server whose listing is hostile or broken (issue 19, items 1 and 2).

A listing never writes outside the model's own files: no path into `.git/` (a checkout's config and
hooks run commands), `.cache/qtk` (qtk's records), `.qtk` or any other dot directory, no part longer
than the filesystem allows, no `a` beside `a/b`, nothing through a symbolic link below the destination.
Each refusal is exit 21 at planning, with nothing written: the whole test directory (the --local-dir
with its `.git`, the HF cache, a folder beside them) is compared before and after. The server is
`hubtest.ListingServer`: it lists and serves exactly what a test says, so a name that a pull accepts
really gets written (the mirror would refuse these names itself)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from hubtest import start_listing_server

from qtk import errors
from qtk.hub.download import plan_pull, pull
from qtk.hub.names import PATH_PART_MAX, pull_path_problem
from qtk.settings import Settings

REPO = "acme/listed"
GOOD = {"config.json": b'{"model_type": "llama"}\n', "sub/weights.bin": b"w" * 3000}


@pytest.fixture(scope="module")
def listing_server():
    srv = start_listing_server()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server(listing_server, monkeypatch):
    listing_server.files, listing_server.lfs, listing_server.requests = dict(GOOD), set(), []
    monkeypatch.setenv("HF_ENDPOINT", listing_server.url)
    return listing_server


@pytest.fixture
def sandbox(tmp_path, hf_env):
    """A --local-dir that is a git checkout with qtk records, and a folder beside it that must stay as is."""
    local = tmp_path / "local"
    (local / ".git" / "hooks").mkdir(parents=True)
    (local / ".git" / "config").write_text("[core]\n\trepositoryformatversion = 0\n")
    (local / ".cache" / "qtk" / "download").mkdir(parents=True)
    (local / ".cache" / "qtk" / "download" / "keep.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious.txt").write_text("mine\n")
    return tmp_path


def fs_state(root: Path) -> dict[str, str]:
    """Every entry below ``root``: what it is and (for files and links) what it holds."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _pull_args(mode: str, sandbox: Path) -> list[str]:
    return ["pull", REPO] + (["--local-dir", str(sandbox / "local")] if mode == "local" else [])


# ------------------------------------------------------------------------------------ refused names

LONG = "x" * 256  # over NAME_MAX itself

HOSTILE = [
    # (extra listing entries, the refused name's part shown in the message, fails on the code before the fix)
    pytest.param({".git/config": b"[core]\n\tfsmonitor = touch /tmp/pwned\n"}, ".git", id="git-config"),
    pytest.param({".git/hooks/pre-commit": b"#!/bin/sh\ntouch /tmp/pwned\n"}, ".git", id="git-hook"),
    pytest.param({"sub/.git/config": b"[core]\n"}, ".git", id="nested-git-config"),
    pytest.param({".cache/qtk/download/config.json.json": b'{"oid": "0"}'}, ".cache", id="qtk-record"),
    pytest.param({".cache/huggingface/download/x.metadata": b"0\n"}, ".cache", id="hf-record"),
    pytest.param({".qtk/verified/" + "0" * 40: b"{}"}, ".qtk", id="qtk-cache-record"),
    pytest.param({".bashrc": b"touch /tmp/pwned\n"}, ".bashrc", id="top-dotfile"),
    pytest.param({".envrc": b"touch /tmp/pwned\n"}, ".envrc", id="direnv"),
    pytest.param({"sub/.gitattributes": b"* text\n"}, ".gitattributes", id="gitattributes-not-at-top"),
    pytest.param({".gitattributes/x": b"x"}, ".gitattributes", id="gitattributes-as-dir"),
    pytest.param({"...": b"x"}, "...", id="three-dots"),
    pytest.param({LONG: b"x"}, "256 bytes", id="part-256-bytes"),
    pytest.param({"d" * (PATH_PART_MAX + 1) + "/f": b"x"}, f"{PATH_PART_MAX + 1} bytes", id="dir-part-201"),
    pytest.param({"é" * 101: b"x"}, "202 bytes", id="202-utf8-bytes-101-chars"),
    pytest.param({"bad\ud800name": b"x"}, "UTF-8", id="lone-surrogate"),
    # 20 parts of 200 bytes: each part is allowed, the whole path (4019 bytes) with the target's is over PATH_MAX
    # (lstat raised ENAMETOOLONG: exit 1 "likely a bug", in the cache on the second pull)
    pytest.param({"/".join(["\U0001F600" * 50] * 20): b"x"}, "bytes long", id="path-over-PATH_MAX"),
    pytest.param({"a": b"file", "a/b": b"under it"}, "cannot also be a directory", id="a-then-a/b"),
    pytest.param({"a/b": b"under it", "a": b"file"}, "cannot also be a directory", id="a/b-then-a"),
    pytest.param({"sub": b"a file named like GOOD's directory"}, "cannot also be a directory", id="sub-vs-sub/"),
    # refused by the code before the fix too (regression guards)
    pytest.param({"../outside/precious.txt": b"x"}, "'..'", id="dotdot"),
    pytest.param({"/etc/passwd": b"x"}, "absolute", id="absolute"),
    pytest.param({"a\\..\\..\\x": b"x"}, "a\\\\..", id="backslash"),
    pytest.param({"a\x00b": b"x"}, "control", id="nul"),
    pytest.param({"a//b": b"x"}, "empty", id="empty-part"),
]


@pytest.mark.parametrize("mode", ["local", "cache"])
@pytest.mark.parametrize("extra,needle", HOSTILE)
def test_hostile_listing_is_refused_at_planning_with_nothing_written(qtk, server, sandbox, mode, extra, needle):
    server.files.update(extra)
    before = fs_state(sandbox)
    r = qtk(*_pull_args(mode, sandbox))
    assert r.exit_code == 21, (r.exit_code, r.stderr)
    assert "Refusing" in r.stderr and needle in r.stderr, r.stderr
    assert "Nothing was written" in r.stderr
    assert fs_state(sandbox) == before  # no blob, no snapshot, no record, no lock, nothing beside
    assert not [p for m, p in server.requests if "/resolve/" in p]  # refused before the access check


def test_the_hint_for_a_dot_directory_says_how_to_pull_the_rest(qtk, server, sandbox):
    server.files[".github/workflows/ci.yml"] = b"on: push\n"
    r = qtk(*_pull_args("local", sandbox))
    assert r.exit_code == 21 and "--exclude" in r.stderr, r.stderr
    r = qtk(*_pull_args("local", sandbox), "--exclude", ".*", "--exclude", "*/.*")
    assert r.exit_code == 0, r.stderr
    assert (sandbox / "local" / "sub" / "weights.bin").read_bytes() == GOOD["sub/weights.bin"]
    assert not (sandbox / "local" / ".github").exists()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"a": b"x", "a.qtk-part.state": b"y"}, id="state-file-of-a"),
        pytest.param({"a": b"x", "a.json/b": b"y"}, id="record-of-a-as-directory"),
    ],
)
def test_names_whose_local_dir_records_collide_are_refused(qtk, server, sandbox, extra):
    """In --local-dir, `a`'s resume state is `.cache/qtk/download/a.qtk-part.state.json`, which is the
    record of a file named `a.qtk-part.state`: refused there. The cache names its records by oid: fine."""
    server.files.update(extra)
    before = fs_state(sandbox)
    r = qtk(*_pull_args("local", sandbox))
    assert r.exit_code == 21 and "would collide" in r.stderr, r.stderr
    assert fs_state(sandbox) == before
    r = qtk(*_pull_args("cache", sandbox))
    assert r.exit_code == 0, r.stderr
    snap = Path(r.stdout.strip())
    for rel, data in extra.items():
        assert (snap / rel).read_bytes() == data


# ------------------------------------------------------------------------------------ accepted names


@pytest.mark.parametrize("mode", ["local", "cache"])
def test_top_level_gitattributes_and_ordinary_odd_names_still_work(qtk, server, sandbox, mode):
    odd = {
        ".gitattributes": b"*.bin filter=lfs diff=lfs merge=lfs -text\n",
        ".gitignore": b"*.tmp\n",
        "a..b/c.d": b"dots inside a name",
        "x" * PATH_PART_MAX: b"a name of exactly the limit",
        "ü/ñ é.txt": b"unicode",
        "sub2/x": b"beside sub/",
        "a": b"a file",
        "ab/c": b"not under a",
    }
    server.files.update(odd)
    r = qtk(*_pull_args(mode, sandbox))
    assert r.exit_code == 0, r.stderr
    root = sandbox / "local" if mode == "local" else Path(r.stdout.strip())
    for rel, data in {**GOOD, **odd}.items():
        assert (root / rel).read_bytes() == data
    assert (sandbox / "local" / ".git" / "config").read_text().startswith("[core]")


# ------------------------------------------------------------------------------- symbolic links in the way


@pytest.mark.parametrize("link", ["sub", ".cache", ".cache/qtk/download"])
def test_a_directory_symlink_inside_local_dir_is_never_written_through(qtk, server, sandbox, link):
    local = sandbox / "local"
    victim = local / link
    if victim.exists():
        os.rename(victim, sandbox / "moved-away")
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.symlink_to(sandbox / "outside", target_is_directory=True)
    before = fs_state(sandbox)
    r = qtk(*_pull_args("local", sandbox))
    assert r.exit_code == 21, r.stderr
    assert "symbolic link" in r.stderr, r.stderr
    assert fs_state(sandbox) == before


def test_a_file_where_the_listing_needs_a_directory_is_refused(qtk, server, sandbox):
    (sandbox / "local" / "sub").write_text("an old file where this revision has a directory")
    before = fs_state(sandbox)
    r = qtk(*_pull_args("local", sandbox))
    assert r.exit_code == 21 and "is a file, not a directory" in r.stderr, r.stderr
    assert fs_state(sandbox) == before


def test_a_snapshot_directory_symlink_is_refused(qtk, server, sandbox, cache_dir):
    snap = cache_dir / "models--acme--listed" / "snapshots" / server.commit
    snap.mkdir(parents=True)
    (snap / "sub").symlink_to(sandbox / "outside", target_is_directory=True)
    r = qtk(*_pull_args("cache", sandbox))
    assert r.exit_code == 21 and "symbolic link" in r.stderr, r.stderr
    assert os.listdir(sandbox / "outside") == ["precious.txt"]


@pytest.mark.parametrize("mode", ["local", "cache"])
def test_a_link_planted_after_the_plan_is_not_followed_when_placing(server, sandbox, cache_dir, mode):
    """Between planning and placing, `sub` becomes a link to a folder outside: placing walks with
    O_NOFOLLOW from the destination, so it refuses instead of writing there."""
    local = sandbox / "local"
    plan = plan_pull(REPO, settings=Settings.from_env(), local_dir=local if mode == "local" else None)
    root = local if mode == "local" else plan.root
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").symlink_to(sandbox / "outside", target_is_directory=True)
    with pytest.raises(errors.UnsafePathError, match="symbolic link"):
        pull(plan)
    assert os.listdir(sandbox / "outside") == ["precious.txt"]


# ------------------------------------------------------------------------------------------ property

_PART = st.one_of(
    st.sampled_from(["a", "b", "sub", "config.json", "x.bin", ".git", ".cache", "qtk", "download", ".qtk",
                     ".gitattributes", ".gitignore", ".", "..", "...", "a.qtk-part", "a.json", "", "x" * 201,
                     "é" * 101, "a\\b", "c:", "\x00", "\ud800", " "]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/"), min_size=1, max_size=12),
)
_PATH = st.lists(_PART, min_size=1, max_size=4).map("/".join)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(_PATH, min_size=1, max_size=5, unique=True), mode=st.sampled_from(["local", "cache"]))
def test_no_listing_writes_outside_the_target_or_into_a_dot_directory(server, tmp_path_factory, paths, mode):
    """Whatever the listing: the pull is refused with nothing written, or it writes exactly the listed
    files, inside the target, none in a dot directory (qtk's own `.cache/qtk` records aside), and
    leaves the checkout's `.git` and everything beside the target as they were."""
    base = tmp_path_factory.mktemp("prop")
    local, cache, outside = base / "local", base / "cache", base / "outside"
    (local / ".git").mkdir(parents=True)
    (local / ".git" / "config").write_text("[core]\n")
    outside.mkdir()
    (outside / "precious.txt").write_text("mine\n")
    server.files = {p: hashlib.sha1(p.encode("utf-8", "surrogatepass")).digest() for p in paths}
    before = fs_state(base)
    try:
        plan = plan_pull(REPO, settings=Settings.from_env(hub_cache=cache),
                         local_dir=local if mode == "local" else None)
        pull(plan)
    except errors.UnsafePathError:
        assert fs_state(base) == before
        assert any(pull_path_problem(p) for p in paths) or _tree_clash(paths, mode), paths
        return
    assert not any(pull_path_problem(p) for p in paths)
    after = fs_state(base)
    changed = {k for k in after if before.get(k) != after[k]}
    root = local if mode == "local" else plan.root
    rel_root = root.relative_to(base).as_posix()
    for k in changed:
        assert k == rel_root or k.startswith(("local/", "cache/")) or rel_root.startswith(k + "/"), k
    visible = {k[len(rel_root) + 1:] for k in changed if k.startswith(rel_root + "/")}
    own_records = {v for v in visible if mode == "local" and v.split("/")[0] == ".cache"}
    for v in visible - own_records:
        parts = v.split("/")
        assert not any(p.startswith(".") for p in parts[:-1]), v
        assert not parts[-1].startswith(".") or v in (".gitattributes", ".gitignore"), v
    files = {v for v in visible - own_records if after[f"{rel_root}/{v}"] != "dir"}
    assert files == set(paths)
    for p in paths:
        assert (root / p).read_bytes() == server.files[p]
    for k, v in before.items():
        if k.startswith(("local/.git", "outside")):
            assert after[k] == v, k


def _tree_clash(paths: list[str], mode: str) -> bool:
    from qtk.hub.cache import BOOKKEEPING_SUFFIXES
    from qtk.hub.names import tree_conflict

    names = [p + s for p in paths for s in BOOKKEEPING_SUFFIXES] if mode == "local" else []
    return tree_conflict(paths) is not None or tree_conflict(names) is not None
