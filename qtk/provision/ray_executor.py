"""``qtk provision MANIFEST --executor ray [--address ADDR]``: each artifact's quantize and its verify
(verify -> gate -> publish) as two Ray tasks; the driver plans, pulls, streams events and writes the
summary.

* The driver plans every model (metadata) and pulls each model once into the HF cache, which, like the
  store, should be on storage every node sees (NFS is the common case) at the same path. A task checks
  its model's files against its own node's view of the cache and pulls only what it does not see (a
  node-local cache: once per node, qtk pull's locks make a second task wait and find it there).
* Each (model, recipe) quantize is a Ray task asking for one GPU (``num_gpus=1``) when the manifest's
  device is ``cuda``, or ``auto`` on a cluster with GPUs (the driver needs none), else one CPU slot; its
  verify task asks for the same, is submitted when the quantize task succeeded, and prefers the node
  that wrote the build when it has a free slot (soft node affinity that spills: elsewhere otherwise).
  A task re-plans its model at the driver's pinned commit (metadata only) and runs the local executor's
  code; a quantize task keys the build with its own node's toolchain, and the verify task takes that
  key (the quantize task's inputs) as it is, so a verify that spills to another kind of node (another
  GPU compute capability) still finds the build; its verify key has its own node's toolchain. A task
  runs under the same store locks (the artifact's, the build's, publishing's), with its own lease and
  event file. A task asks for ``--ray-task-cpus``
  cores (1 by default) and torch computes on exactly those (:func:`_use_assigned_cpus`).
* Events reach the driver while tasks run: each task writes its own event file in the store (shared
  storage), which the driver follows and forwards; the summary and exit codes are the local
  executor's. A task whose worker or node dies is retried by Ray (``max_retries``); the retry finds
  what the dead attempt finished under its input-hash key and the published version under its key, so
  nothing is published twice; the dead attempt's build workspace is taken over once its lease expired
  (at once on the same host, after ``QTK_LEASE_TTL`` seconds from another one).
* The driver passes its ``HF_*`` and ``QTK_*`` variables to the tasks, never a token: nodes read theirs
  as every qtk does (``HF_TOKEN`` in their environment, or ``$HF_HOME/token`` on the shared HF_HOME).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import replace

from .. import errors
from .keys import StepInputs
from .lease import host_id
from .run import STAGES, Provisioner, StopRun, error_dict

__all__ = ["run_on_ray", "artifact_task", "RemoteStepError", "MAX_RETRIES", "STAGES"]

MAX_RETRIES = 3  # Ray re-runs a task whose worker process or node died (not a task that raised)
_PASSED = ("HF_", "QTK_", "HUGGINGFACE_", "GPTQMODEL_", "CUDA_")


class RemoteStepError(errors.QtkError):
    """A step failed in a Ray task: the task's own error, with its own exit code."""

    def __init__(self, err: dict) -> None:
        super().__init__(str(err.get("message") or "step failed on a Ray worker"), hint=err.get("hint"))
        self.exit_code = int(err.get("exit_code") or 1)
        self.name = str(err.get("error") or "Error")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "error": self.name}


def _worker_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k.startswith(_PASSED) and "TOKEN" not in k and "SECRET" not in k and "PASSWORD" not in k}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise errors.BackendUnavailableError(
            "--executor ray needs Ray, which is not installed.",
            hint="pip install 'qtk[ray]' on the driver and on every node (the same versions).",
        ) from None
    return ray


