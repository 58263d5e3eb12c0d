import hashlib
import json
import os
from pathlib import Path

import pytest

from hubtest import ALICE, BOB

from qtk import errors
from qtk.hub.download import plan_pull, pull
from qtk.settings import Settings


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def repo_files(hub_root: Path, repo: str) -> dict[str, Path]:
    d = hub_root.joinpath(*repo.split("/"))
    return {p.relative_to(d).as_posix(): p for p in d.rglob("*") if p.is_file()}


def test_pull_into_standard_cache_layout(qtk, hub, hub_root, cache_dir):
    r = qtk("pull", "acme/tiny")
    assert r.exit_code == 0, r.stderr
    snap = Path(r.stdout.strip())
    repo_dir = cache_dir / "models--acme--tiny"
    commit = (repo_dir / "refs" / "main").read_text()
    assert snap == repo_dir / "snapshots" / commit
    for rel, src in repo_files(hub_root, "acme/tiny").items():
        link = snap / rel
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.read_bytes() == src.read_bytes()
    # LFS blobs are named by sha256, the others by git blob sha1 (as huggingface_hub does)
    assert (repo_dir / "blobs" / sha256(src := hub_root / "acme/tiny/model.safetensors")).is_file()
    assert not list(repo_dir.rglob("*.qtk-part*"))


def test_second_pull_transfers_zero_bytes(qtk, hub):
    assert qtk("pull", "acme/tiny").exit_code == 0
    before = hub.bytes_sent
    r = qtk("pull", "acme/tiny", "--json")
    doc = json.loads(r.stdout)
    assert doc["stats"]["bytes_downloaded"] == 0 and doc["bytes_to_transfer"] == 0
    assert hub.bytes_sent - before < 20_000  # metadata only, no file bytes
    assert "Already up to date" in qtk("pull", "acme/tiny").stderr


def test_pull_result_is_what_huggingface_hub_finds_offline(qtk, hub, cache_dir):
    from huggingface_hub import hf_hub_download, scan_cache_dir

    assert qtk("pull", "acme/tiny").exit_code == 0
    p = hf_hub_download("acme/tiny", "sub/notes.txt", cache_dir=cache_dir, local_files_only=True)
    assert Path(p).read_text() == "notes\n"
    info = scan_cache_dir(cache_dir)
    assert not info.warnings
    (repo,) = [r for r in info.repos if r.repo_id == "acme/tiny"]
    assert repo.nb_files == 6


