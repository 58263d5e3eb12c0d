"""qtk pull vs hf download vs hf_transfer vs curl on a local Hub mirror (~1 GiB of files).

    python benchmarks/bench_pull.py                 # unthrottled + 20 MB/s-per-connection + resume
    python benchmarks/bench_pull.py --rounds 5 --size-mib 1024 --json out.json

Each tool writes into a fresh directory; tools alternate within a round and `sync` runs between
runs (unthrottled loopback is noisy). Reports best and median wall time, MB/s, peak RSS, and every
tool's ratio against `hf download` measured in the same run. qtk's time includes its sha256
verification of every file; the others only check sizes (hf) or nothing (curl, hf_transfer).

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
            with open(d / name, "wb") as fh:
                left = size
                while left:
                    n = min(left, 16 * 1024 * 1024)
                    fh.write(os.urandom(n))
                    left -= n
    return sizes


class Server:
    def __init__(self, root: Path, throttle_bps: float) -> None:
        self.proc = subprocess.Popen(
            [PY, "-c", SERVER_CODE, str(root), str(throttle_bps), str(ROOT / "tests")],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://"), "server did not start"
        # warm the server's hash cache (first listing hashes the files)
        urllib.request.urlopen(f"{self.url}/api/models/{REPO}/tree/main?recursive=True").read()

    def bytes_sent(self) -> int:
        return json.load(urllib.request.urlopen(f"{self.url}/_stats"))["bytes_sent"]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``cmd``; (wall seconds, peak RSS MB of the process)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def tool_cmds(url: str, files: dict[str, int], out: Path, connections: int) -> dict[str, tuple[list[str], dict]]:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(out / "home")}
    env.pop("HF_TOKEN", None)
    resolve = f"{url}/{REPO}/resolve/main"
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
        "qtk": ([PY, "-m", "qtk", "pull", REPO, "-q", "--connections", str(connections),
                 "--cache-dir", str(out / "qtk")], env),
        "hf download": ([str(BIN / "hf"), "download", REPO, "--cache-dir", str(out / "hf")],
                        {**env, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}),
        "hf_transfer": ([PY, "-c", hft_code], env),
        "curl (1 stream)": (["bash", "-c", curl_script], env),
    }


def run_round_robin(url, files, work: Path, rounds: int, connections: int, tools: list[str]) -> dict:
    total = sum(files.values())
    results: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    for r in range(rounds):
        order = tools[r % len(tools):] + tools[: r % len(tools)]  # rotate who goes first
        for name in order:
            out = work / f"r{r}-{name.split()[0]}"
            cmds = tool_cmds(url, files, out, connections)
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


def resume_after_kill(url: str, files: dict[str, int], work: Path, server: Server, connections: int) -> dict:
    """Kill -9 a qtk pull at ~50% of the bytes, re-run, measure what the second run transferred."""
    total = sum(files.values())
    out = work / "resume"
    cmd, env = tool_cmds(url, files, out, connections)["qtk"]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3, help="unthrottled rounds (tools alternate)")
    ap.add_argument("--throttled-rounds", type=int, default=1)
    ap.add_argument("--throttle-mbps", type=float, default=20.0, help="per connection, MB/s")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    tools = ["qtk", "hf download", "hf_transfer", "curl (1 stream)"]
    work = Path(tempfile.mkdtemp(prefix="qtk-bench-", dir=os.environ.get("QTK_BENCH_DIR")))
    try:
        files = make_repo(work / "store", args.size_mib)
        total = sum(files.values())
        print(f"{len(files)} files, {total / 2**20:.0f} MiB; {platform.node()} {os.cpu_count()} cores; "
              f"python {platform.python_version()}")
        report: dict = {"bytes": total, "machine": f"{platform.machine()} {os.cpu_count()} cores",
                        "connections": args.connections}

        srv = Server(work / "store", 0)
        try:
            print("(a) unthrottled loopback")
            report["unthrottled"] = run_round_robin(srv.url, files, work, args.rounds, args.connections, tools)
        finally:
            srv.close()

        srv = Server(work / "store", args.throttle_mbps * 1e6)
        try:
            print(f"(b) throttled: {args.throttle_mbps:.0f} MB/s per connection")
            report["throttled"] = run_round_robin(srv.url, files, work, args.throttled_rounds, args.connections,
                                                  tools)
            print("(c) resume after kill -9 at ~50% (throttled server)")
            report["resume"] = resume_after_kill(srv.url, files, work, srv, args.connections)
            print(f"  sent before kill {report['resume']['fraction_sent_before_kill']:.0%}, "
                  f"re-transferred {report['resume']['fraction_retransferred']:.0%}")
        finally:
            srv.close()

        for key in ("unthrottled", "throttled"):
            print(f"\n{key}: tool, best s, median s, best MB/s, x hf download (best / median), peak RSS MB")
            for name, s in report[key].items():
                print(f"  {name:<16} {s['best_s']:7.2f} {s['median_s']:7.2f} {s['best_MBps']:7.0f} "
                      f"{s['x_hf_download_best']:6.2f}x / {s['x_hf_download_median']:5.2f}x {s['peak_rss_MB']:6.0f}")
        q, t = report["unthrottled"]["qtk"], report["unthrottled"]["hf_transfer"]
        print(f"\nqtk vs hf_transfer (unthrottled): best {t['best_s'] / q['best_s']:.2f}x, "
              f"median {t['median_s'] / q['median_s']:.2f}x")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
