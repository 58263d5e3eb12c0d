"""quantize's output on disks that crash or are shared: the output is sealed (every file fsynced, then its
provenance written durably, last) before it is put in place; --overwrite swaps it in so that a kill at any
step leaves the old or the new output, and the next run settles what the killed one left; a temporary of a
run on another host is never removed by its pid. Uses a toy method (copies the weights): fast, no backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qtk import _fs, errors
from qtk import methods as registry
from qtk.quantize.base import Method, QuantizeOptions, RunContext

pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent


class Marked(Method):
    """Copies the weights and writes a config naming the run (its --seed): tells the old output from the new."""

    name = "toy-marked"
    description = "toy: copies the weights, config names the run"
    bits = (2,)
    needs_calibration = False
    uses_group_size = False
    distribution = "qtk"
    modules = ()
    extra = "test"
    devices = ("cpu",)
    after_run = None  # a child process's hook: runs when the method is done (tests kill there)

    def expected_config(self, options: QuantizeOptions) -> dict:
        return {"quant_method": "toy", "bits": options.bits}

    def run(self, ctx: RunContext) -> None:
        for f in ctx.model.weight_files:
            (ctx.out / f.name).write_bytes(f.read_bytes())
        (ctx.out / "sub").mkdir()
        (ctx.out / "sub" / "extra.bin").write_bytes(b"x" * 100)
        cfg = dict(ctx.model.config, quantization_config=self.expected_config(ctx.options), run=ctx.options.seed)
        (ctx.out / "config.json").write_text(json.dumps(cfg))
        if Marked.after_run is not None:
            Marked.after_run()


class Blocking(Marked):
    name = "toy-blocking"

    def run(self, ctx: RunContext) -> None:
        super().run(ctx)
        Path(os.environ["QTK_TEST_STARTED"]).write_text("started")
        time.sleep(600)


SPECS = [registry.MethodSpec(m.name, f"test_quantize_output:{m.__name__}", "toy", reads=("bits",),
                             memory_model="quantized_load", weights="nf4", summary=m.description)
         for m in (Marked, Blocking)]


@pytest.fixture(autouse=True)
def toys():
    for spec in SPECS:
        registry.register(spec)
    yield
    for spec in SPECS:
        registry.unregister(spec.name)


@pytest.fixture
def tiny(hub_root) -> Path:
    src = hub_root / "acme" / "tiny-llama"
    if not src.is_dir():
        pytest.skip("tiny-llama fixture needs numpy/safetensors")
    return src


def _quantize(src: Path, out: Path, run: int, **kw):
    from qtk.quantize.run import quantize

    return quantize(str(src), out, QuantizeOptions(method="toy-marked", bits=2, seed=run), **kw)


def _complete_run(out: Path, src: Path) -> int | None:
    """The run that wrote ``out`` if it is a whole output (provenance present and agreeing with the files),
    else None."""
    try:
        prov = json.loads((out / "qtk_provenance.json").read_text())
        cfg = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return None
    whole = ((out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
             and (out / "sub" / "extra.bin").read_bytes() == b"x" * 100)
    return cfg["run"] if whole and prov["options"]["seed"] == cfg["run"] else None


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --------------------------------------------------------------------------------- sealed before trusted


def test_provenance_is_written_last_after_every_byte_is_fsynced(tiny, tmp_path, monkeypatch):
    """The order of fsyncs and renames, recorded at the system-call wrappers: every file and directory of the
    build is fsynced before the provenance; the provenance's own file before its rename; its directory
    entry before the build is put in place; the parent directory after (before: no fsync at all)."""
    out = tmp_path / "out"
    _quantize(tiny, out, 1)
    events: list[tuple] = []
    real_fsync, real_replace, real_rename, real_rename2 = os.fsync, os.replace, os.rename, _fs._rename2

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b, **k: (events.append(("rename", str(a), str(b))),
                                                          real_replace(a, b, **k))[1])
    monkeypatch.setattr(os, "rename", lambda a, b, **k: (events.append(("rename", str(a), str(b))),
                                                         real_rename(a, b, **k))[1])
    monkeypatch.setattr(_fs, "_rename2", lambda a, b, flags: (events.append(("rename", str(a), str(b))),
                                                              real_rename2(a, b, flags))[1])
    _quantize(tiny, out, 2, overwrite=True)
    assert _complete_run(out, tiny) == 2
    (tmp,) = {Path(e[1]).parent for e in events if e[0] == "rename" and e[2].endswith("/qtk_provenance.json")}
    index = {e: i for i, e in reversed(list(enumerate(events)))}  # first occurrence of each event
    prov_rename = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(tmp / "qtk_provenance.json"))
    prov_fsync = next(i for i, e in enumerate(events) if e[0] == "fsync" and e[1].startswith(str(tmp / ".qtk_provenance")))
    for f in sorted(out.rglob("*")):
        rel = f.relative_to(out)
        if rel.name == "qtk_provenance.json":
            continue
        assert index.get(("fsync", str(tmp / rel)), 10 ** 9) < prov_fsync, f"{rel} not fsynced before the provenance"
    assert prov_fsync < prov_rename
    tmp_dir_syncs = [i for i, e in enumerate(events) if e == ("fsync", str(tmp))]
    assert tmp_dir_syncs[0] < prov_fsync and any(i > prov_rename for i in tmp_dir_syncs)
    install = next(i for i, e in enumerate(events) if e[0] == "rename" and str(out) in (e[1], e[2])
                   and i > prov_rename)
    assert max(tmp_dir_syncs) < install
    assert any(e == ("fsync", str(out.parent)) for e in events[install:])


# ----------------------------------------------------------------------- --overwrite killed at every step

KILLER = textwrap.dedent("""
    import os, shutil, signal, sys
    sys.path.insert(0, sys.argv[1])
    src, out, step, mode = sys.argv[2], os.path.abspath(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    import test_quantize_output as T
    from qtk import methods as registry
    for spec in T.SPECS:
        registry.register(spec)
    try:
        from qtk import _fs
    except ImportError:  # qtk before _fs: only the renames can be counted
        _fs = None
    if _fs is not None and mode == "fallback":
        _fs.exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE (NFS)
    armed, done = [False], [0]

    def in_parent(p):
        return os.path.dirname(os.path.abspath(p)) == os.path.dirname(out) and not str(p).endswith(".qtk-work")

    def counted(fn, mid_way=False):
        def step_fn(a, *rest, **kw):
            if not (armed[0] and in_parent(rest[0] if rest and not mid_way else a)):
                return fn(a, *rest, **kw)
            done[0] += 1
            if mid_way and done[0] == step:  # killed while removing: one file gone, the rest left
                for root, _dirs, files in os.walk(a):
                    if files:
                        os.unlink(os.path.join(root, files[0]))
                        break
                os.kill(os.getpid(), signal.SIGKILL)
            result = fn(a, *rest, **kw)
            if done[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return step_fn

    os.rename, os.replace, shutil.rmtree = counted(os.rename), counted(os.replace), counted(shutil.rmtree, True)
    if _fs is not None:
        _fs.exchange = counted(_fs.exchange)
    T.Marked.after_run = lambda: armed.__setitem__(0, True)
    from qtk.quantize.run import quantize
    from qtk.quantize.base import QuantizeOptions
    quantize(src, out, QuantizeOptions(method="toy-marked", bits=2, seed=2), overwrite=True)
    print("finished without being killed")
""")


def _exchange_works(d: Path) -> bool:
    a, b = d / "xa", d / "xb"
    a.mkdir()
    b.mkdir()
    try:
        return _fs.exchange(a, b)
    finally:
        a.rmdir()
        b.rmdir()


@pytest.mark.parametrize("mode", ["exchange", "fallback"])
@pytest.mark.parametrize("step", [1, 2, 3])
def test_overwrite_killed_between_its_steps_leaves_old_or_new_and_the_next_run_settles_it(tiny, tmp_path, mode, step):
    """kill -9 after the k-th step of putting the new output in place (exchange: swap, remove the old;
    without RENAME_EXCHANGE: old aside, new in, remove the old; a removal is killed half way). `out` is the
    old or the new output at every moment (where directories cannot be swapped, the old one is whole at its
    aside name between the two renames); the next run restores or removes what is left and finds a whole
    output (before: killed between the two renames, the output was gone for good)."""
    if mode == "exchange" and not _exchange_works(tmp_path):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    out = tmp_path / "out"
    _quantize(tiny, out, 1)
    r = subprocess.run([sys.executable, "-c", KILLER, str(HERE), str(tiny), str(out), str(step), mode],
                       capture_output=True, text=True, timeout=300)
    killed = r.returncode == -signal.SIGKILL
    assert killed or (r.returncode == 0 and "finished" in r.stdout), r.stderr[-3000:]
    if mode == "exchange" or not killed:
        assert _complete_run(out, tiny) in (1, 2)  # never none
    elif not out.exists():  # between the two renames: the old output is whole, aside
        assert [_complete_run(tmp_path / n, tiny) for n in _leftovers(out) if "-old-" in n] == [1]
    with pytest.raises(errors.OutputExistsError):
        _quantize(tiny, out, 3)  # the next run: settles what the killed one left, then finds the output
    assert _complete_run(out, tiny) in (1, 2)
    assert _leftovers(out) == []


# ------------------------------------------------------------------- two hosts writing beside one output

def test_a_second_host_never_removes_a_live_runs_temporary(tiny, tmp_path, monkeypatch):
    """node-a's run is writing `out` (its temporary beside it) when its process vanishes from this machine's
    view (killed here: a run on a real second host is never visible). node-b quantizes the same output on
    the shared disk: it must not remove node-a's temporary (before: a pid not alive here meant "dead"); it
    says so, and finishes its own output. node-a itself (same host, boot, PID namespace) settles it."""
    out = tmp_path / "out"
    started = tmp_path / "started"
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_quantize_output as T; "
            "from qtk import methods as registry; [registry.register(s) for s in T.SPECS]; "
            "from qtk.quantize.run import quantize; from qtk.quantize.base import QuantizeOptions; "
            f"quantize({str(tiny)!r}, {str(out)!r}, QuantizeOptions(method='toy-blocking', bits=2, seed=9))")
    a = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "QTK_HOST_ID": "node-a",
                                                            "QTK_TEST_STARTED": str(started)})
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert a.poll() is None and time.monotonic() < deadline, "node-a's run did not start"
            time.sleep(0.05)
    finally:
        a.kill()
        a.wait()
    theirs = [n for n in _leftovers(out)]
    assert theirs and not out.exists()
    monkeypatch.setenv("QTK_HOST_ID", "node-b")
    said: list[str] = []
    _quantize(tiny, out, 1, log=said.append)
    assert _complete_run(out, tiny) == 1
    assert _leftovers(out) == theirs  # node-a's temporary (and its record) untouched
    assert any("node-a" in s and "cannot check" in s for s in said), said
    monkeypatch.setenv("QTK_HOST_ID", "node-a")
    _quantize(tiny, out, 2, overwrite=True)
    assert _complete_run(out, tiny) == 2 and _leftovers(out) == []


def test_a_failed_run_removes_its_temporary_and_record(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom():
        raise RuntimeError("backend exploded")

    monkeypatch.setattr(Marked, "after_run", staticmethod(boom))
    with pytest.raises(RuntimeError):
        _quantize(tiny, out, 1)
    assert not out.exists() and _leftovers(out) == []


def test_legacy_pid_named_temporaries_age_out_and_an_aside_output_comes_back(tiny, tmp_path):
    """Names of qtk before owner records carry only a pid (no host): removed once untouched for a day, never
    because the pid is not alive here; a killed --overwrite's aside copy is restored when no output is there."""
    from qtk.quantize._output import recover

    out = tmp_path / "out"
    _quantize(tiny, out, 1)
    fresh, stale = tmp_path / ".out.qtk-tmp-999999", tmp_path / ".out.qtk-tmp-999998"
    fresh.mkdir()
    stale.mkdir()
    day_ago = time.time() - 25 * 3600
    os.utime(stale, (day_ago, day_ago))
    recover(out)
    assert fresh.exists() and not stale.exists()
    out.rename(tmp_path / ".out.qtk-old-999997")
    os.utime(tmp_path / ".out.qtk-old-999997", (day_ago, day_ago))
    recover(out)
    assert _complete_run(out, tiny) == 1 and _leftovers(out) == [fresh.name]
