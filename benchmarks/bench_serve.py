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
(d) slow clients: one `qtk pull` of the large repo, 3 runs each: alone; beside --slow (32) paths-info
    POSTs whose bodies trickle in one byte every 2 s (reconnecting when cut); beside --slow clients that
    read a 20 MB file at 64 KiB/s each (again when done). The attackers come from other loopback
    addresses (127.0.2.x, 127.0.3.x), one each, as from other hosts. Server CPU seconds per phase.
    `--server-src DIR` runs the server from another checkout (a git worktree of an older commit) for a
    before/after comparison; `--parts d` runs only this part.

Every client here comes from 127.0.0.1 (attackers from other 127.x addresses): the server runs with
`--max-per-client 256` (--max-per-client), as (b)'s 144 connections from one address stand for many hosts.

The issue's full scale is 64 pull clients x 16 connections + 8 `hf download` on 1 GiB, a 20 GB store and a
20,000-file repo; the defaults here are sized for a 2-core machine in a few minutes (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
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
    max_per_client = 256  # (b) runs 144 connections from one loopback address; real clients are on many hosts

    def __init__(self, store: Path, index_dir: Path, src: Path = ROOT) -> None:
        t0 = time.perf_counter()
        extra = []
        if "--max-per-client" in (src / "qtk" / "cli" / "hub.py").read_text():  # not in a checkout from before it
            extra = ["--max-per-client", str(self.max_per_client)]
        self.proc = subprocess.Popen([PY, "-m", "qtk", "serve", str(store), "--port", "0", "--index-dir", str(index_dir),
                                      *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=src,
                                     env={**os.environ, "PYTHONPATH": str(src)})
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

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server process has used so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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

    def _open(self, i: int) -> socket.socket:
        # from 32 loopback addresses (127.0.1.1-32): as many hosts, each under the server's per-client bound
        s = socket.create_connection(("127.0.0.1", self.port), source_address=(f"127.0.1.{1 + i % 32}", 0))
        s.sendall(b"GET /bench/large/resolve/main/config.json HTTP/1.1\r\nHost: x\r\n")
        return s

    def start(self) -> "Slowloris":
        self.socks = [self._open(i) for i in range(self.n)]
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
                        self.socks[i] = self._open(i)
                        self.reopened += 1
                    except OSError:
                        pass

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        for s in self.socks:
            s.close()


def _cut(s: socket.socket) -> bool:
    """Has the server answered (a 408) or closed this connection?"""
    s.setblocking(False)
    try:
        return s.recv(65536) is not None
    except BlockingIOError:
        return False
    except OSError:
        return True


class SlowSenders:
    """``n`` paths-info POSTs announcing a 1,000-byte body and sending one byte of it every ``every`` s
    (the issue's probe), each from its own address (127.0.2.x); a connection the server cuts is reopened,
    and sends its head and a first byte again at once."""

    HEAD = (b"POST /api/models/bench/large/paths-info/main HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\npaths=")

    def __init__(self, port: int, n: int, every: float = 2.0) -> None:
        self.port, self.every, self.reopened = port, every, 0
        self.socks = [self._open(i) for i in range(n)]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _open(self, i: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), source_address=(f"127.0.2.{1 + i}", 0))
        s.sendall(self.HEAD)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for i, s in enumerate(self.socks):
                try:
                    if _cut(s):
                        raise ConnectionResetError
                    s.send(b"a")
                except OSError:
                    s.close()
                    with contextlib.suppress(OSError):
                        self.socks[i] = self._open(i)
                        self.reopened += 1

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        for s in self.socks:
            s.close()


class SlowReaders:
    """``n`` clients (127.0.3.x) each GETting a file and reading it at ``rate`` bytes/s, again when done."""

    def __init__(self, port: int, n: int, path: str, rate: int = 64 * 1024) -> None:
        self.port, self.path, self.rate = port, path, rate
        self.bytes, self.completed, self.cut, self.refused = 0, 0, 0, 0
        self.socks = [self._open(i) for i in range(n)]
        self.fresh = [True] * n  # no byte of the answer read yet
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _open(self, i: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
        s.bind((f"127.0.3.{1 + i}", 0))
        s.connect(("127.0.0.1", self.port))
        s.sendall(f"GET {self.path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        s.setblocking(False)
        return s

    def _run(self) -> None:
        tick = 0.1
        while not self._stop.wait(tick):
            for i, s in enumerate(self.socks):
                try:
                    data = s.recv(int(self.rate * tick))
                except BlockingIOError:
                    continue
                except OSError:
                    data, self.cut = b"", self.cut + 1
                if data:
                    if self.fresh[i] and not data.startswith(b"HTTP/1.1 200"):
                        self.refused += 1  # not the file (a 503, a 404): counted, never mistaken for reading
                    self.fresh[i] = False
                    self.bytes += len(data)
                    continue
                self.completed += 1  # closed: the whole file was read (or the server cut us): again
                s.close()
                with contextlib.suppress(OSError):
                    self.socks[i] = self._open(i)
                    self.fresh[i] = True

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


def run_clients(url: str, work: Path, digests: dict[str, str], pulls: int, hfs: int,
                timeout: float | None = None) -> tuple[float, int, bool]:
    """(wall seconds, bytes delivered, all byte-identical); clients still running after ``timeout`` s are
    killed and the wall time is reported as infinite."""
    procs = []
    t0 = time.perf_counter()
    for i in range(pulls):
        procs.append((qtk_pull(url, work / f"q{i}"), work / f"q{i}"))
    for i in range(hfs):
        procs.append((hf_download(url, work / f"h{i}"), work / f"h{i}"))
    for p, _ in procs:
        try:
            p.wait(timeout=None if timeout is None else max(0.1, timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
                q.wait()
            for _, d in procs:
                shutil.rmtree(d, ignore_errors=True)
            return float("inf"), 0, False
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


SLOW_REPO = "bench/slowfile"
SLOW_FILE = f"{SLOW_REPO}/resolve/main/blob.bin"


def make_slow_file(root: Path, mb: int = 20) -> None:
    p = root / SLOW_REPO / "blob.bin"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(os.urandom(mb * 10**6))


def part_c(args, work: Path, store: Path, idx: Path, names: list[str], size: int, sparse: int) -> Server:
    """(c) cold store vs a restart with the persistent index; returns the restarted server."""
    probe = f"/{SPARSE}/resolve/main/model.safetensors" if sparse else f"/{BIG}/resolve/main/config.json"
    srv = Server(store, work / "cold-index", args.server_src)
    cold_ready, cold_first = srv.ready_s, first_resolve_s(srv.url, probe)
    srv.close()
    shutil.rmtree(work / "cold-index", ignore_errors=True)
    Server(store, idx, args.server_src).close()  # build the index once
    srv = Server(store, idx, args.server_src)  # restart: nothing to hash
    warm_ready, warm_first = srv.ready_s, first_resolve_s(srv.url, probe)
    lat = many_latency_ms(srv.url, names)
    print(f"(c) store of {(size + sparse) / 1e9:.1f} GB ({sparse / 1e9:.1f} GB sparse) + {len(names)} small files. "
          f"Cold (no index): ready after "
          f"{cold_ready:.2f} s, first resolve {cold_first * 1000:.1f} ms. Restart with the index: ready after "
          f"{warm_ready:.2f} s ({cold_ready / warm_ready:.1f}x sooner), first resolve {warm_first * 1000:.1f} ms")
    print(f"    {len(lat)} GETs over {len(names)} files (one keep-alive connection): median "
          f"{statistics.median(lat):.2f} ms, p99 {sorted(lat)[int(len(lat) * 0.99) - 1]:.2f} ms, "
          f"max {max(lat):.2f} ms")
    return srv


def part_a(args, srv: Server, work: Path, digests: dict[str, str], size: int) -> float:
    """(a) slowloris vs pulls and small requests, anchored on the same without attack; the anchor's median."""
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
    return m0


def part_b(args, srv: Server, work: Path, digests: dict[str, str], size: int, alone_s: float | None) -> None:
    if alone_s is None:
        alone_s = run_clients(srv.url, work / "b0", digests, 1, 0)[0]
    wall, total, ok = run_clients(srv.url, work / "b", digests, args.pulls, args.hf)
    print(f"(b) {args.pulls} x qtk pull (16 connections each) + {args.hf} x hf download, {size / 1e6:.0f} MB "
          f"each: {wall:.1f} s, aggregate {total / wall / 1e6:.0f} MB/s ({total / wall / (size / alone_s):.2f}x one "
          f"pull alone); all byte-identical: {ok}; server peak RSS {srv.peak_rss_mb():.0f} MB, "
          f"threads {srv.threads()}")


def _pulls(srv: Server, work: Path, digests: dict[str, str], runs: int, timeout: float,
           at_least_s: float = 0.0) -> tuple[list[float], bool, float]:
    """(wall times, all byte-identical, server CPU seconds) of ``runs`` pulls one after the other (more,
    until ``at_least_s`` seconds have passed)."""
    cpu0, t0, results = srv.cpu_s(), time.perf_counter(), []
    while len(results) < runs or time.perf_counter() - t0 < at_least_s:
        results.append(run_clients(srv.url, work, digests, 1, 0, timeout=timeout))
    return [w for w, _, _ in results], all(ok for _, _, ok in results), srv.cpu_s() - cpu0


def part_d(args, srv: Server, work: Path, digests: dict[str, str], size: int) -> None:
    """(d) a normal pull alone, beside slow body senders, beside slow readers (the issue's probes)."""
    n, runs, limit = args.slow, 3, args.slow_timeout
    load0 = os.getloadavg()[0]
    alone, ok0, cpu_alone = _pulls(srv, work / "d0", digests, runs, limit)
    senders = SlowSenders(srv.port, n)
    time.sleep(2.5)  # every sender has its head in and a first body byte
    threads = srv.threads()
    # pull for longer than the server's 20 s request deadline: senders are cut (408) and come back
    with_senders, ok1, cpu_senders = _pulls(srv, work / "d1", digests, runs, limit, at_least_s=25.0)
    senders.stop()
    readers = SlowReaders(srv.port, n, f"/{SLOW_FILE}")
    time.sleep(2.5)
    with_readers, ok2, cpu_readers = _pulls(srv, work / "d2", digests, runs, limit)
    read_rate = readers.bytes / max(1e-9, 2.5 + sum(min(w, limit) for w in with_readers)) / n
    readers.stop()
    m0, m1, m2 = (statistics.median(x) for x in (alone, with_senders, with_readers))
    fmt = lambda xs: ", ".join("timeout" if x == float("inf") else f"{x:.2f}" for x in xs)  # noqa: E731
    print(f"(d) qtk pull of {size / 1e6:.0f} MB (server from {args.server_src}), wall s per run:")
    print(f"    alone: {fmt(alone)} (median {m0:.2f} s; server CPU {cpu_alone:.1f} s)")
    print(f"    beside {n} slow body senders (1 byte / 2 s each): {fmt(with_senders)} (median {m1:.2f} s = "
          f"{m1 / m0:.2f}x alone; server CPU {cpu_senders:.1f} s; senders cut and reopened: {senders.reopened}; "
          f"server threads {threads})")
    print(f"    beside {n} slow readers of a 20 MB file (64 KiB/s each; measured {read_rate / 1024:.0f} KiB/s): "
          f"{fmt(with_readers)} (median {m2:.2f} s = {m2 / m0:.2f}x alone; server CPU {cpu_readers:.1f} s; "
          f"readers cut: {readers.cut}, refused: {readers.refused})")
    print(f"    byte-identical: {ok0 and ok1 and ok2}; pulls killed after {limit:.0f} s count as timeouts; "
          f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--pulls", type=int, default=8)
    ap.add_argument("--hf", type=int, default=2)
    ap.add_argument("--slowloris", type=int, default=500)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--sparse-gib", type=int, default=20, help="size of the sparse repo in (c) (the issue's 20 GB store)")
    ap.add_argument("--attack-s", type=float, default=30.0, help="how long the slowloris attack lasts at least")
    ap.add_argument("--slow", type=int, default=32, help="slow body senders / slow readers in (d)")
    ap.add_argument("--slow-timeout", type=float, default=120.0, help="a pull in (d) still running after this is killed")
    ap.add_argument("--parts", default="c,a,b,d", help="which parts to run (comma-separated: c,a,b,d)")
    ap.add_argument("--server-src", type=Path, default=ROOT, help="the checkout the server runs from")
    ap.add_argument("--max-per-client", type=int, default=Server.max_per_client,
                    help="the server's --max-per-client (every client here shares one address)")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    Server.max_per_client = args.max_per_client
    parts = set(args.parts.split(","))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-serve-"))
    store, idx = work / "store", work / "index"
    files = args.files if "c" in parts else 0
    print(f"work dir {work}; building the store ({args.size_mib} MiB repo, {files} small files)...", flush=True)
    digests = make_large(store, args.size_mib)
    names = make_many(store, files)
    sparse = make_sparse(store, args.sparse_gib) if args.sparse_gib and "c" in parts else 0
    if "d" in parts:
        make_slow_file(store)
    size = sum((store / BIG / n).stat().st_size for n in digests)
    try:
        srv = part_c(args, work, store, idx, names, size, sparse) if "c" in parts else Server(store, idx, args.server_src)
        alone = part_a(args, srv, work, digests, size) if "a" in parts else None
        if "b" in parts:
            part_b(args, srv, work, digests, size, alone)
        if "d" in parts:
            part_d(args, srv, work, digests, size)
        print(f"    server at exit: {srv.close()}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