def artifact_task(manifest, opts, run_id: str, model_name: str, repo_id: str, commit: str,
                  stage: str = "quantize", before=None) -> dict:
    """One stage of one artifact on a Ray worker, with the local executor's code: ``quantize``, or
    ``verify`` (verify, gate, publish the build the quantize task left under its key; ``before`` is the
    quantize task's result: its row and the inputs its key hashes, which this task uses as they are),
    through Provisioner's public steps. Its failures are recorded, not raised; its events go to its own file in the
    store, which the driver follows. The model's files come from the shared HF cache; what this node
    does not see there (a node-local cache) it pulls itself first (resumable, under qtk pull's locks:
    once per node)."""
    import ray

    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}")
    opts = replace(opts, keep_going=True, executor="local", shard=None, only=())
    prov = Provisioner(manifest, opts)
    prov.summary.run_id = run_id
    spec = next(s for s in manifest.models if s.name == model_name)
    recipe = next(r for r in spec.recipes if spec.artifact_repo(r) == repo_id)
    spec = replace(spec, revision=commit, recipes=(recipe,))  # the driver's commit, whatever main is now
    if before is not None:  # the build's key is the quantize task's, whatever this node would compute
        pinned = StepInputs.from_dict(before.get("quantize_inputs"))
        if pinned is not None:
            prov.pinned[repo_id] = pinned
    with contextlib.suppress(ImportError):  # a node without torch fails below with the usual message
        _use_assigned_cpus(ray)
    prov.store.init()
    prov.store.start_lease()
    row = quantize_inputs = None
    try:
        mp = prov.plan(spec)
        r, row, inputs = mp.artifacts[0]
        quantize_inputs = inputs["quantize_inputs"].to_dict()
        if before is not None and before.get("row") is not None:  # what the quantize task did (this task's
            for step in ("pull", "quantize"):                     # own plan sees the build as done)
                row.steps[step], row.reasons[step] = before["row"].steps[step], before["row"].reasons.get(step)
        if mp.pull_plan.missing:  # a node that does not see the driver's HF cache
            prov.pull(mp)
        prov.run_artifact(mp, r, row, inputs, stages=(stage,))
        error = row.error
    except Exception as exc:  # noqa: BLE001 - planning failed on this node
        error = error_dict(exc)
        prov.emit("plan", "error", model=model_name, artifact=repo_id, error=error)
    finally:
        prov.store.lease.close()
    return {"row": row, "error": error, "quantize_inputs": quantize_inputs, "host": host_id(),
            "node_id": ray.get_runtime_context().get_node_id()}


def _resources(ray, manifest_device: str, driver_device: str, cpus: int = 1) -> dict:
    """One GPU per task when the manifest says cuda, or says auto and the cluster has GPUs (the driver
    itself may have none), and ``cpus`` cores (``--ray-task-cpus``: 1 by default, enough beside a GPU;
    on a CPU-only cluster a task computes with exactly the cores it asked for)."""
    if cpus < 1:
        raise errors.UsageError(f"--ray-task-cpus must be at least 1 (got {cpus}).")
    gpu = manifest_device == "cuda" or (manifest_device == "auto" and (
        driver_device == "cuda" or ray.cluster_resources().get("GPU", 0) > 0))
    return {"num_gpus": 1, "num_cpus": cpus} if gpu else {"num_cpus": cpus}


def _use_assigned_cpus(ray) -> int | None:
    """torch computes on the cores Ray gave this task: Ray sets ``OMP_NUM_THREADS`` when it starts a
    worker process, but a worker is reused by tasks of other sizes. Returns the thread count set (None:
    not in a Ray task, e.g. called on the driver)."""
    try:
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
    except AssertionError:  # Ray's "only available when the process is a worker"
        return None
    if cpus < 1:
        return None
    import torch

    torch.set_num_threads(cpus)
    return cpus


