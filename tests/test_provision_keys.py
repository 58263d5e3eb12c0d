"""qtk provision's keys and --shard on a local Hub mirror serving the real SmolLM2 weights (2 layers):
a README-only upstream commit re-quantizes nothing; a changed toolchain re-runs with that reason; NF4's
key ignores sym; --dry-run reads an hf:// calibration set's metadata only; shards are disjoint, cover
the manifest and do not depend on its order (also through scripts/provision.sh's job-array variables)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubtest import start_server, write_plain_repo
from qtk import errors
from qtk.provision.shard import parse_shard, select

ROOT = Path(__file__).resolve().parents[1]

MANIFEST = """\
store = "store"

[defaults]
device = "cpu"

[defaults.quantize]
samples = 8
seq_len = 128
group_size = 64
calibration = "{calibration}"

[defaults.verify]
text = "prose-heldout"
ctx = 256
max_tokens = 512
smoke = false

{models}
"""


def model(name: str, *recipes: str, repo: str = "acme/smol") -> str:
    out = f'[[models]]\nrepo = "{repo}"\nname = "{name}"\n'
    for r in recipes:
        out += f"[[models.recipes]]\n{r}\n"
    return out


def write(d: Path, *models: str, calibration: str = "chat") -> Path:
    p = d / "m.toml"
    p.write_text(MANIFEST.format(calibration=calibration, models="\n".join(models)))
    return p


@pytest.fixture
def upstream(tmp_path, smol_layers, monkeypatch, hf_env):
    root = tmp_path / "upstream"
    shutil.copytree(smol_layers(2), root / "acme" / "smol")
    docs = "".join(json.dumps({"text": f"calibration document {i} " * 20}) + "\n" for i in range(40))
    write_plain_repo(root, "acme/cal", {"train.jsonl": docs.encode()}, repo_type="dataset")
    srv = start_server(root)
    srv.store.listing_ttl = 0  # upstream commits in these tests follow each other within a second
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    srv.root = root
    yield srv
    srv.shutdown()
    srv.server_close()


def run(qtk, manifest: Path, *args: str) -> tuple[int, dict]:
    r = qtk("provision", str(manifest), "--json", *args)
    return r.exit_code, json.loads(r.stdout)


def art(summary: dict, repo_id: str) -> dict:
    return next(a for a in summary["artifacts"] if a["repo_id"] == repo_id)


@pytest.mark.slow
def test_readme_commit_requantizes_nothing_changed_toolchain_reruns_with_reason(upstream, qtk, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from qtk.provision import ProvisionStore
    import qtk.provision.keys as keys

    m = write(tmp_path, model("smol", 'method = "nf4"'))
    code, s = run(qtk, m)
    assert code == 0, s
    first = art(s, "qtk/smol-nf4")
    assert first["steps"]["quantize"] == "done" and first["reasons"]["quantize"] == "new"

    (upstream.root / "acme" / "smol" / "README.md").write_text("# smol\nA new model card.\n")  # a new commit
    code, s = run(qtk, m, "--dry-run")
    a = art(s, "qtk/smol-nf4")
    assert a["source"] != first["source"]  # the upstream commit moved
    assert a["keys"] == first["keys"] and a["reasons"]["quantize"] == "cached"
    code, s = run(qtk, m)
    assert code == 0 and art(s, "qtk/smol-nf4")["steps"]["quantize"] == "cached"
    evs = [e for e in ProvisionStore(tmp_path / "store").events() if e["run"] == s["run_id"]]
    assert not [e for e in evs if e["result"] == "start" and e["step"] in ("quantize", "verify", "publish")]

    real = keys._dist_version
    monkeypatch.setattr(keys, "_dist_version", lambda name: "9.9.9" if name == "torch" else real(name))
    code, s = run(qtk, m, "--dry-run")
    a = art(s, "qtk/smol-nf4")
    reason = f"changed toolchain: torch {real('torch')} -> 9.9.9"
    assert a["steps"]["quantize"] == "to run" and a["reasons"]["quantize"] == reason
    r = qtk("provision", str(m), "--dry-run")
    assert reason in r.stderr  # the human plan says why
    code, s = run(qtk, m)
    assert code == 0 and art(s, "qtk/smol-nf4")["steps"]["quantize"] == "done", json.dumps(s)
    starts = [e for e in ProvisionStore(tmp_path / "store").events()
              if e["run"] == s["run_id"] and e["step"] == "quantize" and e["result"] == "start"]
    assert [e["reason"] for e in starts] == [reason]

    cfg = upstream.root / "acme" / "smol" / "config.json"  # a changed source file is named
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "qtk_test_marker": 1}))
    code, s = run(qtk, m, "--dry-run")
    assert art(s, "qtk/smol-nf4")["reasons"]["quantize"] == "changed input config.json"


def test_nf4_key_ignores_sym_gptq_key_does_not_and_hf_calibration_is_metadata_only(upstream, qtk, tmp_path):
    m = write(tmp_path,
              model("a", 'method = "nf4"\nname = "nf4-sym"\nsym = true', 'method = "nf4"\nname = "nf4-asym"\nsym = false',
                    'method = "gptq"\nname = "g-sym"\nsym = true', 'method = "gptq"\nname = "g-asym"\nsym = false'),
              calibration="hf://datasets/acme/cal")
    code, s = run(qtk, m, "--dry-run")
    assert code == 0, s
    q = {a["repo_id"]: a["keys"]["quantize"] for a in s["artifacts"]}
    assert q["qtk/a-nf4-sym"] == q["qtk/a-nf4-asym"]
    assert q["qtk/a-g-sym"] != q["qtk/a-g-asym"]
    assert all(a["reasons"]["quantize"] == "new" for a in s["artifacts"])
    paths = [p for p, _auth in upstream.faults.auth_headers]
    assert any("/api/datasets/acme/cal" in p for p in paths)  # its metadata was read (for the key)
    from qtk.settings import Settings

    cached = Settings.from_env().hub_cache / "datasets--acme--cal"
    assert not [p for p in cached.rglob("*") if p.is_file() and "blobs" in p.parts]  # its bytes were not fetched
    assert not (tmp_path / "store").exists()  # a dry run writes nothing

    # the dataset's content is in the key: a changed file changes it, metadata only again
    docs = "".join(json.dumps({"text": f"other document {i} " * 20}) + "\n" for i in range(40))
    d = write_plain_repo(upstream.root, "acme/cal", {"train.jsonl": docs.encode()}, repo_type="dataset")
    later = time.time() + 10  # the mirror notices changes by mtime: make this one unambiguous
    os.utime(d / "train.jsonl", (later, later))
    code, s2 = run(qtk, m, "--dry-run")
    assert code == 0, s2["model_errors"]
    q2 = {a["repo_id"]: a["keys"]["quantize"] for a in s2["artifacts"]}
    assert q2["qtk/a-g-sym"] != q["qtk/a-g-sym"] and q2["qtk/a-nf4-sym"] == q["qtk/a-nf4-sym"]


def test_shards_split_the_manifest_disjointly_and_cover_it(upstream, qtk, tmp_path):
    models = [model("a", 'method = "nf4"', 'method = "gptq"'), model("b", 'method = "nf4"'),
              model("c", 'method = "nf4"', 'method = "gptq"', 'method = "awq"')]
    m = write(tmp_path, *models)
    code, full = run(qtk, m, "--dry-run")
    everything = sorted(a["repo_id"] for a in full["artifacts"])
    assert len(everything) == 6
    for n in (1, 2, 4, 7):
        got = []
        for i in range(n):
            code, s = run(qtk, m, "--dry-run", "--shard", f"{i}/{n}")
            assert code == 0 and s["shard"] == f"{i}/{n}"
            got += [a["repo_id"] for a in s["artifacts"]]
        assert sorted(got) == everything, n  # disjoint (no duplicates) and complete
    reordered = write(tmp_path, *reversed(models))
    for i in range(3):
        a = run(qtk, m, "--dry-run", "--shard", f"{i}/3")[1]["artifacts"]
        b = run(qtk, reordered, "--dry-run", "--shard", f"{i}/3")[1]["artifacts"]
        assert sorted(x["repo_id"] for x in a) == sorted(x["repo_id"] for x in b)


@pytest.mark.parametrize("text", ["", "1", "1/", "/2", "2/2", "3/2", "0/0", "-1/2", "a/b", "1/2/3", "1.5/2",
                                  "0x1/2", "1 2", "9999999/10000000", "１/２"])
def test_bad_shard_is_refused(qtk, tmp_path, text):
    with pytest.raises(errors.UsageError):
        parse_shard(text)
    r = qtk("provision", str(tmp_path / "missing.toml"), "--shard", text)
    assert r.exit_code == 2 and "--shard" in r.stderr


@settings(max_examples=200, deadline=None)
@given(units=st.lists(st.text(min_size=1, max_size=12), max_size=40, unique=True), n=st.integers(1, 12),
       seed=st.randoms(use_true_random=False))
def test_shard_property_disjoint_cover_order_free(units, n, seed):
    parts = [select(units, i, n) for i in range(n)]
    flat = [u for p in parts for u in p]
    assert sorted(flat) == sorted(units)  # each unit exactly once
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced
    shuffled = list(units)
    seed.shuffle(shuffled)
    assert [select(shuffled, i, n) for i in range(n)] == parts


@pytest.mark.parametrize("env, expect", [
    ({"JOB_COMPLETION_INDEX": "2", "QTK_SHARD_COUNT": "5"}, "--shard 2/5"),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "6"}, "--shard 3/6"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3"}, "--shard 1/3"),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "QTK_SHARD": "0/9"}, "--shard 0/9"),
    ({"QTK_EXECUTOR": "ray"}, "--executor ray"),
    ({}, None),
])
def test_provision_sh_passes_the_job_array_index(tmp_path, env, expect):
    fake = tmp_path / "qtk"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION", "QTK_"))}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "provision.sh")], capture_output=True, text=True,
                       env={**clean, "QTK": str(fake), **env})
    assert r.returncode == 0, r.stderr
    assert (expect in r.stdout) if expect else "--shard" not in r.stdout


@pytest.mark.parametrize("env, words", [
    ({"JOB_COMPLETION_INDEX": "2"}, "QTK_SHARD_COUNT"),
    ({"SLURM_ARRAY_TASK_ID": "2"}, "SLURM_ARRAY_TASK_COUNT"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"}, "integers"),
])
def test_provision_sh_refuses_an_incomplete_job_array(tmp_path, env, words):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JOB_COMPLETION", "QTK_"))}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "provision.sh")], capture_output=True, text=True,
                       env={**clean, "QTK": "/bin/false", **env})
    assert r.returncode == 2 and words in r.stderr


def test_address_without_ray_executor_is_refused(qtk, tmp_path):
    r = qtk("provision", str(tmp_path / "m.toml"), "--address", "auto")
    assert r.exit_code == 2 and "--executor ray" in r.stderr
    r = qtk("provision", str(tmp_path / "m.toml"), "--executor", "dask")
    assert r.exit_code == 2
    r = qtk("provision", str(tmp_path / "m.toml"), "--ray-task-cpus", "4")
    assert r.exit_code == 2 and "--executor ray" in r.stderr
    for bad in ("0", "-1", "two"):
        r = qtk("provision", str(tmp_path / "m.toml"), "--executor", "ray", "--ray-task-cpus", bad)
        assert r.exit_code == 2 and "--ray-task-cpus" in r.stderr, bad


@pytest.mark.slow
def test_quantize_and_verify_read_exactly_the_planned_files(upstream, qtk, tmp_path):
    """A manifest's own include/exclude is what quantize reads, not quantize's default list: a file the
    manifest excludes is neither fetched (generation_config.json) nor read when another pull already put
    it in the snapshot (consolidated.safetensors, Mistral-style duplicate weights); an extra file the
    manifest includes (LICENSE, outside quantize's default list) is in the key and in what quantize saw."""
    pytest.importorskip("bitsandbytes")
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save

    from qtk.provision import ProvisionStore
    from qtk.quantize.run import PROVENANCE_FILE
    from qtk.settings import Settings

    d = upstream.root / "acme" / "smol"
    (d / "consolidated.safetensors").write_bytes(save({"layers.0.attention.wq.weight": np.ones((8, 8), np.float32)}))
    (d / "LICENSE").write_text("Apache-2.0\n")
    r = qtk("pull", "acme/smol", "--include", "consolidated.safetensors")  # another user's pull, same snapshot
    assert r.exit_code == 0, r.stderr
    upstream.faults.auth_headers.clear()
    m = write(tmp_path, model("smol", 'method = "nf4"').replace(
        'name = "smol"\n', 'name = "smol"\ninclude = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "LICENSE"]\n'
                           'exclude = ["consolidated.safetensors", "generation_config.json"]\n'))
    code, s = run(qtk, m)
    assert code == 0, s
    planned = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
               "LICENSE"}
    store = ProvisionStore(tmp_path / "store")
    rec = store.record("qtk/smol-nf4")
    assert set(rec["quantize_inputs"]["files"]) == planned  # what the key hashed
    fetched = {p.split("/resolve/")[1].split("/", 1)[1].split("?")[0] for p, _a in upstream.faults.auth_headers
               if "/resolve/" in p}
    assert fetched <= planned and "generation_config.json" not in fetched
    snap = Settings.from_env().hub_cache / "models--acme--smol" / "snapshots"
    assert not list(snap.rglob("generation_config.json"))  # nothing fetched beyond the plan
    build = store.build_dir(art(s, "qtk/smol-nf4")["keys"]["quantize"])
    prov = json.loads((build / PROVENANCE_FILE).read_text())
    assert set(prov["source"]["weights_sha256"]) == {"model.safetensors"}  # consolidated.* was not read
    assert set(prov["source"]["files"]) == planned and prov["source"]["repo_id"] == "acme/smol"
    assert prov["source"]["commit"].startswith(art(s, "qtk/smol-nf4")["source"].split("@")[1])
    card = (build / "README.md").read_text()
    assert "base_model: acme/smol" in card and f"acme/smol @ {prov['source']['commit']}" in card
    assert str(store.sources) not in card


