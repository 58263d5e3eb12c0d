"""`qtk serve` under abuse and load: the real CLI (`python -m qtk serve`, default limits) in its own process.

    python benchmarks/bench_serve.py [--size-mib 512] [--pulls 8] [--hf 2] [--slowloris 500] [--files 20000]

(a) slowloris: N connections that keep a request head open (one header line every 5 s, reconnecting when
    cut) for at least --attack-s seconds (longer than the server's 20 s header timeout), while `qtk pull`
    (16 connections) downloads the large repo again and again, and small GETs on new connections.
    Anchor: the same pulls and GETs with no attack, 3 runs before and 3 after, in the same run.
(b) load: P concurrent `qtk pull` clients (16 connections each) plus H `hf download` clients on the large
    repo. Every result is checked byte-identical (sha256 against the source); aggregate MB/s, the server's
    peak RSS (VmHWM) and its open threads are reported. Anchor: one `qtk pull` alone.
(c) index: a store with the large repo, a 20 GiB sparse repo and a 20,000-file repo: time until the
    server answers on a cold store (no index: everything is hashed first, the work the old mirror did on
    first requests) vs after a restart with the persistent index, and the first resolve's latency; then
    per-file resolve latency over 1,000 random files of the many-file repo (GET, one keep-alive connection).

The issue's full scale is 64 pull clients x 16 connections + 8 `hf download` on 1 GiB, a 20 GB store and a
20,000-file repo; the defaults here are sized for a 2-core machine in a few minutes (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HF = str(Path(PY).parent / "hf")
BIG = "bench/large"
MANY = "bench/many"
SPARSE = "bench/sparse"


def make_large(root: Path, size_mib: int) -> dict[str, str]:
    d = root / BIG
    d.mkdir(parents=True, exist_ok=True)
    sizes = {"model-00001-of-00002.safetensors": size_mib * 3 // 4 * 2**20 + 4321,
             "model-00002-of-00002.safetensors": size_mib // 4 * 2**20 + 1234}
    digests = {}
    (d / "config.json").write_text('{"model_type": "llama"}\n')
    digests["config.json"] = hashlib.sha256((d / "config.json").read_bytes()).hexdigest()
    for name, size in sizes.items():
        h = hashlib.sha256()
        with open(d / name, "wb") as fh:
            left = size
            while left:
                chunk = os.urandom(min(left, 16 * 2**20))
                fh.write(chunk)
                h.update(chunk)
                left -= len(chunk)
        digests[name] = h.hexdigest()
    return digests


def make_sparse(root: Path, gib: int) -> int:
    """A repo whose weights file is ``gib`` GiB of holes: a big store without the disk (hashing still reads it)."""
    d = root / SPARSE
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"sparse": true}\n')
    with open(d / "model.safetensors", "wb") as fh:
        fh.truncate(gib * 2**30)
    return gib * 2**30


def make_many(root: Path, n: int) -> list[str]:
    d = root / MANY
    names = []
    for i in range(n):
        rel = f"shard-{i % 100:03d}/file-{i:05d}.json"
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b'{"i": %d}\n' % i)
        names.append(rel)
    return names


class Server:
    def __init__(self, store: Path, index_dir: Path) -> None:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([PY, "-m", "qtk", "serve", str(store), "--port", "0", "--index-dir", str(index_dir)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"server did not start: {self.proc.stderr.read()[-2000:]}")
        self.ready_s = time.perf_counter() - t0
        self.port = urlsplit(self.url).port

    def status(self) -> dict[str, str]:
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            out[k] = v.strip()
        return out

    def peak_rss_mb(self) -> float:
        return int(self.status()["VmHWM"].split()[0]) / 1024

    def threads(self) -> int:
        return int(self.status()["Threads"])

    def close(self) -> str:
        """Stop it (SIGTERM: a clean stop); its last stderr line (the request and 503 counts)."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=60)
        return (err.strip().splitlines() or [""])[-1]