def test_transformers_loads_the_pulled_model_offline(qtk, hub, hub_root, cache_dir, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    if not (hub_root / "acme/tiny-llama").exists():
        pytest.skip("safetensors not installed")
    assert qtk("pull", "acme/tiny-llama").exit_code == 0
    import subprocess
    import sys

    code = (
        "from transformers import AutoModelForCausalLM; import torch;"
        "m = AutoModelForCausalLM.from_pretrained('acme/tiny-llama');"
        "print(m.config.num_hidden_layers, tuple(m(torch.tensor([[1, 2, 3]])).logits.shape))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache_dir), "HF_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["2", "(1,", "3,", "256)"]


@pytest.mark.parametrize(
    "include,exclude",
    [
        (["*.json"], []),
        (["sub/*"], []),
        (["sub/"], []),
        ([], ["*.safetensors", "sub/*"]),
        (["*.json", "*.safetensors"], ["tokenizer*"]),
        (["README.md"], []),
    ],
)
def test_filters_match_huggingface_hub_semantics(qtk, hub, cache_dir, tmp_path, include, exclude):
    from huggingface_hub import snapshot_download

    args = [a for g in include for a in ("--include", g)] + [a for g in exclude for a in ("--exclude", g)]
    r = qtk("pull", "acme/tiny", *args)
    assert r.exit_code == 0, r.stderr
    ours = {p.relative_to(Path(r.stdout.strip())).as_posix() for p in Path(r.stdout.strip()).rglob("*") if p.is_file()}
    ref_dir = snapshot_download("acme/tiny", cache_dir=tmp_path / "hfref", endpoint=hub.url,
                                allow_patterns=include or None, ignore_patterns=exclude or None)
    theirs = {p.relative_to(ref_dir).as_posix() for p in Path(ref_dir).rglob("*") if p.is_file()}
    assert ours == theirs and ours


def test_revision_tag_and_sha_are_pinned(qtk, hub, cache_dir):
    r1 = qtk("pull", "acme/versioned", "--revision", "v1.0", "--json")
    d1 = json.loads(r1.stdout)
    repo_dir = cache_dir / "models--acme--versioned"
    assert (repo_dir / "refs" / "v1.0").read_text() == d1["commit"]
    assert json.loads((Path(d1["path"]) / "config.json").read_text()) == {"v": 1}
    assert not (Path(d1["path"]) / "extra.json").exists()
    r2 = qtk("pull", "acme/versioned", "--json")
    d2 = json.loads(r2.stdout)
    assert d2["commit"] != d1["commit"]
    assert (repo_dir / "refs" / "main").read_text() == d2["commit"]
    assert json.loads((Path(d2["path"]) / "config.json").read_text()) == {"v": 2}
    # by commit sha: no ref is written, files come from that commit
    r3 = qtk("pull", "acme/versioned", "--revision", d1["commit"], "--json")
    assert json.loads(r3.stdout)["stats"]["bytes_downloaded"] == 0
    assert sorted(p.name for p in (repo_dir / "refs").iterdir()) == ["main", "v1.0"]


def test_downloads_use_the_pinned_commit(qtk, hub, cache_dir):
    assert qtk("pull", "acme/versioned", "--revision", "v1.0").exit_code == 0
    resolves = [p for p, _ in hub.faults.auth_headers if "/resolve/" in p]
    commit = (cache_dir / "models--acme--versioned" / "refs" / "v1.0").read_text()
    assert resolves and all(f"/resolve/{commit}/" in p for p in resolves)


def test_dry_run_lists_and_writes_nothing(qtk, hub, cache_dir):
    r = qtk("pull", "acme/tiny", "--dry-run", "--json")
    doc = json.loads(r.stdout)
    assert doc["dry_run"] and len(doc["files"]) == 6 and doc["present_bytes"] == 0
    assert doc["bytes_to_transfer"] == doc["total_bytes"] > 3_000_000
    assert not (cache_dir / "models--acme--tiny").exists()
    qtk("pull", "acme/tiny", "--include", "*.json")
    doc = json.loads(qtk("pull", "acme/tiny", "--dry-run", "--json").stdout)
    present = {f["path"] for f in doc["files"] if f["present"]}
    assert present == {"config.json", "tokenizer.json"}
    r = qtk("pull", "acme/tiny", "--dry-run")  # the plan is the result (stdout); the notes go to stderr
    assert "present" in r.stdout and "model.safetensors" in r.stdout and "free disk" in r.stderr


def test_local_dir_and_its_idempotence(qtk, hub, hub_root, tmp_path):
    dest = tmp_path / "model"
    r = qtk("pull", "acme/tiny", "--local-dir", str(dest))
    assert r.exit_code == 0 and Path(r.stdout.strip()) == dest
    for rel, src in repo_files(hub_root, "acme/tiny").items():
        assert (dest / rel).read_bytes() == src.read_bytes() and not (dest / rel).is_symlink()
    doc = json.loads(qtk("pull", "acme/tiny", "--local-dir", str(dest), "--json").stdout)
    assert doc["stats"]["bytes_downloaded"] == 0
    (dest / "config.json").write_text("tampered")
    doc = json.loads(qtk("pull", "acme/tiny", "--local-dir", str(dest), "--json").stdout)
    assert [f["path"] for f in doc["files"] if not f["present"]] == ["config.json"]
    assert (dest / "config.json").read_bytes() == (hub_root / "acme/tiny/config.json").read_bytes()


def test_dataset_repo(qtk, hub, cache_dir):
    r = qtk("pull", "acme/texts", "--repo-type", "dataset")
    assert r.exit_code == 0, r.stderr
    assert (Path(r.stdout.strip()) / "data/train.txt").read_text().startswith("hello world")
    assert "datasets--acme--texts" in r.stdout


# ---------------------------------------------------------------- preflight errors: exit codes, nothing written


def _nothing_written(cache_dir: Path, repo: str) -> bool:
    d = cache_dir / ("models--" + repo.replace("/", "--"))
    return not d.exists() or not any(p.is_file() for p in d.rglob("*"))


def test_gated_without_token_says_login(qtk, hub, cache_dir):
    r = qtk("pull", "acme/gated")
    assert r.exit_code == 10
    assert "qtk login" in r.stderr
    assert _nothing_written(cache_dir, "acme/gated")


def test_gated_without_access_says_where_to_request_it(qtk, hub, cache_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", BOB)
    r = qtk("pull", "acme/gated")
    assert r.exit_code == 12
    assert f"request access at {hub.url}/acme/gated" in r.stderr.lower()
    assert _nothing_written(cache_dir, "acme/gated")


def test_gated_with_access_works(qtk, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ALICE)
    assert qtk("pull", "acme/gated").exit_code == 0


def test_private_repo_looks_missing_without_access(qtk, hub, monkeypatch):
    assert qtk("pull", "acme/private").exit_code == 13
    monkeypatch.setenv("HF_TOKEN", BOB)
    assert qtk("pull", "acme/private").exit_code == 13
    monkeypatch.setenv("HF_TOKEN", ALICE)  # alice is in the acme org
    assert qtk("pull", "acme/private").exit_code == 0


def test_invalid_token(qtk, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_invalidinvalidinvalid00000")
    r = qtk("pull", "acme/tiny")
    assert r.exit_code == 11
    assert "invalid" not in r.stdout and "hf_invalid" not in r.stderr


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["acme/nope"], 13, "not found"),
        (["acme/tiny", "--revision", "nope"], 14, "Revision 'nope' not found"),
        (["acme/tiny", "--include", "*.gguf"], 16, "model.safetensors"),
        (["not a repo id"], 2, "Invalid repo id"),
    ],
)
def test_not_found_errors(qtk, hub, cache_dir, args, code, needle):
    r = qtk("pull", *args)
    assert r.exit_code == code, r.stderr
    assert needle in r.stderr
    assert not any(cache_dir.glob("models--*/blobs/*")) if cache_dir.exists() else True


def test_file_vanishing_after_listing_is_entry_not_found(hub, cache_dir):
    plan = plan_pull("acme/tiny", settings=Settings.from_env(), check_access=False)
    hub.faults.hide.add("README.md")
    with pytest.raises(errors.EntryNotFoundError):
        pull(plan)
    assert not (cache_dir / "models--acme--tiny" / "snapshots" / plan.commit / "README.md").exists()


def test_path_traversal_is_refused_before_writing(qtk, hub, cache_dir, tmp_path):
    evil = {"type": "file", "oid": "0" * 40, "size": 5, "path": "../../evil.txt"}
    hub.faults.extra_tree_entries.append(evil)
    for extra in ([], ["--local-dir", str(tmp_path / "ld")]):
        r = qtk("pull", "acme/paged", *extra)
        assert r.exit_code == 21, r.stderr
        assert "evil.txt" in r.stderr
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "ld").exists()
    assert _nothing_written(cache_dir, "acme/paged")


