"""qtk provision --executor ray on a real local Ray cluster: a head and two worker nodes, each its own
``ray start --block`` (own raylet, object store, temp dir and ports; token auth on, with a token made
for the test), and the driver is the qtk CLI in a subprocess (``--address 127.0.0.1:PORT``). The store
and the HF cache are directories every node sees (this machine's disk stands in for NFS).

* 3 tiny random-weight Llama-shaped checkpoints (built here, SmolLM2's tokenizer) x 2 recipes (NF4,
  GPTQ): one worker node is killed (its whole process group, kill -9) in the middle of a task; the run
  still publishes every artifact exactly once, byte-identical to a local-executor run.
* Two drivers at once on one store: both succeed, every artifact is published once.

The cluster's temp dirs are under ``/tmp/qr*`` rather than ``tmp_path``: Ray's unix sockets live in
``<temp dir>/session_<date>_<pid>/sockets/`` and a socket path may not exceed ~107 bytes.
Every Ray process started here is stopped in a finalizer, also when a test fails: each node is its own
process group (SIGTERM to ``ray start --block``, which stops its node; then kill -9 of the group), and
any process left whose command line names this cluster's temp dir is killed by pid. ``ray stop`` is
not used: it would stop every Ray on the machine, not only this test's.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hubtest import start_server

pytest.importorskip("ray")
pytest.importorskip("torch")
pytest.importorskip("gptqmodel")
pytest.importorskip("bitsandbytes")

RAY = Path(sys.executable).with_name("ray") if Path(sys.executable).with_name("ray").is_file() else shutil.which("ray")
if RAY is None:
    pytest.skip("the `ray` command is not installed", allow_module_level=True)
MODELS = ("tiny0", "tiny1", "tiny2")

MANIFEST = """\
store = "{store}"

[defaults]
device = "cpu"

[defaults.quantize]
samples = 8
seq_len = 64
group_size = 64
calibration = "chat"