def _near(node_id: str) -> dict:
    """Prefer ``node_id`` (where the build was just written: page cache, a node-local HF cache) when it
    has a free slot; otherwise any node (Ray's soft affinity alone would wait for that node, behind the
    next quantize that took its GPU); a dead node: any node."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=True, _spill_on_unavailable=True)}
    except TypeError:  # a Ray without the spill option: no preference rather than waiting for one node
        return {}


def run_on_ray(prov, plans: list) -> None:
    """Stage 2 of :class:`~qtk.provision.run.Provisioner` on Ray (the driver side; the executor
    :func:`qtk.provision.provision` passes to :meth:`~qtk.provision.run.Provisioner.run`). Ray's own messages
    (a worker died, autoscaler notes) go to stderr: stdout stays the summary (``--json``)."""
    from .._stdio import stdout_to_stderr

    with stdout_to_stderr():
        _run_on_ray(prov, plans)


def _run_on_ray(prov, plans: list) -> None:
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=prov.opts.ray_address, include_dashboard=False, log_to_driver=prov.opts.backend_output,
                 logging_level="ERROR")
    task = ray.remote(artifact_task)
    pending: dict = {}
    env = _worker_env()  # this run's settings (per task: a cluster serves many drivers)
    resources = _resources(ray, prov.m.device, prov.device, prov.opts.ray_task_cpus)
    follow = _EventFollower(prov)
    drain = follow.poll
    args = {}  # repo id -> the task's arguments

    def submit(row, stage: str, t0: float, *, before=None, node_id: str | None = None) -> None:
        place = _near(node_id) if node_id else {}
        ref = task.options(max_retries=MAX_RETRIES, retry_exceptions=False, name=f"qtk {stage} {row.repo_id}",
                           runtime_env={"env_vars": env}, **resources, **place).remote(
            *args[row.repo_id], stage, before)
        pending[ref] = (row, stage, t0)

    try:
        for mp in plans:
            if not prov.pull_or_record(mp):  # once per model, into the shared HF cache
                continue
            for _recipe, row, _inputs in mp.artifacts:
                args[row.repo_id] = (prov.m, prov.opts, prov.summary.run_id, mp.spec.name, row.repo_id,
                                     mp.pull_plan.commit)
                submit(row, "quantize", time.monotonic())
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            drain()
            for ref in done:
                row, stage, t0 = pending.pop(ref)
                out = _collect(prov, ray, ref, row, t0)
                if stage == "quantize" and not row.error:  # its verify task: the same resources
                    submit(row, "verify", t0, before=out, node_id=out.get("node_id"))
                    continue
                if (row.error or row.gate_failures) and not prov.opts.keep_going:
                    raise StopRun
    finally:
        for ref in pending:
            ray.cancel(ref)
        drain()
        if started:
            ray.shutdown()


class _EventFollower:
    """Forwards the run's events that the tasks append to their own files (``events/<run>--<writer>``,
    on the shared store) to the driver's ``on_event``: complete lines only, each file from where the
    last poll stopped (files are reopened each time: NFS revalidates on open)."""

    def __init__(self, prov) -> None:
        self.prov = prov
        self.offsets: dict[str, int] = {}

    def poll(self) -> None:
        store, run = self.prov.store, self.prov.summary.run_id
        own = f"{run}--{store.lease.id}.jsonl" if store.lease else None
        for path in sorted(store.events_dir.glob(f"{run}--*.jsonl")):
            if path.name == own:
                continue
            start = self.offsets.get(path.name, 0)
            try:
                with open(path, "rb") as fh:
                    fh.seek(start)
                    data = fh.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            self.offsets[path.name] = start + end
            for line in data[:end].splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self.prov.on_event(event)


def _collect(prov, ray, ref, row, t0: float) -> dict:
    """Fold a finished task into the driver's row and summary; returns the task's output."""
    try:
        out = ray.get(ref)
    except Exception as exc:  # noqa: BLE001 - retries exhausted (nodes kept dying) or a Ray error
        err = errors.ProvisionFailedError(f"{row.repo_id}: the Ray task failed: {str(exc).splitlines()[0]}",
                                          hint="See the Ray logs of the task's node; a re-run resumes from what "
                                               "finished (every step is keyed by its inputs).")
        out = {"row": None, "error": err.to_dict()}
        prov.emit("task", "error", model=row.model, artifact=row.repo_id, error=out["error"])
    if out["row"] is not None:
        for k, v in vars(out["row"]).items():
            setattr(row, k, v)
    else:
        row.error = out["error"]
    row.seconds = round(time.monotonic() - t0, 2)
    if out["error"] and prov.summary.first_error is None:
        prov.summary.first_error = RemoteStepError(out["error"])
    return out