def test_disk_preflight_refuses_with_numbers(qtk, hub, cache_dir, monkeypatch):
    import qtk.hub.download as dl

    monkeypatch.setattr(dl, "free_bytes", lambda path: 1_000_000)
    r = qtk("pull", "acme/tiny")
    assert r.exit_code == 40
    assert "1000000 bytes" in r.stderr.replace(",", "") and "needs" in r.stderr
    assert _nothing_written(cache_dir, "acme/tiny")
    # what is already present does not count
    monkeypatch.setattr(dl, "free_bytes", lambda path: 10**12)
    assert qtk("pull", "acme/tiny", "--include", "*.safetensors").exit_code == 0
    monkeypatch.setattr(dl, "free_bytes", lambda path: 400_000)
    assert qtk("pull", "acme/tiny").exit_code == 0  # only ~200 kB still missing


def test_offline_reports_cache_without_network(qtk, hub, cache_dir, monkeypatch):
    assert qtk("pull", "acme/tiny").exit_code == 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # would fail if contacted
    r = qtk("pull", "acme/tiny", "--dry-run", "--json")
    doc = json.loads(r.stdout)
    assert doc["offline"] and all(f["present"] for f in doc["files"]) and len(doc["files"]) == 6
    assert qtk("pull", "acme/tiny").exit_code == 0
    r = qtk("pull", "acme/versioned")
    assert r.exit_code == 17 and "HF_HUB_OFFLINE" in r.stderr


def test_pagination_lists_every_file(qtk, hub):
    doc = json.loads(qtk("pull", "acme/paged", "--dry-run", "--json").stdout)
    assert len(doc["files"]) == 23  # 7 per page on this server


# ---------------------------------------------------------------- transfer faults


