"""qtk provision --executor ray on an in-process local Ray (ray.init(num_cpus=2): CI has 2 cores, a
head plus worker nodes would not fit its budget) against a local Hub mirror serving the real SmolLM2
weights (2 layers): the same summary, events and published bytes as the local executor; a re-run
publishes nothing again; a task whose worker process is killed is retried and publishes once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from hubtest import start_server

ray = pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

MANIFEST = """\
store = "{store}"

[defaults]
device = "cpu"

[defaults.verify]
text = "prose-heldout"
ctx = 256
max_tokens = 256
smoke = false

[defaults.gates]
max_ppl_increase_pct = 80

[[models]]
repo = "acme/smol"
name = "smol"
[[models.recipes]]
method = "nf4"
[[models.recipes]]
method = "nf4"
name = "nf4-strict"
gates = {{ max_ppl_increase_pct = 0.001 }}

[[models]]
repo = "acme/smol"
name = "smol2"
[[models.recipes]]
method = "nf4"
"""


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (each task gets the driver's HF_*/QTK_* settings of its run)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def cluster(local_ray, tmp_path, smol_layers, monkeypatch, hf_env):
    root = tmp_path / "upstream"
    shutil.copytree(smol_layers(2), root / "acme" / "smol")
    srv = start_server(root)
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("QTK_LEASE_TTL", "30")
    yield srv
    srv.shutdown()
    srv.server_close()


def run(qtk, m: Path, *args: str) -> tuple[int, dict]:
    r = qtk("provision", str(m), "--json", "--keep-going", *args)
    return r.exit_code, json.loads(r.stdout)


def published(store: Path) -> dict[str, dict[str, str]]:
    out = {}
    for link in sorted((store / "qtk").iterdir()):
        out[link.name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(link.resolve().iterdir())
                          if f.name.endswith(".safetensors") or f.name == "config.json"}
    return out


@pytest.mark.slow
def test_ray_executor_matches_local_and_publishes_once(cluster, qtk, tmp_path):
    from qtk.provision import ProvisionStore

    (tmp_path / "ray.toml").write_text(MANIFEST.format(store=tmp_path / "ray-store"))
    (tmp_path / "local.toml").write_text(MANIFEST.format(store=tmp_path / "local-store"))
    from qtk.provision import ProvisionOptions, load_manifest, provision

    seen: list[dict] = []  # the driver's event stream: the tasks' events, forwarded while they run
    summary = provision(load_manifest(tmp_path / "ray.toml"), ProvisionOptions(executor="ray", keep_going=True),
                        on_event=seen.append)
    code_r, s_r = summary.exit_code, json.loads(json.dumps(summary.to_dict(), default=str))
    code_l, s_l = run(qtk, tmp_path / "local.toml")
    assert code_r == code_l == 3, (s_r, s_l)  # the strict recipe fails its gate on both
    outcome = lambda s: {a["repo_id"]: (a["outcome"], a["steps"]["publish"]) for a in s["artifacts"]}  # noqa: E731
    assert outcome(s_r) == outcome(s_l) == {"qtk/smol-nf4": ("ok", "done"), "qtk/smol-nf4-strict": ("gate_failed", "blocked"),
                                            "qtk/smol2-nf4": ("ok", "done")}
    assert published(tmp_path / "ray-store") == published(tmp_path / "local-store")  # byte-identical
    evs = ProvisionStore(tmp_path / "ray-store").events()
    done = sorted(e["artifact"] for e in evs if e["step"] == "publish" and e["result"] == "done")
    assert done == ["qtk/smol-nf4", "qtk/smol2-nf4"]
    # the three artifacts share one quantize key: built once, under the build lock, whichever task came first
    assert len([e for e in evs if e["step"] == "quantize" and e["result"] == "done"]) == 1
    assert {e["host"] for e in evs} and len({e["run"] for e in evs}) == 1
    key = lambda e: (e["ts"], e["pid"], e["step"], e["result"], e.get("artifact"))  # noqa: E731
    assert sorted(map(key, seen)) == sorted(map(key, evs))  # every event, once, also the workers'
    assert {e["pid"] for e in seen if e["step"] == "quantize"} - {os.getpid()}  # ran in Ray workers
    # quantize and verify are separate Ray tasks: each task has its own lease, so its own event file
    files = {f.name: [json.loads(x) for x in f.read_text().splitlines()]
             for f in (tmp_path / "ray-store" / ".qtk-provision" / "events").glob("*.jsonl")}
    builder = [es for es in files.values() if any(e["step"] == "quantize" and e["result"] == "start" for e in es)]
    assert len(builder) == 1 and not [e for e in builder[0] if e["step"] == "verify"]
    for repo in ("qtk/smol-nf4", "qtk/smol-nf4-strict", "qtk/smol2-nf4"):
        v = [es for es in files.values() if any(e["artifact"] == repo and e["step"] == "verify" for e in es)]
        assert len(v) == 1 and not [e for e in v[0] if e["step"] == "quantize"], repo
    # pulled once, by the driver, into the shared HF cache: the tasks saw it and pulled nothing
    assert {e["pid"] for e in evs if e["step"] == "pull"} == {os.getpid()}

    code, s = run(qtk, tmp_path / "ray.toml", "--executor", "ray")  # nothing to do again
    assert code == 3 and all(a["steps"]["quantize"] == "cached" for a in s["artifacts"])
    assert [a["steps"]["publish"] for a in s["artifacts"]] == ["cached", "blocked", "cached"]


@pytest.mark.slow
def test_killed_worker_is_retried_and_publishes_once(cluster, qtk, tmp_path):
    """kill -9 the Ray worker process in the middle of its quantize: Ray re-runs the task, which takes
    over the dead attempt's workspace (same host, dead pid) and publishes exactly once."""
    import threading

    from qtk.provision import ProvisionStore

    store = tmp_path / "store"
    (tmp_path / "m.toml").write_text(MANIFEST.format(store=store).split("[[models.recipes]]\nmethod = \"nf4\"\nname")[0])
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            for e in ProvisionStore(store).events():
                if e["step"] == "quantize" and e["result"] == "start":
                    os.kill(e["pid"], signal.SIGKILL)
                    killed.append(e["pid"])
                    return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    code, s = run(qtk, tmp_path / "m.toml", "--executor", "ray")
    t.join()
    assert killed, "the quantize never started"
    assert code == 0, s
    evs = ProvisionStore(store).events()
    starts = [e for e in evs if e["step"] == "quantize" and e["result"] == "start"]
    assert len(starts) == 2 and starts[0]["pid"] == killed[0] and starts[1]["pid"] != killed[0]
    assert [e["artifact"] for e in evs if e["step"] == "publish" and e["result"] == "done"] == ["qtk/smol-nf4"]
    assert not list((store / ".qtk-provision" / "builds").glob(".*"))  # the dead attempt's workspace is gone