def test_a_calibrated_cpu_build_is_keyed_by_its_torch_thread_count(upstream, qtk, tmp_path):
    """GPTQ's bytes on the CPU depend on torch's thread count (issue 19 item 15): one key must name one set
    of bytes, so the count a calibrated build computes with is in its key; NF4 (no calibration) is not keyed
    by it, and a Ray task's count is its --ray-task-cpus."""
    torch = pytest.importorskip("torch")
    from qtk.provision import ProvisionOptions, load_manifest
    from qtk.provision.run import Provisioner

    m = write(tmp_path, model("a", 'method = "nf4"', 'method = "gptq"'))
    before = torch.get_num_threads()
    keys = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            code, s = run(qtk, m, "--dry-run")
            assert code == 0, s
            keys[n] = {a["repo_id"]: a["keys"]["quantize"] for a in s["artifacts"]}
    finally:
        torch.set_num_threads(before)
    assert keys[1]["qtk/a-nf4"] == keys[2]["qtk/a-nf4"]
    assert keys[1]["qtk/a-gptq"] != keys[2]["qtk/a-gptq"]

    man = load_manifest(m)
    assert Provisioner(man, ProvisionOptions(executor="ray", ray_task_cpus=3)).build_threads() == 3
    assert Provisioner(man, ProvisionOptions()).build_threads() == torch.get_num_threads()