def test_injected_resets_are_retried(qtk, hub, hub_root):
    hub.faults.resets["model.safetensors"] = 3
    hub.faults.reset_after = 256 * 1024
    r = qtk("pull", "acme/tiny", "--json", "--connections", "2")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["stats"]["retries"] >= 3
    assert sha256(Path(doc["path"]) / "model.safetensors") == sha256(hub_root / "acme/tiny/model.safetensors")


def test_corrupted_byte_is_refetched_once(qtk, hub, hub_root):
    hub.faults.corrupt["model.safetensors"] = 1
    r = qtk("pull", "acme/tiny", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["stats"]["refetches"] == 1
    assert sha256(Path(doc["path"]) / "model.safetensors") == sha256(hub_root / "acme/tiny/model.safetensors")


def test_persistent_corruption_fails_and_places_nothing(qtk, hub, cache_dir):
    hub.faults.corrupt["model.safetensors"] = 100
    r = qtk("pull", "acme/tiny", "--include", "*.safetensors")
    assert r.exit_code == 20
    assert "sha256 mismatch" in r.stderr
    repo = cache_dir / "models--acme--tiny"
    assert not [p for p in (repo / "blobs").iterdir() if len(p.name) == 64]
    assert not list(repo.rglob("*.qtk-part*"))
    assert not (repo / "snapshots").exists() or not any((repo / "snapshots").rglob("model.safetensors"))


def test_small_files_are_checked_with_git_sha1(qtk, hub):
    hub.faults.corrupt["tokenizer.json"] = 100
    hub.faults.corrupt_offset = 3
    r = qtk("pull", "acme/tiny", "--include", "tokenizer.json")
    assert r.exit_code == 20 and "git-sha1 mismatch" in r.stderr


def test_token_goes_to_endpoint_but_never_to_the_cdn(hub_root, cache_dir, monkeypatch):
    from hubtest import CdnHandler, start_server, test_auth

    cdn = start_server(hub_root, handler=CdnHandler)
    origin = start_server(hub_root, auth=test_auth(), lfs_redirect_base=cdn.url)
    try:
        monkeypatch.setenv("HF_ENDPOINT", origin.url)
        monkeypatch.setenv("HF_TOKEN", ALICE)
        result = pull(plan_pull("acme/gated", settings=Settings.from_env()), connections=4)
        assert result.stats.files_fetched == 2
        assert cdn.faults.auth_headers, "the LFS file should have come from the CDN"
        assert all(a is None for _, a in cdn.faults.auth_headers)
        assert any(a == f"Bearer {ALICE}" for _, a in origin.faults.auth_headers)
        # huggingface_hub's own client works against the same redirecting pair
        from huggingface_hub import snapshot_download

        p = snapshot_download("acme/gated", cache_dir=cache_dir.parent / "hfref", endpoint=origin.url, token=ALICE)
        assert (Path(p) / "model.safetensors").read_bytes() == (hub_root / "acme/gated/model.safetensors").read_bytes()
    finally:
        for s in (cdn, origin):
            s.shutdown()
            s.server_close()


def test_concurrent_pulls_of_the_same_repo(hub, hub_root, cache_dir):
    import threading

    results, errs = [], []

    def go():
        try:
            results.append(pull(plan_pull("acme/big", settings=Settings.from_env(), check_access=False),
                                connections=4))
        except Exception as exc:  # pragma: no cover - reported below
            errs.append(exc)

    hub.faults.throttle_bps = 40e6
    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errs
    snap = results[0].path
    assert sha256(snap / "model.safetensors") == sha256(hub_root / "acme/big/model.safetensors")
    # every file crossed the network once: the later pull either planned it as present or waited
    # for the other's lock and then found it done
    assert sum(r.stats.files_fetched for r in results) == 2
    assert sum(r.stats.bytes_downloaded for r in results) < 1.2 * (hub_root / "acme/big/model.safetensors").stat().st_size


def test_pull_never_imports_torch(hub, cache_dir):
    """`qtk pull` works with the base install: no torch, transformers or backend is imported."""
    import subprocess
    import sys

    code = (
        "import sys, runpy; sys.argv = ['qtk', 'pull', 'acme/tiny', '-q']\n"
        "try:\n    runpy.run_module('qtk', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'gptqmodel', 'bitsandbytes', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_CACHE": str(cache_dir)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "HEAVY []"