[defaults.verify]
text = "prose-heldout"
ctx = 128
max_tokens = 256
smoke = false
"""
MODEL = '\n[[models]]\nrepo = "acme/{name}"\n[[models.recipes]]\nmethod = "nf4"\n[[models.recipes]]\nmethod = "gptq"\n'

WAIT_FOR_CPUS = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
want, t0 = float(sys.argv[2]), time.monotonic()
while ray.cluster_resources().get("CPU", 0) != want and time.monotonic() - t0 < 120:
    time.sleep(0.3)
print(ray.cluster_resources().get("CPU", 0))
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class LocalRayCluster:
    """A head (no CPUs: tasks run on the workers) and worker nodes on 127.0.0.1, each a ``ray start
    --block`` process group with its own temp dir (short: Ray's unix sockets live under it) and ports."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="qr", dir="/tmp"))
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}
        self.nodes: dict[str, subprocess.Popen] = {}
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        (self.base / name).mkdir()
        ports = free_ports(7)
        log = open(self.base / f"{name}.log", "wb")
        p = subprocess.Popen(
            [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
             f"--temp-dir={self.base / name}", f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
             f"--runtime-env-agent-port={ports[2]}", f"--metrics-export-port={ports[3]}",
             f"--dashboard-agent-listen-port={ports[4]}", f"--dashboard-agent-grpc-port={ports[5]}", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.nodes[name] = p
        return p

    def start(self) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false",
                             f"--dashboard-port={free_ports(1)[0]}"])
        self.add_worker()
        self.add_worker()

    def add_worker(self) -> str:
        name = f"w{len(self.nodes)}"
        self._start(name, [f"--address={self.address}", "--num-cpus=1"])
        self.wait_for_cpus(len(self.workers()))  # one at a time: each registers before the next starts
        return name

    def workers(self) -> list[str]:
        return [n for n, p in self.nodes.items() if n != "head" and p.poll() is None]

    def wait_for_cpus(self, n: int) -> None:
        r = subprocess.run([sys.executable, "-c", WAIT_FOR_CPUS, self.address, str(n)], env=self.env,
                           capture_output=True, text=True, timeout=180)
        dead = [name for name, p in self.nodes.items() if p.poll() is not None and name in self.workers()]
        assert r.returncode == 0 and float(r.stdout.split()[-1]) == n, (r.stdout, r.stderr[-2000:], dead, self.logs())

    def kill_node(self, name: str) -> None:
        """kill -9 a whole node: its raylet, object store and agents (the ``ray start`` process group) and
        its task workers (children of its raylet in their own process groups)."""
        workers = [pid for pid in _pids() if self.node_of(pid) == name]
        os.killpg(self.nodes[name].pid, signal.SIGKILL)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[name].wait()

    def node_of(self, pid: int) -> str | None:
        """The node a process belongs to: a process of a node's ``ray start`` group (its raylet), or a
        task worker whose parent is (workers rename their command line to ``ray::...``)."""
        groups = {p.pid: n for n, p in self.nodes.items()}
        for p in (pid, _ppid(pid)):
            try:
                if p and os.getpgid(p) in groups:
                    return groups[os.getpgid(p)]
            except ProcessLookupError:
                pass
        return None

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-1500:] for p in self.base.glob("*.log"))

    def stop(self) -> None:
        for p in self.nodes.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # `ray start --block` stops its own node's processes
        deadline = time.monotonic() + 15
        for p in self.nodes.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Processes still running of this cluster: their command line names its temp dir, or their
        environment holds its token (task workers rename their command line to ``ray::...``)."""
        marks = (f"{self.base}/".encode(), f"RAY_AUTH_TOKEN={self.env['RAY_AUTH_TOKEN']}\0".encode())
        out = []
        for pid in _pids():
            try:
                if marks[0] in Path(f"/proc/{pid}/cmdline").read_bytes() or \
                        marks[1] in Path(f"/proc/{pid}/environ").read_bytes():
                    out.append(pid)
            except OSError:
                pass
        return out


def _pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and int(d.name) != os.getpid()]


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(scope="module")
def tiny_upstream(tmp_path_factory, request):
    """A mirror serving 3 tiny random-weight Llamas (hidden 128, 2 layers, SmolLM2's tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    smol = request.getfixturevalue("smol_layers")(2)
    root = tmp_path_factory.mktemp("upstream")
    for i, name in enumerate(MODELS):
        d = root / "acme" / name
        torch.manual_seed(i)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(smol / f, d / f)
    srv = start_server(root)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def ray_cluster():
    c = LocalRayCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()
        assert not c.leftovers(), "Ray processes left behind"


@pytest.fixture(scope="module")
def shared_hf(tmp_path_factory) -> Path:
    """The HF cache every node sees (shared storage): the first run fills it, the others find it."""
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="module")
def local_reference(tiny_upstream, shared_hf, tmp_path_factory):
    """The same manifest provisioned by the local executor: what the Ray runs must publish, byte for byte."""
    d = tmp_path_factory.mktemp("local")
    code, s = provision_cli(write_manifest(d, d / "store"), env_for(tiny_upstream, shared_hf))
    assert code == 0, s
    return published(d / "store")


def write_manifest(d: Path, store: Path) -> Path:
    m = d / "m.toml"
    m.write_text(MANIFEST.format(store=store) + "".join(MODEL.format(name=n) for n in MODELS))
    return m


def env_for(upstream, hf: Path, cluster: LocalRayCluster | None = None) -> dict:
    env = {k: v for k, v in (cluster.env if cluster else os.environ).items()
           if not k.startswith(("HF_", "QTK_", "RAY_ADDRESS"))}
    return {**env, "HF_ENDPOINT": upstream.url, "HF_HOME": str(hf), "HF_HUB_DISABLE_TELEMETRY": "1",
            "QTK_LEASE_TTL": "30", "GPTQMODEL_CPU_WORKERS": "2"}


