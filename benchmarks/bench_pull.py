"""qtk pull vs hf download vs hf_transfer vs curl on a local Hub mirror.

    python benchmarks/bench_pull.py                 # the issue 22 goals (below), ~5 min
    python benchmarks/bench_pull.py --topology goals --rounds 5 --json out.json
    python benchmarks/bench_pull.py --topology direct --rounds 5 --size-mib 1024
    python benchmarks/bench_pull.py --topology cdn --url-ttl 1 --sizes-mb 100,160,300

Topologies:

* ``goals`` (default): the targets of issue 22, each ratio against an anchor measured in the same run:
  (g1) loopback, one file of 512 MiB (random bytes) and one of 4 GiB (sparse on the server: zeros, no
  disk behind them), ``qtk pull`` (sha256 of every byte inside the timed run) against hf_transfer followed
  by one sha256 pass over what it wrote (goal >= 1.0x); (g2) the server throttled to 20 MB/s per
  connection, one file of 160 MB and one of 1 GiB, ``qtk pull`` against ``hf download`` (goal >= 6x);
  (g3) CPU seconds per GiB: qtk's whole CLI run, qtk's byte path alone (the Fetcher in this process),
  hf_transfer + sha256, and the limits of the machine: sha256 alone over the file and a plain ``cat``
  of it (both from the page cache), and the mirror's own cost per GiB served.
* ``direct``: the mirror serves the bytes itself: (a) unthrottled, (b) throttled to 20 MB/s per
  connection, (c) resume after kill -9.
* ``cdn``: the Hub's topology (tests/cdntest.py): the endpoint answers LFS resolves with a 302 to a
  second origin that only takes GETs with a signed URL expiring after ``--url-ttl`` seconds, and
  throttles each connection to 20 MB/s: (d) the ~1 GiB repo, (e) single-file repos of 100-300 MB
  (range sizing: every connection must work), (f) resume after kill -9. Only qtk and `hf download`
  run there (curl and hf_transfer do not follow the redirect).

Each tool writes into a fresh directory; tools alternate within a round and `sync` runs between
runs (unthrottled loopback is noisy). Reports best and median wall time, MB/s, CPU seconds, peak RSS,
and every ratio against its anchor measured in the same run. qtk's time includes its sha256
verification of every file; the others only check sizes (hf) or nothing (curl, hf_transfer).
The machine's load average is printed with every section: wall-time ratios need a quiet machine.

The server runs in its own process (tests/hubtest.py's mirror handler, which has the throttle knob).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REPO = "bench/model"
PY = sys.executable
BIN = Path(PY).parent

SERVER_CODE = r"""
import sys, json, threading
sys.path.insert(0, sys.argv[3])
from hubtest import FaultyHandler, start_server
from pathlib import Path

class H(FaultyHandler):
    def _dispatch(self, head):
        if self.path == "/_stats":
            return self._send_json({"bytes_sent": self.server.bytes_sent})
        return super()._dispatch(head)

srv = start_server(Path(sys.argv[1]), handler=H)
srv.faults.throttle_bps = float(sys.argv[2])
srv.faults.auth_headers = type("Sink", (), {"append": lambda self, x: None})()
print(srv.url, flush=True)
threading.Event().wait()
"""

CDN_SERVER_CODE = r"""
import sys, json, threading
sys.path.insert(0, sys.argv[3])
from cdntest import EndpointHandler, RequestLog, start_topology
from pathlib import Path

class H(EndpointHandler):
    def _dispatch(self, head):
        if self.path == "/_stats":
            cdn = topo.cdn
            return self._send_json({"bytes_sent": self.server.bytes_sent + cdn.bytes_sent,
                                    "cdn_expired": sum(1 for e in cdn.log if e.status == 403),
                                    "cdn_requests": len(cdn.log),
                                    "resolves": sum(1 for e in self.server.log if "/resolve/" in e.path)})
        return super()._dispatch(head)