class Slowloris:
    """Keeps ``n`` connections with an unfinished request head open (reopening those the server cuts)."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.socks: list[socket.socket] = []
        self.reopened = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port))
        s.sendall(b"GET /bench/large/resolve/main/config.json HTTP/1.1\r\nHost: x\r\n")
        return s

    def start(self) -> "Slowloris":
        self.socks = [self._open() for _ in range(self.n)]
        self._t.start()
        return self

    @staticmethod
    def _cut(s: socket.socket) -> bool:
        """Has the server answered (408) or closed this connection?"""
        s.setblocking(False)
        try:
            return s.recv(4096) is not None  # data (the 408) or b"" (closed)
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            s.setblocking(True)

    def _run(self) -> None:
        while not self._stop.wait(5.0):
            for i, s in enumerate(self.socks):
                try:
                    if self._cut(s):
                        raise ConnectionResetError
                    s.sendall(b"X-a: b\r\n")
                except OSError:
                    s.close()
                    try:
                        self.socks[i] = self._open()
                        self.reopened += 1
                    except OSError:
                        pass

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        for s in self.socks:
            s.close()


def qtk_pull(url: str, dest: Path, connections: int = 16) -> subprocess.Popen:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(dest / "home"), "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([PY, "-m", "qtk", "pull", BIG, "--cache-dir", str(dest / "cache"), "--connections",
                             str(connections), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def hf_download(url: str, dest: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(dest / "home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    return subprocess.Popen([HF, "download", BIG, "--local-dir", str(dest / "local")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while chunk := fh.read(8 * 2**20):
            h.update(chunk)
    return h.hexdigest()


def check_result(proc: subprocess.Popen, dest: Path, digests: dict[str, str]) -> bool:
    out, err = proc.communicate()
    if proc.returncode != 0:
        print(f"  client failed ({proc.returncode}): {err[-500:]}")
        return False
    base = Path(json.loads(out)["path"]) if (dest / "cache").exists() else dest / "local"
    return all(sha256_file(base / name) == want for name, want in digests.items())


def run_clients(url: str, work: Path, digests: dict[str, str], pulls: int, hfs: int) -> tuple[float, int, bool]:
    """(wall seconds, bytes delivered, all byte-identical)."""
    procs = []
    t0 = time.perf_counter()
    for i in range(pulls):
        procs.append((qtk_pull(url, work / f"q{i}"), work / f"q{i}"))
    for i in range(hfs):
        procs.append((hf_download(url, work / f"h{i}"), work / f"h{i}"))
    for p, _ in procs:
        p.wait()
    wall = time.perf_counter() - t0
    ok = all(check_result(p, d, digests) for p, d in procs)
    total = (pulls + hfs) * sum((work.parent / "store" / BIG / n).stat().st_size for n in digests)
    for _, d in procs:
        shutil.rmtree(d, ignore_errors=True)
    return wall, total, ok


def first_resolve_s(url: str, path: str) -> float:
    u = urlsplit(url)
    t0 = time.perf_counter()
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("HEAD", path)
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
    return time.perf_counter() - t0


def many_latency_ms(url: str, names: list[str], n: int = 1000) -> list[float]:
    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    out = []
    for rel in random.Random(0).sample(names, min(n, len(names))):
        t0 = time.perf_counter()
        c.request("GET", f"/{MANY}/resolve/main/{rel}")
        r = c.getresponse()
        body = r.read()
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status == 200 and body.startswith(b'{"i": '), (r.status, body[:50])
    return out


def small_latency_ms(port: int, n: int = 200) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("GET", f"/{BIG}/resolve/main/config.json")
        r = c.getresponse()
        r.read()
        c.close()
        assert r.status == 200, r.status
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _p99(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.99) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--pulls", type=int, default=8)
    ap.add_argument("--hf", type=int, default=2)
    ap.add_argument("--slowloris", type=int, default=500)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--sparse-gib", type=int, default=20, help="size of the sparse repo in (c) (the issue's 20 GB store)")
    ap.add_argument("--attack-s", type=float, default=30.0, help="how long the slowloris attack lasts at least")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-serve-"))
    store, idx = work / "store", work / "index"
    print(f"work dir {work}; building the store ({args.size_mib} MiB repo, {args.files} small files)...", flush=True)
    digests = make_large(store, args.size_mib)
    names = make_many(store, args.files)
    sparse = make_sparse(store, args.sparse_gib) if args.sparse_gib else 0
    size = sum((store / BIG / n).stat().st_size for n in digests)
    try:
        # (c) cold store: the server hashes everything before it answers; then the persistent index
        probe = f"/{SPARSE}/resolve/main/model.safetensors" if sparse else f"/{BIG}/resolve/main/config.json"
        srv = Server(store, work / "cold-index")
        cold_ready, cold_first = srv.ready_s, first_resolve_s(srv.url, probe)
        srv.close()
        shutil.rmtree(work / "cold-index", ignore_errors=True)
        Server(store, idx).close()  # build the index once
        srv = Server(store, idx)  # restart: nothing to hash
        warm_ready, warm_first = srv.ready_s, first_resolve_s(srv.url, probe)
        lat = many_latency_ms(srv.url, names)
        print(f"(c) store of {(size + sparse) / 1e9:.1f} GB ({sparse / 1e9:.1f} GB sparse) + {len(names)} small files. "
              f"Cold (no index): ready after "
              f"{cold_ready:.2f} s, first resolve {cold_first * 1000:.1f} ms. Restart with the index: ready after "
              f"{warm_ready:.2f} s ({cold_ready / warm_ready:.1f}x sooner), first resolve {warm_first * 1000:.1f} ms")
        print(f"    {len(lat)} GETs over {len(names)} files (one keep-alive connection): median "
              f"{statistics.median(lat):.2f} ms, p99 {sorted(lat)[int(len(lat) * 0.99) - 1]:.2f} ms, "
              f"max {max(lat):.2f} ms")

        # (a) slowloris vs pulls and small requests, anchored on the same without attack
        base_small = small_latency_ms(srv.port)
        base = [run_clients(srv.url, work / "a0", digests, 1, 0) for _ in range(3)]
        attack = Slowloris(srv.port, args.slowloris).start()
        time.sleep(1.0)
        threads_under_attack, t0, hit = srv.threads(), time.perf_counter(), []
        while time.perf_counter() - t0 < args.attack_s or len(hit) < 3:  # outlast the 20 s header timeout
            hit.append(run_clients(srv.url, work / "a1", digests, 1, 0))
        att_small = small_latency_ms(srv.port)
        attack.stop()
        base += [run_clients(srv.url, work / "a0", digests, 1, 0) for _ in range(3)]  # anchor before and after
        m0, m1 = statistics.median(w for w, _, _ in base), statistics.median(w for w, _, _ in hit)
        ok = all(o for _, _, o in base + hit)
        print(f"(a) qtk pull of {size / 1e6:.0f} MB, median: alone {m0:.2f} s ({size / m0 / 1e6:.0f} MB/s, "
              f"{len(base)} runs); beside {args.slowloris} slowloris connections {m1:.2f} s ({size / m1 / 1e6:.0f} MB/s, "
              f"{len(hit)} runs over {time.perf_counter() - t0:.0f} s) = {m0 / m1:.2f}x the anchor's speed; "
              f"byte-identical: {ok}")
        print(f"    small GET on a new connection, median/p99: alone {statistics.median(base_small):.1f}/"
              f"{_p99(base_small):.1f} ms, under attack {statistics.median(att_small):.1f}/{_p99(att_small):.1f} ms; "
              f"server threads under attack {threads_under_attack}; attack connections the server cut (and the "
              f"attacker reopened): {attack.reopened}")
        total0, wall0 = size, m0

        # (b) load
        wall, total, ok = run_clients(srv.url, work / "b", digests, args.pulls, args.hf)
        print(f"(b) {args.pulls} x qtk pull (16 connections each) + {args.hf} x hf download, {size / 1e6:.0f} MB "
              f"each: {wall:.1f} s, aggregate {total / wall / 1e6:.0f} MB/s ({total / wall / (total0 / wall0):.2f}x one "
              f"pull alone); all byte-identical: {ok}; server peak RSS {srv.peak_rss_mb():.0f} MB, "
              f"threads {srv.threads()}")
        print(f"    server at exit: {srv.close()}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