def provision_cli(manifest: Path, env: dict, *args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "qtk", "provision", str(manifest), "--json", "--keep-going", *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return p
    return finish(p)


def finish(p: subprocess.Popen) -> tuple[int, dict]:
    out, err = p.communicate(timeout=400)
    try:
        return p.returncode, json.loads(out)
    except ValueError:
        raise AssertionError(f"exit {p.returncode}, no JSON summary; stderr:\n{err[-4000:]}") from None


def published(store: Path) -> dict[str, dict]:
    """Each published repo's weights (sha256) and config.json (qtk nulls the build's paths that GPTQModel
    writes into it, so two identical builds have identical configs)."""
    out = {}
    for link in sorted((store / "qtk").iterdir()):
        files = sorted(link.resolve().iterdir())
        out[link.name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.suffix == ".safetensors"}
        out[link.name]["config.json"] = json.loads((link.resolve() / "config.json").read_text())
    return out


def publishes(store: Path) -> list[str]:
    from qtk.provision import ProvisionStore

    return sorted(e["artifact"] for e in ProvisionStore(store).events() if e["step"] == "publish" and e["result"] == "done")


EVERYTHING = sorted(f"qtk/{n}-{r}" for n in MODELS for r in ("gptq", "nf4"))


@pytest.mark.slow
def test_two_drivers_at_once_on_one_store(ray_cluster, tiny_upstream, shared_hf, local_reference, tmp_path):
    """Runs before the node-killing test (file order): the cluster still has both workers."""
    if len(ray_cluster.workers()) < 2:
        ray_cluster.add_worker()
    store = tmp_path / "store"
    m = write_manifest(tmp_path, store)
    env = env_for(tiny_upstream, shared_hf, ray_cluster)
    args = ("--executor", "ray", "--address", ray_cluster.address)
    first = provision_cli(m, env, *args, wait=False)
    second = provision_cli(m, env, *args, wait=False)
    (c1, s1), (c2, s2) = finish(first), finish(second)
    assert c1 == c2 == 0, (s1, s2)
    assert publishes(store) == EVERYTHING  # between the two runs, each artifact once
    assert published(store) == local_reference
    for s in (s1, s2):
        assert sorted(a["repo_id"] for a in s["artifacts"] if a["steps"]["publish"] in ("done", "cached")) == EVERYTHING


@pytest.mark.slow
def test_a_worker_node_killed_mid_task_everything_published_once_as_local(ray_cluster, tiny_upstream, shared_hf,
                                                                          local_reference, tmp_path):
    from qtk.provision import ProvisionStore

    if len(ray_cluster.workers()) < 2:
        ray_cluster.add_worker()
    store = tmp_path / "store"
    m = write_manifest(tmp_path, store)
    killed: list[tuple[str, dict]] = []

    def killer() -> None:  # the first quantize to start on a worker node: kill that whole node
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for e in ProvisionStore(store).events() if store.is_dir() else ():
                if e["step"] == "quantize" and e["result"] == "start":
                    node = ray_cluster.node_of(e["pid"])
                    if node and node != "head":
                        ray_cluster.kill_node(node)
                        killed.append((node, e))
                        return
            time.sleep(0.1)

    t = threading.Thread(target=killer)
    t.start()
    try:
        code, s = provision_cli(m, env_for(tiny_upstream, shared_hf, ray_cluster), "--executor", "ray",
                                "--address", ray_cluster.address)
    finally:
        killed.append(("", {}))  # stops the killer if the run ended first
        t.join()
    assert killed[0][0], f"no quantize started on a worker node: {s}"
    assert code == 0, s
    assert all(a["outcome"] == "ok" and a["steps"]["publish"] == "done" for a in s["artifacts"]), s["artifacts"]
    assert publishes(store) == EVERYTHING  # each exactly once, although a node died mid-task
    assert published(store) == local_reference  # byte-identical to the local executor's artifacts
    evs = ProvisionStore(store).events()
    victim = killed[0][1]
    again = [e for e in evs if e["step"] == "quantize" and e["result"] == "start" and e["artifact"] == victim["artifact"]]
    assert len(again) == 2 and again[1]["pid"] != victim["pid"]  # Ray re-ran the task on the other node
    assert not list((store / ".qtk-provision" / "builds").glob(".*"))  # the dead attempt's workspace is gone
    # the HF cache is shared storage, filled by the first run: no node (nor the driver) downloaded anything
    assert s["bytes_downloaded"] == 0 and not [e for e in evs if e["step"] == "pull" and e["result"] != "skipped"]