topo = start_topology(Path(sys.argv[1]), ttl=float(sys.argv[4]), handler=H)
topo.cdn.faults.throttle_bps = float(sys.argv[2])
topo.endpoint.faults.auth_headers = type("Sink", (), {"append": lambda self, x: None})()
print(topo.endpoint.url, flush=True)
threading.Event().wait()
"""


def _random_file(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 16 * 1024 * 1024)
            fh.write(os.urandom(n))
            left -= n


def make_repo(root: Path, size_mib: int) -> dict[str, int]:
    """Two safetensors shards (3/4 and 1/4 of the size) and a config, random bytes."""
    d = root / REPO
    d.mkdir(parents=True, exist_ok=True)
    sizes = {
        "model-00001-of-00002.safetensors": size_mib * 3 // 4 * 1024 * 1024 + 4321,
        "model-00002-of-00002.safetensors": size_mib // 4 * 1024 * 1024 + 1234,
        "config.json": 0,
    }
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "bench": True}))
    sizes["config.json"] = (d / "config.json").stat().st_size
    for name, size in sizes.items():
        if name.endswith(".safetensors"):
            _random_file(d / name, size)
    return sizes


def make_single_file_repo(root: Path, size_mb: int) -> tuple[str, dict[str, int]]:
    """``bench/file-<N>mb``: one safetensors file of N decimal MB (the issue's "160 MB file")."""
    repo = f"bench/file-{size_mb}mb"
    d = root / repo
    d.mkdir(parents=True, exist_ok=True)
    size = size_mb * 1_000_000 + 77
    _random_file(d / "model.safetensors", size)
    return repo, {"model.safetensors": size}


class Server:
    """The mirror (``cdn_ttl`` None) or the two-origin topology, in its own process."""

    def __init__(self, root: Path, throttle_bps: float, cdn_ttl: float | None = None,
                 repos: tuple[str, ...] = (REPO,)) -> None:
        args = [PY, "-c", SERVER_CODE, str(root), str(throttle_bps), str(ROOT / "tests")]
        if cdn_ttl is not None:
            args = [PY, "-c", CDN_SERVER_CODE, str(root), str(throttle_bps), str(ROOT / "tests"), str(cdn_ttl)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://"), "server did not start"
        for repo in repos:  # warm the server's hash cache (first listing hashes the files)
            urllib.request.urlopen(f"{self.url}/api/models/{repo}/tree/main?recursive=True").read()

    def stats(self) -> dict:
        return json.load(urllib.request.urlopen(f"{self.url}/_stats"))

    def bytes_sent(self) -> int:
        return self.stats()["bytes_sent"]

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS MB of the process)."""
    run = cpu_timed(cmd, env)
    return run["wall_s"], run["rss_MB"]


def cpu_timed(cmd: list[str], env: dict | None = None, *, stdout: bool = False) -> dict:
    """Run ``cmd``: wall seconds, user and system CPU seconds (its own and its children's), peak RSS MB
    (and its output, with ``stdout``)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    run = {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "rss_MB": usage.ru_maxrss / 1024}
    if stdout:
        run["stdout"] = proc.stdout.read().decode()
    return run


def tool_cmds(url: str, files: dict[str, int], out: Path, connections: int,
              repo: str = REPO) -> dict[str, tuple[list[str], dict]]:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(out / "home")}
    env.pop("HF_TOKEN", None)
    resolve = f"{url}/{repo}/resolve/main"
    curl_script = " && ".join(f"curl -sf -o {out / 'curl' / n} {resolve}/{n}" for n in files)
    hft_code = (
        "import hf_transfer, sys, os\n"
        f"os.makedirs({str(out / 'hft')!r}, exist_ok=True)\n"
        + "".join(
            f"hf_transfer.download({resolve + '/' + n!r}, {str(out / 'hft' / n)!r}, max_files=8, "
            f"chunk_size=10*1024*1024)\n"
            for n in files
        )
    )
    (out / "curl").mkdir(parents=True, exist_ok=True)
    return {
        "qtk": ([PY, "-m", "qtk", "pull", repo, "-q", "--connections", str(connections),
                 "--cache-dir", str(out / "qtk")], env),
        "hf download": ([str(BIN / "hf"), "download", repo, "--cache-dir", str(out / "hf")],
                        {**env, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}),
        "hf_transfer": ([PY, "-c", hft_code], env),
        "curl (1 stream)": (["bash", "-c", curl_script], env),
    }


def run_round_robin(url, files, work: Path, rounds: int, connections: int, tools: list[str],
                    repo: str = REPO) -> dict:
    total = sum(files.values())
    results: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    for r in range(rounds):
        order = tools[r % len(tools):] + tools[: r % len(tools)]  # rotate who goes first
        for name in order:
            out = work / f"r{r}-{name.split()[0]}"
            cmds = tool_cmds(url, files, out, connections, repo)
            cmd, env = cmds[name]
            subprocess.run(["sync"])
            wall, rss = timed(cmd, env)
            results[name].append((wall, rss))
            print(f"  round {r + 1} {name:<16} {wall:7.2f} s  {total / wall / 1e6:7.0f} MB/s  rss {rss:6.0f} MB",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
    summary = {}
    for name, runs in results.items():
        walls = [w for w, _ in runs]
        summary[name] = {
            "best_s": min(walls), "median_s": statistics.median(walls),
            "best_MBps": total / min(walls) / 1e6, "median_MBps": total / statistics.median(walls) / 1e6,
            "peak_rss_MB": max(r for _, r in runs), "runs_s": walls,
        }
    anchor = summary["hf download"]
    for s in summary.values():
        s["x_hf_download_best"] = anchor["best_s"] / s["best_s"]
        s["x_hf_download_median"] = anchor["median_s"] / s["median_s"]
    return summary


def resume_after_kill(url: str, files: dict[str, int], work: Path, server: Server, connections: int,
                      repo: str = REPO) -> dict:
    """Kill -9 a qtk pull at ~50% of the bytes, re-run, measure what the second run transferred."""
    total = sum(files.values())
    out = work / "resume"
    cmd, env = tool_cmds(url, files, out, connections, repo)["qtk"]
    start = server.bytes_sent()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while server.bytes_sent() - start < total * 0.5:
        if proc.poll() is not None:
            raise RuntimeError("qtk finished before it could be killed; use a throttled server")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before_kill = server.bytes_sent() - start
    mid = server.bytes_sent()
    wall, rss = timed(cmd, env)
    second = server.bytes_sent() - mid
    shutil.rmtree(out, ignore_errors=True)
    return {
        "fraction_sent_before_kill": before_kill / total,
        "fraction_retransferred": second / total,
        "second_run_s": wall,
    }


def _print_table(title: str, table: dict) -> None:
    print(f"\n{title}: tool, best s, median s, best MB/s, x hf download (best / median), peak RSS MB")
    for name, s in table.items():
        print(f"  {name:<16} {s['best_s']:7.2f} {s['median_s']:7.2f} {s['best_MBps']:7.0f} "
              f"{s['x_hf_download_best']:6.2f}x / {s['x_hf_download_median']:5.2f}x {s['peak_rss_MB']:6.0f}")


def run_direct(args, work: Path, files: dict[str, int], tools: list[str], report: dict) -> None:
    srv = Server(work / "store", 0)
    try:
        print("(a) direct, unthrottled loopback")
        report["unthrottled"] = run_round_robin(srv.url, files, work, args.rounds, args.connections, tools)
    finally:
        srv.close()
    srv = Server(work / "store", args.throttle_mbps * 1e6)
    try:
        print(f"(b) direct, throttled: {args.throttle_mbps:.0f} MB/s per connection")
        report["throttled"] = run_round_robin(srv.url, files, work, args.throttled_rounds, args.connections, tools)
        print("(c) direct, resume after kill -9 at ~50% (throttled server)")
        report["resume"] = resume_after_kill(srv.url, files, work, srv, args.connections)
        print(f"  sent before kill {report['resume']['fraction_sent_before_kill']:.0%}, "
              f"re-transferred {report['resume']['fraction_retransferred']:.0%}")
    finally:
        srv.close()
    _print_table("(a) direct, unthrottled", report["unthrottled"])
    _print_table("(b) direct, throttled", report["throttled"])
    if "hf_transfer" in report["unthrottled"]:
        q, t = report["unthrottled"]["qtk"], report["unthrottled"]["hf_transfer"]
        print(f"\nqtk vs hf_transfer (unthrottled): best {t['best_s'] / q['best_s']:.2f}x, "
              f"median {t['median_s'] / q['median_s']:.2f}x")


def fetch_seconds(url: str, repo: str, work: Path, connections: int, chunk_size: int | None) -> float:
    """qtk's transfer alone (in this process, no CLI start-up): ``FetchStats.wall_s`` of one pull
    with fixed ranges (``chunk_size``, what qtk did before) or per-file ranges (None)."""
    sys.path.insert(0, str(ROOT))
    from qtk.hub.download import plan_pull, pull
    from qtk.settings import Settings

    cache = work / f"fetch-{chunk_size}"
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = url
    try:
        plan = plan_pull(repo, settings=Settings.from_env(hub_cache=cache), check_access=False)
        subprocess.run(["sync"])
        return pull(plan, connections=connections, chunk_size=chunk_size).stats.wall_s
    finally:
        if old is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = old
        shutil.rmtree(cache, ignore_errors=True)


def run_cdn(args, work: Path, files: dict[str, int], sized: dict[str, dict[str, int]], report: dict) -> None:
    tools = ["qtk", "hf download"]
    srv = Server(work / "store", args.throttle_mbps * 1e6, cdn_ttl=args.url_ttl, repos=(REPO, *sized))
    try:
        print(f"(d) two origins (302 to a signed GET-only URL, {args.url_ttl:g} s expiry), "
              f"{args.throttle_mbps:.0f} MB/s per connection")
        before = srv.stats()
        report["cdn"] = run_round_robin(srv.url, files, work, args.throttled_rounds, args.connections, tools)
        after = srv.stats()
        report["cdn_server"] = {k: after[k] - before[k] for k in ("cdn_expired", "cdn_requests", "resolves")}
        print(f"  CDN: {report['cdn_server']['cdn_requests']} requests, {report['cdn_server']['cdn_expired']} "
              f"refused as expired; endpoint resolves: {report['cdn_server']['resolves']}")
        report["cdn_sizes"] = {}
        for repo, f in sized.items():
            print(f"(e) two origins, one file of {f['model.safetensors'] / 1e6:.0f} MB")
            report["cdn_sizes"][repo] = run_round_robin(srv.url, f, work, args.throttled_rounds, args.connections,
                                                        tools, repo)
            size = f["model.safetensors"]
            old = min(fetch_seconds(srv.url, repo, work, args.connections, 16 * 1024 * 1024)
                      for _ in range(args.throttled_rounds))
            new = min(fetch_seconds(srv.url, repo, work, args.connections, None) for _ in range(args.throttled_rounds))
            ideal = size / (args.connections * args.throttle_mbps * 1e6)
            report["cdn_sizes"][repo]["qtk transfer only"] = {"fixed_16MiB_ranges_s": old, "per_file_ranges_s": new,
                                                              "all_connections_busy_s": ideal}
            print(f"  qtk transfer only: 16 MiB ranges {old:.2f} s, per-file ranges {new:.2f} s "
                  f"({old / new:.2f}x); all {args.connections} connections busy would take {ideal:.2f} s")
        print("(f) two origins, resume after kill -9 at ~50%")
        report["cdn_resume"] = resume_after_kill(srv.url, files, work, srv, args.connections)
        print(f"  sent before kill {report['cdn_resume']['fraction_sent_before_kill']:.0%}, "
              f"re-transferred {report['cdn_resume']['fraction_retransferred']:.0%}")
    finally:
        srv.close()
    _print_table("(d) two origins, ~1 GiB repo", report["cdn"])
    for repo, table in report["cdn_sizes"].items():
        _print_table(f"(e) two origins, {repo}", {k: v for k, v in table.items() if "best_s" in v})


# ------------------------------------------------------------------------------------ issue 22's goals

GOAL_LOOPBACK = 1.0  # x (hf_transfer + one sha256 pass), loopback
GOAL_THROTTLED = 6.0  # x hf download, 20 MB/s per connection
ANCHOR = "hf_transfer + sha256"

HFT_SHA_CODE = r"""
import hashlib, json, resource, sys, time
import hf_transfer
url, out = sys.argv[1], sys.argv[2]
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0, c0 = time.perf_counter(), cpu()
hf_transfer.download(url, out, max_files=8, chunk_size=10 * 1024 * 1024)
t1, c1 = time.perf_counter(), cpu()
with open(out, "rb") as fh:
    digest = hashlib.file_digest(fh, "sha256").hexdigest()
t2, c2 = time.perf_counter(), cpu()
print(json.dumps({"download_s": t1 - t0, "download_cpu_s": c1 - c0, "sha256_s": t2 - t1, "sha256_cpu_s": c2 - c1}))
"""

SHA_CODE = "import hashlib, sys; hashlib.file_digest(open(sys.argv[1], 'rb'), 'sha256')"


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


def make_goal_repo(root: Path, size: int, sparse: bool) -> tuple[str, dict[str, int]]:
    """``bench/goal-<size>``: one model.safetensors of ``size`` bytes, random, or ``sparse`` (a hole: zeros
    with no disk behind them, so a 4 GiB case costs the server no disk reads)."""
    repo = f"bench/goal-{size}"
    f = root / repo / "model.safetensors"
    f.parent.mkdir(parents=True, exist_ok=True)
    if sparse:
        with open(f, "wb") as fh:
            fh.truncate(size)
    else:
        _random_file(f, size)
    return repo, {"model.safetensors": size}


def per_gib(run: dict, size: int) -> float:
    return (run["user_s"] + run["sys_s"]) / (size / 2**30)


def _goal_run(name: str, srv: "Server", repo: str, size: int, out: Path, connections: int) -> dict:
    env = {**os.environ, "HF_ENDPOINT": srv.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(out / "home")}
    env.pop("HF_TOKEN", None)
    subprocess.run(["sync"])
    server0 = srv.cpu_s()
    if name == "qtk":
        run = cpu_timed([PY, "-m", "qtk", "pull", repo, "-q", "--connections", str(connections),
                         "--cache-dir", str(out / "qtk")], env)
    else:
        (out / "hft").mkdir(parents=True, exist_ok=True)
        run = cpu_timed([PY, "-c", HFT_SHA_CODE, f"{srv.url}/{repo}/resolve/main/model.safetensors",
                         str(out / "hft" / "model.safetensors")], env, stdout=True)
        run.update(json.loads(run.pop("stdout")))
    run["server_cpu_s"] = srv.cpu_s() - server0
    print(f"  {name:<22} {run['wall_s']:6.2f} s  {size / run['wall_s'] / 1e6:6.0f} MB/s  "
          f"{per_gib(run, size):5.2f} CPU-s/GiB  rss {run['rss_MB']:5.0f} MB  load {os.getloadavg()[0]:.1f}",
          flush=True)
    return run


def machine_limits(path: Path, size: int) -> dict:
    """sha256 alone and a plain ``cat`` of ``path`` (in the page cache): CPU s per GiB and wall s."""
    out = {}
    for name, cmd in (("sha256 alone", [PY, "-c", SHA_CODE, str(path)]),
                      ("cat FILE > /dev/null", ["sh", "-c", f"cat '{path}' > /dev/null"])):
        run = cpu_timed(cmd)
        out[name] = {"wall_s": run["wall_s"], "cpu_s_per_GiB": per_gib(run, size)}
    return out


def fetch_cpu(url: str, repo: str, work: Path, connections: int) -> dict:
    """qtk's byte path alone: one pull in this process (no CLI start-up), its wall and CPU seconds."""
    import resource

    sys.path.insert(0, str(ROOT))
    from qtk.hub.download import plan_pull, pull
    from qtk.settings import Settings

    cache = work / "fetch-cpu"
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = url
    try:
        plan = plan_pull(repo, settings=Settings.from_env(hub_cache=cache), check_access=False)
        subprocess.run(["sync"])
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        stats = pull(plan, connections=connections).stats
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return {"wall_s": stats.wall_s, "user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime}
    finally:
        if old is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = old
        shutil.rmtree(cache, ignore_errors=True)


def _summary(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    cpu = [r["user_s"] + r["sys_s"] for r in runs]
    return {"best_s": min(walls), "median_s": statistics.median(walls), "runs_s": walls,
            "cpu_s_median": statistics.median(cpu), "peak_rss_MB": max(r["rss_MB"] for r in runs),
            "server_cpu_s_median": statistics.median(r["server_cpu_s"] for r in runs)}


def goal_loopback(args, work: Path, srv: "Server", repo: str, size: int) -> dict:
    """qtk against hf_transfer + sha256, alternating, ``args.rounds`` rounds; CPU and the machine's limits."""
    runs: dict[str, list[dict]] = {"qtk": [], ANCHOR: []}
    limits = None
    for r in range(args.rounds):
        for name in (["qtk", ANCHOR] if r % 2 == 0 else [ANCHOR, "qtk"]):
            out = work / f"goal-{r}-{name[:3]}"
            runs[name].append(_goal_run(name, srv, repo, size, out, args.connections))
            if name == "qtk" and limits is None:
                (blob,) = (out / "qtk").rglob("blobs/*")
                limits = machine_limits(blob, size)
            shutil.rmtree(out, ignore_errors=True)
    result = {name: _summary(rs) for name, rs in runs.items()}
    q, a = result["qtk"], result[ANCHOR]
    result["ratio_best"], result["ratio_median"] = a["best_s"] / q["best_s"], a["median_s"] / q["median_s"]
    result["limits"] = limits
    result["fetch_only"] = fetch_cpu(srv.url, repo, work, args.connections)
    result["anchor_split"] = {k: statistics.median(r[k] for r in runs[ANCHOR])
                              for k in ("download_s", "download_cpu_s", "sha256_s", "sha256_cpu_s")}
    return result


def _cpu_table(size: int, res: dict) -> None:
    g = size / 2**30
    q, a, f = res["qtk"], res[ANCHOR], res["fetch_only"]
    rows = [
        ("qtk pull (the CLI: start-up, metadata, transfer, sha256, place)", q["cpu_s_median"] / g, q["median_s"]),
        ("qtk's byte path alone (in-process Fetcher: transfer + sha256)", (f["user_s"] + f["sys_s"]) / g,
         f["wall_s"]),
        ("hf_transfer + sha256 (one process)", a["cpu_s_median"] / g, a["median_s"]),
        ("  of which hf_transfer's download", res["anchor_split"]["download_cpu_s"] / g,
         res["anchor_split"]["download_s"]),
        ("  of which the sha256 pass", res["anchor_split"]["sha256_cpu_s"] / g, res["anchor_split"]["sha256_s"]),
    ]
    rows += [(f"limit: {k} (page cache)", v["cpu_s_per_GiB"], v["wall_s"]) for k, v in res["limits"].items()]
    rows.append(("the mirror (server process), per GiB it served to qtk", q["server_cpu_s_median"] / g, None))
    print(f"\n(g3) CPU seconds per GiB, {size / 2**20:.0f} MiB over loopback (medians), wall beside it")
    for label, cpu, wall in rows:
        print(f"  {label:<66} {cpu:5.2f} CPU-s/GiB" + (f"  {wall:6.2f} s" if wall is not None else ""))


def run_goals(args, work: Path) -> dict:
    report: dict = {"goal_loopback_x": GOAL_LOOPBACK, "goal_throttled_x": GOAL_THROTTLED}
    sizes = [int(x) * 2**20 for x in args.goal_sizes_mib.split(",") if x]
    throttled = [int(x) for x in args.goal_throttled_mb.split(",") if x]
    repos = [make_goal_repo(work / "store", size, sparse=size == max(sizes) and len(sizes) > 1) for size in sizes]
    repos_t = [make_single_file_repo(work / "store", mb) for mb in throttled]
    srv = Server(work / "store", 0, repos=tuple(r for r, _ in repos))
    try:
        for (repo, files), size in zip(repos, sizes):
            sparse = " (sparse on the server)" if size == max(sizes) and len(sizes) > 1 else ""
            print(f"(g1) loopback, one file of {size / 2**20:.0f} MiB{sparse}: qtk vs {ANCHOR}; load {load()}")
            report[f"loopback_{size >> 20}MiB"] = goal_loopback(args, work, srv, repo, size)
    finally:
        srv.close()
    srv = Server(work / "store", args.throttle_mbps * 1e6, repos=tuple(r for r, _ in repos_t))
    try:
        for repo, files in repos_t:
            print(f"(g2) throttled {args.throttle_mbps:.0f} MB/s per connection, one file of "
                  f"{sum(files.values()) / 1e6:.0f} MB: qtk vs hf download; load {load()}")
            report[f"throttled_{repo.split('-')[-1]}"] = run_round_robin(
                srv.url, files, work, args.throttled_rounds, args.connections, ["qtk", "hf download"], repo)
    finally:
        srv.close()
    _print_goals(report, sizes, repos_t)
    return report


def _print_goals(report: dict, sizes: list[int], repos_t: list) -> None:
    print(f"\n(g) issue 22 goals, {os.cpu_count()} cores, load {load()}")
    print(f"  {'case':<44} {'qtk best/median s':>18} {'anchor best/median s':>21} {'ratio best/median':>18}  goal")
    for size in sizes:
        res = report[f"loopback_{size >> 20}MiB"]
        q, a = res["qtk"], res[ANCHOR]
        met = "met" if res["ratio_median"] >= GOAL_LOOPBACK else "NOT met"
        print(f"  {f'loopback {size >> 20} MiB vs ' + ANCHOR:<44} {q['best_s']:8.2f} / {q['median_s']:6.2f}"
              f" {a['best_s']:10.2f} / {a['median_s']:6.2f} {res['ratio_best']:8.2f}x / {res['ratio_median']:5.2f}x"
              f"  >= {GOAL_LOOPBACK:.1f}x: {met}")
    for repo, files in repos_t:
        t = report[f"throttled_{repo.split('-')[-1]}"]
        q, h = t["qtk"], t["hf download"]
        met = "met" if q["x_hf_download_median"] >= GOAL_THROTTLED else "NOT met"
        print(f"  {f'throttled {sum(files.values()) / 1e6:.0f} MB vs hf download':<44} {q['best_s']:8.2f} / "
              f"{q['median_s']:6.2f} {h['best_s']:10.2f} / {h['median_s']:6.2f} {q['x_hf_download_best']:8.2f}x / "
              f"{q['x_hf_download_median']:5.2f}x  >= {GOAL_THROTTLED:.0f}x: {met}")
    for size in sizes:
        _cpu_table(size, report[f"loopback_{size >> 20}MiB"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", choices=["goals", "direct", "cdn", "both", "all"], default="goals",
                    help="goals: issue 22's targets; both: direct + cdn; all: everything")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--sizes-mb", default="100,160,300", help="cdn: single-file repos of these sizes (MB)")
    ap.add_argument("--url-ttl", type=float, default=2.0, help="cdn: seconds a signed URL stays valid")
    ap.add_argument("--rounds", type=int, default=3, help="unthrottled rounds (tools alternate)")
    ap.add_argument("--goal-sizes-mib", default="512,4096", help="goals: loopback single files (MiB); the "
                    "largest is sparse on the server")
    ap.add_argument("--goal-throttled-mb", default="160,1074", help="goals: throttled single files (decimal MB; "
                    "1074 MB = 1 GiB)")
    ap.add_argument("--throttled-rounds", type=int, default=1)
    ap.add_argument("--throttle-mbps", type=float, default=20.0, help="per connection, MB/s")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    tools = ["qtk", "hf download", "curl (1 stream)"]
    try:
        import hf_transfer  # noqa: F401

        tools.insert(2, "hf_transfer")
    except ImportError:
        if args.topology in ("goals", "all"):
            sys.exit("the goals need hf_transfer: pip install 'hf_transfer==0.1.9' (qtk's `bench` extra)")
        print("(hf_transfer not installed: `pip install hf_transfer` to include it)")
    work = Path(tempfile.mkdtemp(prefix="qtk-bench-", dir=os.environ.get("QTK_BENCH_DIR")))
    print(f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}; "
          f"load average {load()}")
    report: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "connections": args.connections,
                    "url_ttl_s": args.url_ttl, "load_at_start": os.getloadavg()}
    try:
        if args.topology in ("goals", "all"):
            report["goals"] = run_goals(args, work)
        if args.topology in ("direct", "cdn", "both", "all"):
            files = make_repo(work / "store", args.size_mib)
            sized = dict(make_single_file_repo(work / "store", int(mb)) for mb in args.sizes_mb.split(",") if mb) \
                if args.topology != "direct" else {}
            report["bytes"] = sum(files.values())
            print(f"{len(files)} files, {report['bytes'] / 2**20:.0f} MiB")
            if args.topology in ("direct", "both", "all"):
                run_direct(args, work, files, tools, report)
            if args.topology in ("cdn", "both", "all"):
                run_cdn(args, work, files, sized, report)
        report["load_at_end"] = os.getloadavg()
        print(f"\nload average at the end: {load()}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
