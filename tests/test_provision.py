"""qtk provision end to end on a local Hub mirror serving the real SmolLM2 weights (first 2 layers, CPU):
first run does everything, second nothing, a changed parameter redoes only what depends on it, a
failing gate never publishes, kill -9 mid-step then re-run, two concurrent runs, bad manifests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubtest import start_server

pytest.importorskip("torch")
pytest.importorskip("gptqmodel")
pytest.importorskip("bitsandbytes")

REPO = "acme/smol"

MANIFEST = """\
store = "store"

[defaults]
device = "cpu"

[defaults.quantize]
samples = {samples}
seq_len = 128
group_size = 64
calibration = "chat"

[defaults.verify]
text = "prose-heldout"
ctx = 256
max_tokens = 768
smoke = false

[defaults.gates]
max_ppl_increase_pct = 50

[[models]]
repo = "{repo}"
name = "smol"
{recipes}
"""
GPTQ = '\n[[models.recipes]]\nmethod = "gptq"\n'
NF4 = '\n[[models.recipes]]\nmethod = "nf4"\n{gates}'


def write_manifest(d: Path, *, recipes: str = GPTQ + NF4.format(gates=""), samples: int = 8, repo: str = REPO) -> Path:
    p = d / "m.toml"
    p.write_text(MANIFEST.format(samples=samples, recipes=recipes, repo=repo))
    return p


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, request):
    """A mirror serving the real SmolLM2 weights truncated to 2 layers as acme/smol."""
    smol_layers = request.getfixturevalue("smol_layers")
    root = tmp_path_factory.mktemp("upstream")
    shutil.copytree(smol_layers(2), root / "acme" / "smol")
    srv = start_server(root)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def env(upstream, monkeypatch, hf_env):
    monkeypatch.setenv("HF_ENDPOINT", upstream.url)
    return upstream


def events(store: Path, run: str | None = None) -> list[dict]:
    from qtk.provision import ProvisionStore

    return [e for e in ProvisionStore(store).events() if run is None or e["run"] == run]


def started(evs: list[dict], step: str) -> list[str]:
    return [e["artifact"] or e["model"] for e in evs if e["step"] == step and e["result"] == "start"]


def run_json(qtk, manifest: Path, *args: str) -> tuple[int, dict]:
    r = qtk("provision", str(manifest), "--json", *args)
    return r.exit_code, json.loads(r.stdout)


def assert_consistent(store: Path) -> None:
    """Every published repo is a symlink to a complete version; no temporaries of live or dead runs."""
    state = store / ".qtk-provision"
    for link in (store / "qtk").iterdir():
        assert link.is_symlink(), link
        target = link.resolve()
        assert target.parent == (state / "artifacts").resolve()
        for f in ("config.json", "model.safetensors", "qtk_provenance.json", "qtk_verify_report.json",
                  "qtk_provision.json"):
            assert (target / f).is_file(), (link, f)
        prov = json.loads((target / "qtk_provision.json").read_text())
        assert prov["repo_id"] == f"qtk/{link.name}"
    leftovers = [p for d in ("builds", "artifacts", "reports", "records") for p in (state / d).glob(".*")]
    assert not leftovers, leftovers
    for b in (state / "builds").iterdir():
        assert (b / "qtk_provenance.json").is_file(), f"half-written build {b}"


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_first_run_all_second_nothing_param_change_redoes_only_affected(env, qtk, tmp_path, monkeypatch):
    m = write_manifest(tmp_path)
    store = tmp_path / "store"

    code, s1 = run_json(qtk, m)
    assert code == 0, s1
    assert [a["outcome"] for a in s1["artifacts"]] == ["ok", "ok"]
    assert s1["bytes_downloaded"] > 60_000_000
    e1 = events(store, s1["run_id"])
    assert sorted(started(e1, "quantize")) == ["qtk/smol-gptq", "qtk/smol-nf4"]
    assert sorted(started(e1, "publish")) == ["qtk/smol-gptq", "qtk/smol-nf4"]
    assert_consistent(store)
    gptq_v1 = (store / "qtk" / "smol-gptq").resolve()
    nf4_v1 = (store / "qtk" / "smol-nf4").resolve()
    for a in s1["artifacts"]:  # the gate numbers are the verify report's
        rep = json.loads((store / a["repo_id"] / "qtk_verify_report.json").read_text())
        assert a["metrics"]["ppl"] == pytest.approx(rep["models"][1]["perplexity"]["ppl"], rel=1e-4)
        assert a["metrics"]["kld_mean"] == pytest.approx(rep["models"][1]["kl"]["mean"], rel=1e-3)

    # the published store is a Hub mirror: a node pulls the artifact and gets the built bytes
    srv = start_server(store)
    try:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        r = qtk("pull", "qtk/smol-gptq", "--json")
        assert r.exit_code == 0, r.stderr
        pulled = Path(json.loads(r.stdout)["path"])
        assert sha256(pulled / "model.safetensors") == sha256(gptq_v1 / "model.safetensors")
        assert json.loads((pulled / "qtk_provision.json").read_text())["source"]["repo"] == REPO
    finally:
        monkeypatch.setenv("HF_ENDPOINT", env.url)
        srv.shutdown()
        srv.server_close()

    # second run: nothing downloaded, quantized, verified or published
    sent = env.bytes_sent
    code, s2 = run_json(qtk, m)
    assert code == 0
    assert env.bytes_sent == sent and s2["bytes_downloaded"] == 0
    e2 = events(store, s2["run_id"])
    assert not [e for e in e2 if e["result"] == "start"], e2
    assert {a["steps"]["quantize"] for a in s2["artifacts"]} == {"cached"}

    # a calibration parameter changes: GPTQ is redone; NF4 does not read it and is untouched
    m = write_manifest(tmp_path, samples=6)
    code, s3 = run_json(qtk, m)
    assert code == 0
    e3 = events(store, s3["run_id"])
    assert started(e3, "quantize") == ["qtk/smol-gptq"]
    assert started(e3, "verify") == ["qtk/smol-gptq"]
    assert started(e3, "publish") == ["qtk/smol-gptq"]
    assert started(e3, "pull") == [] and env.bytes_sent == sent
    assert (store / "qtk" / "smol-gptq").resolve() != gptq_v1
    assert (store / "qtk" / "smol-nf4").resolve() == nf4_v1
    assert gptq_v1.is_dir()  # the previous version is kept (rollback, nodes still downloading it)
    assert_consistent(store)

    # a gate changes (and still passes): only gate + publish, no quantize/verify
    m = write_manifest(tmp_path, samples=6, recipes=GPTQ + NF4.format(gates="gates = {min_top1_pct = 10}\n"))
    code, s4 = run_json(qtk, m)
    assert code == 0
    e4 = events(store, s4["run_id"])
    assert started(e4, "quantize") == [] and started(e4, "verify") == []
    assert started(e4, "publish") == ["qtk/smol-nf4"]
    prov = json.loads((store / "qtk" / "smol-nf4" / "qtk_provision.json").read_text())
    assert prov["gates"] == {"max_ppl_increase_pct": 50, "min_top1_pct": 10}

    # status shows the store
    r = qtk("provision", "status", str(m), "--json")
    assert r.exit_code == 0
    repos = {x["repo_id"]: x for x in json.loads(r.stdout)["repos"]}
    assert set(repos) == {"qtk/smol-gptq", "qtk/smol-nf4"}
    assert all(x["last_result"] == "published" and x["published_key"] for x in repos.values())


def test_failing_gate_never_publishes_keep_going_continues(env, qtk, tmp_path):
    recipes = NF4.format(gates="gates = {min_top1_pct = 99.9}\n") + GPTQ
    m = write_manifest(tmp_path, recipes=recipes)
    store = tmp_path / "store"

    r = qtk("provision", str(m))  # without --keep-going the gate failure stops the run
    assert r.exit_code == 3, r.stderr
    assert "FAILED" in r.stderr and "top-1 agreement" in r.stderr
    assert not (store / "qtk" / "smol-nf4").exists()
    assert not (store / "qtk" / "smol-gptq").exists()  # never reached

    code, s = run_json(qtk, m, "--keep-going")
    assert code == 3
    out = {a["repo_id"]: a for a in s["artifacts"]}
    assert out["qtk/smol-nf4"]["outcome"] == "gate_failed"
    assert out["qtk/smol-nf4"]["steps"]["publish"] == "blocked"
    assert out["qtk/smol-nf4"]["gate_failures"][0].startswith("top-1 agreement")
    assert out["qtk/smol-gptq"]["outcome"] == "ok"
    assert not (store / "qtk" / "smol-nf4").exists()
    assert (store / "qtk" / "smol-gptq" / "model.safetensors").is_file()
    rec = json.loads((store / ".qtk-provision" / "records" / "qtk--smol-nf4.json").read_text())
    assert rec["last_run"]["result"] == "gate_failed" and "published" not in rec
    assert rec["last_run"]["metrics"]["top1_pct"] < 99.9  # the numbers are recorded
    gate_events = [e for e in events(store, s["run_id"]) if e["step"] == "gate"]
    assert {(e["artifact"], e["result"]) for e in gate_events} == {("qtk/smol-nf4", "failed"), ("qtk/smol-gptq", "passed")}


def _spawn(manifest: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qtk", "provision", str(manifest), "--json"],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=dict(os.environ))


def test_kill_mid_step_then_rerun_is_consistent(env, qtk, tmp_path):
    m = write_manifest(tmp_path, recipes=GPTQ)
    store = tmp_path / "store"
    p = _spawn(m, tmp_path / "killed.log")
    deadline = time.monotonic() + 240
    try:
        builds = store / ".qtk-provision" / "builds"
        while time.monotonic() < deadline:  # kill -9 while GPTQ is writing its output (a temporary dir)
            if builds.is_dir() and list(builds.glob(".*.build/.*.qtk-tmp-*")):
                break
            assert p.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
            time.sleep(0.1)
        else:
            pytest.fail("quantize never started")
        time.sleep(1)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    assert not (store / "qtk" / "smol-gptq").exists()  # nothing half-published
    # the killed run's half-written output, in the key's workspace, owned by the killed run's lease
    assert list(builds.glob(".*.build/.*.qtk-tmp-*"))
    assert not [b for b in builds.iterdir() if not b.name.startswith(".")]  # no build under its final name

    code, s = run_json(qtk, m)
    assert code == 0, (s["model_errors"], [a["error"] for a in s["artifacts"]])
    assert s["artifacts"][0]["steps"]["quantize"] == "done"
    assert_consistent(store)
    assert not list(builds.glob(".*"))  # the killed run's temporary was cleaned up


def test_two_concurrent_runs_end_consistent(env, qtk, tmp_path):
    m = write_manifest(tmp_path)
    store = tmp_path / "store"
    procs = [_spawn(m, tmp_path / f"run{i}.log") for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"run{i}.log").read_text()[-3000:]
    summaries = [json.loads(o) for o in outs]
    evs = events(store)
    # each artifact was quantized, verified and published exactly once across both runs
    for step in ("quantize", "verify", "publish"):
        done = sorted(e["artifact"] for e in evs if e["step"] == step and e["result"] == "done")
        assert done == ["qtk/smol-gptq", "qtk/smol-nf4"], (step, done)
    for s in summaries:
        assert all(a["outcome"] == "ok" for a in s["artifacts"])
    assert_consistent(store)
    links = {(store / "qtk" / n).resolve().name for n in ("smol-gptq", "smol-nf4")}
    assert {d.name for d in (store / ".qtk-provision" / "artifacts").iterdir()} == links


def test_dry_run_changes_nothing_and_plans_memory(env, qtk, tmp_path):
    m = write_manifest(tmp_path)
    r = qtk("provision", str(m), "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert not (tmp_path / "store").exists()
    a = {x["repo_id"]: x for x in s["artifacts"]}
    assert a["qtk/smol-gptq"]["steps"]["quantize"] == "to run"
    assert a["qtk/smol-gptq"]["steps"]["pull"].startswith("fetch")
    mem = a["qtk/smol-gptq"]["memory"]
    # the planner's parameter count for the 2-layer checkpoint equals its tensors
    from qtk.quantize.source import resolve_model

    assert mem["params"] == resolve_model(str(env.store.root / "acme" / "smol")).num_params
    assert mem["fits"] is True
    r = qtk("provision", str(m), "--dry-run")
    assert "memory plan" in r.stderr and "to run" in r.stderr


def test_disk_too_small_refused_before_anything(env, qtk, tmp_path, monkeypatch):
    import qtk.hub.download as dl

    m = write_manifest(tmp_path)
    monkeypatch.setattr(dl, "free_bytes", lambda path: 10_000_000)  # a nearly full disk
    sent = env.bytes_sent
    r = qtk("provision", str(m))
    assert r.exit_code == 40, r.stderr
    assert "Nothing was started" in r.stderr
    assert env.bytes_sent - sent < 10_000  # config.json alone (the memory plan), no weights
    assert not list((tmp_path / "store" / ".qtk-provision").glob("events*/*"))  # no step ran


def test_unreachable_endpoint_and_auth_errors_as_pull(qtk, tmp_path, monkeypatch, hub):
    m = write_manifest(tmp_path, repo="acme/gated")
    r = qtk("provision", str(m))
    pulled = qtk("pull", "acme/gated")
    assert r.exit_code == pulled.exit_code == 10
    first = pulled.stderr.splitlines()[0]
    assert first.replace("Error: ", "") in r.stderr  # the same message as qtk pull

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    r = qtk("provision", str(m))
    assert r.exit_code == 30, r.stderr  # the error's own code when it stops the run
    r = qtk("provision", str(m), "--keep-going", "--json")
    s = json.loads(r.stdout)
    assert r.exit_code == 60  # --keep-going: "some models failed with errors"; each one's code is in the summary
    assert s["model_errors"][0]["error"] == "NetworkError" and s["model_errors"][0]["exit_code"] == 30


@pytest.mark.parametrize("text, where, words", [
    ('store = "s"\n[defaults\n', "m.toml:2", "TOML syntax error"),
    ('store = "s"\n[[models]]\nrepo = "a/b"\n[[models.recipes]]\nmethod = "gptq"\ngroup_size = "64"\n',
     "m.toml:6: models[0].recipes[0].group_size", "expected an integer"),
    ('store = "s"\n[[models]]\nrepo = "a/b"\n[[models.recipes]]\nmethod = "gptq"\n[[models.recipes]]\nmethod = "q4"\n',
     "m.toml:7: models[0].recipes[1].method", "unknown method 'q4'"),
    ('store = "s"\n[defaults.verify]\nctxx = 5\n[[models]]\nrepo = "a/b"\n',
     "m.toml:3: defaults.verify.ctxx", "did you mean 'ctx'"),
    ('store = "s"\n[[models]]\nrepo = "a/b"\n[[models.recipes]]\nmethod = "nf4"\n[[models.recipes]]\nmethod = "nf4"\n',
     "m.toml:6: models[0].recipes[1].name", "publishes qtk/b-nf4"),
    ('store = "s"\n[[models]]\nname = "x"\n', "m.toml:2: models[0]", "missing required field 'repo'"),
    ('store = "s"\n[[models]]\nrepo = "a/b"\ngates = {max_kld = "low"}\n[[models.recipes]]\nmethod = "nf4"\n',
     "m.toml:4: models[0].gates.max_kld", "expected an integer or a number"),
])
def test_manifest_errors_name_file_line_and_field(qtk, tmp_path, text, where, words):
    (tmp_path / "m.toml").write_text(text)
    r = qtk("provision", str(tmp_path / "m.toml"), "--dry-run")
    assert r.exit_code == 2, r.stderr
    assert f"{tmp_path}/{where}" in r.stderr.replace("\n", " ") or where in r.stderr, r.stderr
    assert words in r.stderr


def test_planner_refuses_verify_before_loading(smol_layers, monkeypatch):
    import qtk.plan as planner
    from qtk import errors
    from qtk.verify.run import VerifyOptions, verify

    monkeypatch.setattr(planner, "device_capacity", lambda device: ("cpu", 50_000_000))  # a 50 MB machine
    loaded = []
    import qtk.verify.run as verify_run

    monkeypatch.setattr(verify_run, "open_model", lambda *a, **k: loaded.append(a))
    src = str(smol_layers(2))
    with pytest.raises(errors.ResourceError, match="Verifying 2 models at once needs about"):
        verify(src, [src], VerifyOptions(device="cpu", smoke=False))
    assert loaded == []


def test_quantize_memory_estimate_matches_h100_measurements(smol_bf16):
    """Peak VRAM measured on an H100 (BENCHMARKS.md): GPTQ 128x512 343 MB, NF4 113 MB."""
    from qtk.hfload import read_config
    from qtk.plan import quantize_memory, shape_from_config

    shape = shape_from_config(read_config(smol_bf16, missing="no config"))
    gptq = quantize_memory(shape, "gptq", device="cuda", group_size=64, samples=128, seq_len=512)["device_bytes"]
    nf4 = quantize_memory(shape, "nf4", device="cuda")["device_bytes"]
    assert gptq == pytest.approx(343e6, rel=0.25)
    assert nf4 == pytest.approx(113e6, rel=0.10)
