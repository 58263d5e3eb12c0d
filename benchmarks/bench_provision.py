"""qtk provision's cost over doing the same steps by hand, and the cost of a re-run that has nothing to do.

    python benchmarks/bench_provision.py [--layers 4] [--json out.json]

Real SmolLM2-135M-Instruct weights (first --layers decoder layers, BF16) served by a local Hub mirror.
Anchor, measured in the same run: the library calls a script would make — qtk.hub pull, qtk.quantize
(GPTQ g64 and NF4) and qtk.verify of each against the source — with the same options, before and after
(the better counts). Between them, `qtk provision` of a manifest with the same recipes on a fresh cache and store (first run), and once
more (second run: every step skipped). Backends are imported before either is timed.
Ratios: first run / anchor (the orchestration's overhead: hashing, locks, publish, records) and
second run / first run.

    python benchmarks/bench_provision.py --ray [--layers 4] [--repeat 2] [--json out.json]

The Ray executor's overhead on one node: the same manifest provisioned into fresh stores with
``--executor local`` (the anchor) and ``--executor ray`` on a local Ray (``ray.init(num_cpus=cores)``
started once, its start-up timed apart), alternating, best of --repeat each; the HF cache is filled
before both, so neither pays the pull. Ratio: ray / local (issue 15's target: <= 1.10x). The first Ray
run also starts its worker processes (and their imports). ``--ray-task-cpus C`` with ``--ray-cpus C``
(C = all cores) runs one task at a time on all cores, the local executor's schedule and threads: the
overhead alone; ``--ray-cpus 1`` one task at a time on one core (Ray's default task size); the default
(all cores, tasks of 1) runs the two recipes at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

QUANT = {"samples": 16, "seq_len": 128, "group_size": 64, "calibration": "chat"}
VERIFY = {"text": "prose-heldout", "ctx": 256, "max_tokens": 1024, "smoke": False}


def manifest(path: Path) -> Path:
    q = "\n".join(f"{k} = {json.dumps(v)}" for k, v in QUANT.items())
    v = "\n".join(f"{k} = {json.dumps(v)}" for k, v in VERIFY.items()).replace("false", "false")
    path.write_text(f'store = "store"\n[defaults]\ndevice = "cpu"\n[defaults.quantize]\n{q}\n[defaults.verify]\n{v}\n'
                    '[[models]]\nrepo = "acme/smol"\nname = "smol"\n[[models.recipes]]\nmethod = "gptq"\n'
                    '[[models.recipes]]\nmethod = "nf4"\n')
    return path


def serve_upstream(layers: int, prefix: str):
    """SmolLM2 cut to ``layers`` layers as ``acme/smol`` on a local Hub mirror (HF_ENDPOINT set); returns
    (work dir, server)."""
    from hubtest import start_server

    from qtk.embedded import build_bf16_checkpoint

    cache = Path(os.environ.get("QTK_TEST_CACHE", ROOT / ".qtk-test-cache"))
    full = build_bf16_checkpoint(cache / "smollm2-135m-bf16")
    src = build_bf16_checkpoint(cache / f"smollm2-135m-bf16-{layers}layers", num_layers=layers, base=full)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.copytree(src, work / "upstream" / "acme" / "smol")
    srv = start_server(work / "upstream")
    os.environ.update(HF_ENDPOINT=srv.url, HF_HUB_DISABLE_TELEMETRY="1")
    return work, srv


def ray_overhead(args) -> None:
    import bitsandbytes  # noqa: F401  - imports paid before timing
    import gptqmodel  # noqa: F401
    import ray
    import torch  # noqa: F401

    from qtk.hub.download import plan_pull, pull
    from qtk.provision import ProvisionOptions, load_manifest, provision

    work, srv = serve_upstream(args.layers, "qtk-bench-provision-ray-")
    os.environ["HF_HOME"] = str(work / "hf")
    times: dict[str, list[float]] = {"local": [], "ray": []}
    try:
        pull(plan_pull("acme/smol", include=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]))
        t0 = time.monotonic()
        ray.init(num_cpus=args.ray_cpus or os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        ray_start = time.monotonic() - t0
        for i in range(args.repeat):
            for executor in ("local", "ray"):
                d = work / f"{executor}-{i}"
                d.mkdir()
                m = load_manifest(manifest(d / "m.toml"))
                t0 = time.monotonic()
                s = provision(m, ProvisionOptions(executor=executor, ray_task_cpus=args.ray_task_cpus
                                                  if executor == "ray" else 1))
                times[executor].append(time.monotonic() - t0)
                assert s.exit_code == 0, s.to_dict()
                assert all(r.steps["quantize"] == "done" for r in s.rows), [r.steps for r in s.rows]
    finally:
        ray.shutdown()
        srv.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    local, remote = min(times["local"]), min(times["ray"])
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
              "layers": args.layers, "ray_cpus": args.ray_cpus or os.cpu_count(),
              "ray_task_cpus": args.ray_task_cpus, "ray_init_s": round(ray_start, 2),
              "local_s": [round(t, 2) for t in times["local"]], "ray_s": [round(t, 2) for t in times["ray"]],
              "ray_over_local": round(remote / local, 3)}
    print(f"local Ray start (once, not in the ratio): {ray_start:.1f} s")
    print(f"--executor local: {local:.1f} s (best of {', '.join(f'{t:.1f}' for t in times['local'])})")
    print(f"--executor ray:   {remote:.1f} s (best of {', '.join(f'{t:.1f}' for t in times['ray'])}) "
          f"= {remote / local:.3f}x local")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--ray", action="store_true", help="measure the Ray executor's overhead vs local instead")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ray-cpus", type=int, default=0,
                    help="CPU slots of the local Ray (default: all cores; 1 runs the tasks one at a time, like local)")
    ap.add_argument("--ray-task-cpus", type=int, default=1, help="CPU cores each Ray task asks for (qtk's --ray-task-cpus)")
    args = ap.parse_args()
    if args.ray:
        ray_overhead(args)
        return

    import bitsandbytes  # noqa: F401  - imports paid before timing
    import gptqmodel  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from qtk.hub.download import plan_pull, pull
    from qtk.provision import ProvisionOptions, load_manifest, provision
    from qtk.quantize.base import QuantizeOptions
    from qtk.quantize.run import quantize
    from qtk.verify.run import VerifyOptions, verify

    work, srv = serve_upstream(args.layers, "qtk-bench-provision-")
    try:
        def run_anchor(tag: str) -> float:  # the same steps as library calls
            os.environ["HF_HOME"] = str(work / f"hf-anchor-{tag}")
            t0 = time.monotonic()
            p = pull(plan_pull("acme/smol", include=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])).plan
            outs = []
            for method in ("gptq", "nf4"):
                o = QuantizeOptions(method=method, device="cpu", **QUANT)
                outs.append(quantize("acme/smol", work / f"anchor-{tag}-{method}", o, revision=p.commit).out)
            for o in outs:
                verify(str(p.root), [str(o)], VerifyOptions(device="cpu", **VERIFY))
            return time.monotonic() - t0

        anchors = [run_anchor("before")]
        os.environ["HF_HOME"] = str(work / "hf-provision")
        m = load_manifest(manifest(work / "m.toml"))
        t0 = time.monotonic()
        s1 = provision(m, ProvisionOptions())
        first = time.monotonic() - t0
        assert s1.exit_code == 0, s1.to_dict()
        t0 = time.monotonic()
        s2 = provision(m, ProvisionOptions())
        second = time.monotonic() - t0
        assert s2.exit_code == 0 and s2.bytes_downloaded == 0
        anchors.append(run_anchor("after"))  # before and after: first-use costs do not favour either side
        anchor = min(anchors)
    finally:
        srv.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
              "layers": args.layers, "anchor_s": round(anchor, 2), "anchors_s": [round(a, 2) for a in anchors], "provision_first_s": round(first, 2),
              "provision_second_s": round(second, 3), "first_over_anchor": round(first / anchor, 3),
              "second_over_first": round(second / first, 4),
              "steps_first": [{a.repo_id: a.steps} for a in s1.rows]}
    print(f"anchor (pull + 2 x quantize + 2 x verify, library calls): {anchor:.1f} s "
          f"(best of {', '.join(f'{a:.1f}' for a in anchors)}: before and after qtk provision)")
    print(f"qtk provision, first run:  {first:.1f} s  = {first / anchor:.3f}x the anchor")
    print(f"qtk provision, second run: {second:.2f} s  = {second / first:.4f}x the first run (nothing to do)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