@pytest.mark.slow
def test_a_task_pulls_only_what_its_node_does_not_see(cluster, tmp_path, monkeypatch):
    """A node whose HF cache is its own (not the driver's shared one): its quantize task pulls the model
    there first, its verify task finds it and pulls nothing; each file crosses the network once."""
    from qtk.provision import ProvisionOptions, ProvisionStore, load_manifest
    from qtk.provision.ray_executor import artifact_task
    from qtk.hub.download import plan_pull

    store = tmp_path / "store"
    (tmp_path / "m.toml").write_text(MANIFEST.format(store=store).split("[[models.recipes]]\nmethod = \"nf4\"\nname")[0])
    m = load_manifest(tmp_path / "m.toml")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "node-b-hf"))  # this "node" does not see the driver's cache
    plan = plan_pull("acme/smol", include=m.models[0].include, exclude=m.models[0].exclude)
    assert plan.missing and cluster.bytes_sent < plan.total_bytes
    sent0 = cluster.bytes_sent
    opts = ProvisionOptions(executor="ray")
    q = artifact_task(m, opts, "run1", "smol", "qtk/smol-nf4", plan.commit, "quantize")
    assert q["error"] is None and q["row"].steps["quantize"] == "done", q
    assert q["row"].steps["pull"] == "done"
    v = artifact_task(m, opts, "run1", "smol", "qtk/smol-nf4", plan.commit, "verify", q)
    assert v["error"] is None and v["row"].steps["publish"] == "done", v
    assert v["row"].steps["pull"] == "done" and v["row"].steps["quantize"] == "done"  # the quantize task's
    evs = ProvisionStore(store).events()
    assert [(e["step"], e["result"]) for e in evs if e["step"] == "pull"] == [("pull", "start"), ("pull", "done")]
    assert plan.total_bytes <= cluster.bytes_sent - sent0 < plan.total_bytes * 1.1  # once, by the quantize task
    assert [e["step"] for e in evs if e["result"] == "start"] == ["pull", "quantize", "verify", "publish"]


@pytest.mark.slow
def test_verify_task_takes_the_quantize_tasks_key_on_another_kind_of_node(cluster, tmp_path):
    """Soft node affinity spills a verify task to another node when the build's node is busy, and that node
    may hold another kind of GPU: another compute capability, so another device class in the toolchain its
    keys hash. The verify task takes the quantize task's key (the inputs it returns) instead of recomputing
    it there: it finds the build and publishes it. Both stages run as Ray tasks; the verify task's worker
    reads its device class as cuda:sm90 (qtk.provision.keys.device_class replaced for that task only)."""
    from qtk.hub.download import plan_pull
    from qtk.provision import ProvisionOptions, load_manifest
    from qtk.provision.ray_executor import _worker_env, artifact_task

    store = tmp_path / "store"
    (tmp_path / "m.toml").write_text(MANIFEST.format(store=store).split("[[models.recipes]]\nmethod = \"nf4\"\nname")[0])
    m = load_manifest(tmp_path / "m.toml")
    commit = plan_pull("acme/smol", include=m.models[0].include, exclude=m.models[0].exclude).commit
    args = (m, ProvisionOptions(executor="ray"), "run1", "smol", "qtk/smol-nf4", commit)

    def on_another_kind_of_node(*task_args):
        import qtk.provision.keys as keys

        real = keys.device_class
        keys.device_class = lambda device: "cuda:sm90"
        try:
            return artifact_task(*task_args), keys.toolchain(None, "cpu")["device"]
        finally:
            keys.device_class = real  # the worker process serves later tasks

    place = {"num_cpus": 1, "runtime_env": {"env_vars": _worker_env()}}
    q = ray.get(ray.remote(artifact_task).options(**place).remote(*args, "quantize"))
    assert q["error"] is None and q["row"].steps["quantize"] == "done", q
    assert q["quantize_inputs"]["toolchain"]["device"] == "cpu"
    v, device = ray.get(ray.remote(on_another_kind_of_node).options(**place).remote(*args, "verify", q))
    assert device == "cuda:sm90"  # the verify task's node would key the build differently
    assert v["error"] is None and v["row"].steps["publish"] == "done", v
    assert v["row"].keys["quantize"] == q["row"].keys["quantize"]
    assert v["row"].keys["verify"] != q["row"].keys["verify"]  # its own numbers: keyed with its own toolchain
    prov = json.loads((store / "qtk" / "smol-nf4" / "qtk_provision.json").read_text())
    assert prov["keys"]["quantize"] == q["row"].keys["quantize"]


@pytest.mark.parametrize("manifest_device, driver_device, cluster_gpus, gpus", [
    ("cuda", "cuda", 8, 1), ("cuda", "cuda", 0, 1), ("auto", "cpu", 4, 1), ("auto", "cpu", 0, 0),
    ("auto", "cuda", 0, 1), ("cpu", "cpu", 8, 0),
])
def test_tasks_ask_for_a_gpu_when_the_manifest_or_the_cluster_says_so(manifest_device, driver_device, cluster_gpus,
                                                                       gpus):
    """The driver (a head node) may have no GPU: the cluster's resources decide for device = auto
    (a stand-in for ray.cluster_resources(): no GPU cluster here)."""
    from qtk.provision.ray_executor import _resources

    class FakeRay:
        @staticmethod
        def cluster_resources() -> dict:
            return {"CPU": 32.0, **({"GPU": float(cluster_gpus)} if cluster_gpus else {})}

    res = _resources(FakeRay, manifest_device, driver_device)
    assert res.get("num_gpus", 0) == gpus and res["num_cpus"] == 1
    res = _resources(FakeRay, manifest_device, driver_device, cpus=4)  # --ray-task-cpus 4
    assert res.get("num_gpus", 0) == gpus and res["num_cpus"] == 4


def test_a_task_computes_with_the_cores_it_asked_for(local_ray):
    """Ray sets OMP_NUM_THREADS when it starts a worker process, and reuses that process for tasks of
    other sizes: the task sets torch's threads to the CPUs Ray assigned it."""
    from qtk.provision.ray_executor import _use_assigned_cpus

    def threads() -> tuple[int | None, int]:
        import torch

        torch.set_num_threads(7)  # whatever an earlier task left
        return _use_assigned_cpus(ray), torch.get_num_threads()

    task = ray.remote(threads)
    assert ray.get(task.options(num_cpus=1).remote()) == (1, 1)
    assert ray.get(task.options(num_cpus=2).remote()) == (2, 2)
    assert _use_assigned_cpus(ray) is None  # the driver is not a task: its threads are left alone
