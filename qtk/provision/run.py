"""``qtk provision``: manifest -> pull -> quantize -> verify -> gate -> publish, idempotently.

Every step is addressed by the hash of its inputs (:mod:`qtk.provision.keys`):

    quantize  = the selected source files' content ids (LFS sha256 / git oids; not the commit) + the
                options the method reads (the registry) + the calibration set's digest + the toolchain
                (qtk, backend, transformers, torch versions, device class)
    verify    = quantize + reference files + verify options + the evaluation text's digest + toolchain
    publish   = quantize + verify + the gates + the published repo name

Each row carries the reason every step runs or not (``new``, ``changed input config.json``,
``changed toolchain: torch A -> B``, ``cached``), against the inputs its record kept from the last build.

A step whose result exists under its key is skipped, so a re-run does nothing; a changed recipe
parameter changes the quantize key (and with it verify and publish) of that recipe only; a changed
gate only re-evaluates and re-publishes (hard links, no bytes copied). Downloads resume through qtk
pull's own sidecar state. A gate failure is recorded with its numbers and never published.

Two stages: a plan for every model first (metadata only, no file bytes: commits, keys, what exists,
memory and disk needed), refused as a whole when the disk cannot hold it; then the steps. ``dry_run``
stops after the plan.

The steps are public methods of :class:`Provisioner`, the same for every executor (the local one,
:func:`run_local`; the Ray one, :mod:`qtk.provision.ray_executor`). Each raises on failure and emits its
own events:

    plan(spec) -> ModelPlan              metadata only: commit, keys and their reasons, what exists, memory
    pull(mp)                             the model's planned files into the HF cache (resumable)
    build(mp, row, inputs) -> Path       quantize under the quantize key (or the build already there)
    built(row, inputs) -> Path           the build another task finished under the key (a Ray verify task)
    verify(mp, row, inputs, build)       the verify report under the verify key (or the one already there)
    gate(row, inputs, report) -> bool    the recipe's gates; a failure is recorded, never published
    publish(mp, recipe, row, inputs, build, report)   the version under the publish key, atomically (+ push)

An executor drives them through two helpers that record a failure in the summary instead of raising
it: :meth:`Provisioner.pull_or_record` and :meth:`Provisioner.run_artifact` (build -> verify -> gate ->
publish under the artifact's lock, or one of the :data:`STAGES`); without --keep-going a recorded
failure raises :class:`StopRun`, which ends the run. :func:`qtk.provision.provision` picks the executor.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import __version__, _fs, _json, errors
from .._stdio import output_to_file
from ..settings import Settings
from .manifest import Manifest, ModelSpec, Recipe
from .lease import host_id
from .keys import KEY_VERSION, StepInputs, key_of, diff_inputs, hub_dataset_digest, toolchain
from .store import ProvisionStore, now_iso

__all__ = ["ProvisionOptions", "ArtifactRow", "Summary", "ModelPlan", "Provisioner", "StopRun", "error_dict",
           "run_local", "STEPS", "STAGES"]

STEPS = ("pull", "quantize", "verify", "gate", "publish")
STAGES = ("quantize", "verify")  # what run_artifact can run apart (one Ray task each): build; verify -> gate -> publish


@dataclass(frozen=True)
class ProvisionOptions:
    dry_run: bool = False
    keep_going: bool = False
    lock_timeout: float | None = None  # None: wait for another run's lock as long as it takes
    only: tuple[str, ...] = ()  # model names (or repos) to provision; empty: all
    push: bool | None = None  # override every model's publish.push_to_hub
    prune: bool = True  # remove published versions that neither the current nor the previous one is
    backend_output: bool = False  # True: backends print to this terminal; False: to a log file per step
    shard: tuple[int, int] | None = None  # (I, N): only this shard's artifacts (qtk.provision.shard)
    executor: str = "local"  # "local": one step at a time here; "ray": one Ray task per artifact
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a local Ray started for this run
    ray_task_cpus: int = 1  # CPU cores each Ray task asks for (its torch threads): see ray_executor._resources


@dataclass
class ArtifactRow:
    model: str
    repo_id: str  # the published repo, <org>/<model>-<recipe>
    method: str
    source: str = ""  # repo@commit
    steps: dict = field(default_factory=lambda: {s: "-" for s in STEPS})
    keys: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)  # step -> why it runs or is skipped (new, changed input X, cached)
    metrics: dict = field(default_factory=dict)
    gate_failures: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    seconds: float = 0.0
    error: dict | None = None

    @property
    def outcome(self) -> str:
        if self.error:
            return "error"
        if self.gate_failures:
            return "gate_failed"
        return "ok"

    def to_dict(self) -> dict:
        return {**asdict(self), "outcome": self.outcome}


@dataclass
class Summary:
    run_id: str
    store: Path
    dry_run: bool
    keep_going: bool = False
    rows: list[ArtifactRow] = field(default_factory=list)
    model_errors: list[dict] = field(default_factory=list)  # errors before any artifact existed
    first_error: BaseException | None = None
    disk: dict = field(default_factory=dict)
    bytes_downloaded: int = 0
    seconds: float = 0.0
    shard: str | None = None  # "I/N" when this run provisioned one shard of the manifest

    @property
    def exit_code(self) -> int:
        """0 all good; 3 only gate failures; 60 when --keep-going carried on past errors; without
        --keep-going the error that stopped the run gives its own code."""
        if self.first_error is not None:
            return errors.ProvisionFailedError.exit_code if self.keep_going else errors.exit_code_for(self.first_error)
        if any(r.gate_failures for r in self.rows):
            return errors.GateFailedError.exit_code
        return 0

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "store": str(self.store), "dry_run": self.dry_run, "shard": self.shard,
                "exit_code": self.exit_code, "seconds": round(self.seconds, 2),
                "bytes_downloaded": self.bytes_downloaded, "disk": self.disk,
                "artifacts": [r.to_dict() for r in self.rows], "model_errors": self.model_errors}


def error_dict(exc: BaseException) -> dict:
    """An error as the summary and the events record it (a QtkError's own fields, else its type)."""
    if isinstance(exc, errors.QtkError):
        return exc.to_dict()
    return {"error": type(exc).__name__, "message": errors.redact(str(exc)), "hint": None, "exit_code": 1}


@dataclass
class ModelPlan:
    """One model's plan (:meth:`Provisioner.plan`): its pull plan, source and one row per recipe."""

    spec: ModelSpec
    pull_plan: object  # qtk.hub.download.PullPlan
    source: dict
    artifacts: list[tuple[Recipe, ArtifactRow, dict]]  # recipe, row, step inputs
    view: Path | None = None  # the planned files exactly (ProvisionStore.source_view), made once pulled


class Provisioner:
    def __init__(self, manifest: Manifest, opts: ProvisionOptions, *, settings: Settings | None = None,
                 on_event: Callable[[dict], None] = lambda e: None, log: Callable[[str], None] = lambda s: None,
                 warn: Callable[[str], None] = lambda s: None) -> None:
        self.m, self.opts = manifest, opts
        self.settings = settings or Settings.from_env()
        self.store = ProvisionStore(manifest.store)
        self.on_event, self.log, self.warn = on_event, log, warn
        self.summary = Summary(uuid.uuid4().hex[:12], self.store.root, opts.dry_run, opts.keep_going)
        self._digests: dict[tuple, str] = {}
        # artifact repo id -> the quantize inputs another task built it from (a Ray verify task: the quantize
        # task's): its key is used as it is, never recomputed from this node's device class or calibration
        self.pinned: dict[str, StepInputs] = {}
        from ..devices import resolve_device

        try:
            self.device = resolve_device(manifest.device)
        except errors.UnsupportedConfigError:
            if opts.executor != "ray":
                raise
            self.device = "cuda"  # a driver without a GPU: the Ray tasks ask for one on the nodes that have it

    # -- events -----------------------------------------------------------------------------------

    def emit(self, step: str, result: str, *, model: str, artifact: str | None = None, **fields) -> None:
        event = {"ts": now_iso(), "run": self.summary.run_id, "host": host_id(), "pid": os.getpid(), "model": model,
                 "artifact": artifact, "step": step, "result": result, **fields}
        if not self.opts.dry_run:
            self.store.log_event(event)
        self.on_event(event)

    def _step_log(self, row: ArtifactRow, step: str):
        """Where a step's backend output goes: a log file in the store (named in its events)."""
        if self.opts.backend_output:
            return None
        d = self.store.state / "logs"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{time.strftime('%Y%m%dT%H%M%S')}-{self.summary.run_id}-{row.repo_id.replace('/', '--')}-{step}.log"

    # -- inputs -----------------------------------------------------------------------------------

    def _text_digest(self, spec: str, text_field: str | None) -> str:
        """The digest of a text set; an ``hf://`` dataset's from its metadata only (no download)."""
        k = (spec, text_field)
        if k not in self._digests:
            if spec.startswith("hf://datasets/"):
                self._digests[k] = hub_dataset_digest(spec, text_field, self.settings)
            else:
                from ..texts import load_texts

                self._digests[k] = load_texts(spec, text_field=text_field, settings=self.settings).sha256
        return self._digests[k]

    def build_threads(self) -> int | None:
        """The torch thread count a CPU build computes with: a Ray task's ``--ray-task-cpus``
        (ray_executor sets it), else this process's torch default (None without torch: the key then
        cannot name it, as before)."""
        if self.opts.executor == "ray":
            return self.opts.ray_task_cpus
        try:
            import torch
        except ImportError:
            return None
        return torch.get_num_threads()

    def _inputs(self, spec: ModelSpec, recipe: Recipe, source: dict) -> dict:
        from ..quantize.base import QuantizeOptions
        from ..methods import get_method, method_spec
        from ..verify.run import Gates, VerifyOptions

        method = get_method(recipe.method)
        q = QuantizeOptions(method=recipe.method, **recipe.params, device=self.m.device)
        q = replace(q, sym=method.sym(q))
        # only what the method reads (the registry says): NF4 output does not depend on calibration options
        reads = {"method", *method_spec(recipe.method).reads}
        qparams = {k: v for k, v in q.to_dict().items() if k in reads}
        tools = toolchain(getattr(method, "distribution", None), self.device)  # this node's: verify runs here
        qin = self.pinned.get(spec.artifact_repo(recipe))
        if qin is None:
            cal = self._text_digest(q.calibration, q.text_field) if "calibration" in reads else None
            threads = self.build_threads() if method.calibrates(q) else None
            qtools = toolchain(getattr(method, "distribution", None), self.device, cpu_threads=threads)
            qin = StepInputs(dict(source.get("files", ())), qparams, cal, qtools)
        cal = qin.calibration_sha256
        qkey = qin.key()
        v = VerifyOptions(**spec.verify, device=self.m.device)
        vparams = {k: getattr(v, k) for k in ("text", "text_field", "ctx", "max_tokens", "smoke", "max_new_tokens",
                                              "temperature", "top_p", "seed")}
        if v.tasks:  # only then: keys of manifests without tasks stay what they were
            from ..verify.tasks import task_inputs

            vparams["tasks"] = task_inputs(v.tasks, v.tasks_dir, v.limit, v.num_fewshot)
        vkey = key_of({"v": KEY_VERSION, "quantize": qkey, "reference": qin.files, "params": vparams,
                     "text_sha256": self._text_digest(v.text, v.text_field), "toolchain": tools})
        gates = Gates(**recipe.gates)
        repo_id = spec.artifact_repo(recipe)
        pkey = key_of({"v": 1, "quantize": qkey, "verify": vkey, "gates": asdict(gates), "repo": repo_id})
        return {"qopts": q, "vopts": v, "gates": gates, "keys": {"quantize": qkey, "verify": vkey, "publish": pkey},
                "quantize_inputs": qin, "calibration_sha256": cal,
                "gates_set": {k: v for k, v in asdict(gates).items() if v not in (None, False)}}

    def _memory(self, shape, recipe_opts, ctx: int) -> dict:
        from ..plan import FORMATS, GB, device_capacity, inference_memory, quantize_memory, quantized_format, weight_bytes

        if shape is None:
            return {}
        q = recipe_opts
        qm = quantize_memory(shape, q.method, device=self.device, group_size=q.group_size, samples=q.samples,
                             seq_len=q.seq_len)
        fmt = quantized_format(q.method, q.group_size)
        out_bytes = weight_bytes(shape, fmt)
        verify_need = inference_memory(shape, FORMATS["bf16"], device=self.device, ctx=ctx) + \
            inference_memory(shape, fmt, device=self.device, ctx=ctx)
        label, free = device_capacity(self.device)
        need = max(qm["device_bytes"], verify_need)
        return {"device": label, "params": shape.total, "bf16_GB": weight_bytes(shape, FORMATS["bf16"]) / GB,
                "output_GB": out_bytes / GB, "quantize_device_GB": qm["device_bytes"] / GB,
                "quantize_host_GB": qm["host_bytes"] / GB, "verify_GB": verify_need / GB,
                "free_GB": None if free is None else free / GB, "fits": None if free is None else need <= free,
                "output_bytes": out_bytes}

    # -- stage 1: plan ----------------------------------------------------------------------------

    def plan(self, spec: ModelSpec) -> ModelPlan:
        """Step 1 for one model, metadata only (no file bytes): its commit, each recipe's keys and why each
        step runs or not, what exists already, the memory needed."""
        mp = self._plan_model(spec)
        self._state(mp)
        return mp

    def _plan_model(self, spec: ModelSpec) -> ModelPlan:
        from ..hfload import read_config
        from ..hub.download import plan_pull
        from ..plan import shape_from_config

        p = plan_pull(spec.repo, revision=spec.revision, include=spec.include, exclude=spec.exclude,
                      settings=self.settings)
        # the commit is provenance, not an input: the keys hash the selected files' content ids
        source = {"repo": spec.repo, "commit": p.commit,
                  "files": sorted([f.file.path, f.file.oid] for f in p.files)}
        shape = None
        if any(f.file.path == "config.json" for f in p.files):
            cfg_path = p.root / "config.json"
            try:
                if cfg_path.is_file():
                    cfg = read_config(cfg_path, missing=f"{cfg_path} is missing.")
                else:  # config.json alone, through the same verified downloader (a few kB)
                    from ..plan import load_config

                    cfg, _ = load_config(spec.repo, revision=p.commit, settings=self.settings)
                shape = shape_from_config(cfg)
            except errors.ModelFormatError as exc:
                self.warn(f"{spec.name}: no memory plan ({exc.message})")
        arts = []
        for r in spec.recipes:
            inputs = self._inputs(spec, r, source)
            row = ArtifactRow(spec.name, spec.artifact_repo(r), r.method, f"{spec.repo}@{p.commit[:12]}",
                              keys=inputs["keys"])
            row.memory = self._memory(shape, inputs["qopts"], inputs["vopts"].ctx)
            arts.append((r, row, inputs))
        return ModelPlan(spec, p, source, arts)

    def _state(self, mp: ModelPlan) -> None:
        """What exists already, per step (for the dry run and the disk preflight)."""
        from ..hub.download import human_bytes
        from ..quantize.run import PROVENANCE_FILE

        p = mp.pull_plan
        pull_state = f"fetch {human_bytes(p.bytes_to_transfer)}" if p.missing else "cached"
        for _r, row, inputs in mp.artifacts:
            k = inputs["keys"]
            row.steps["pull"] = pull_state
            row.reasons["pull"] = f"{len(p.missing)} of {len(p.files)} files to fetch" if p.missing else "cached"
            built = (self.store.build_dir(k["quantize"]) / PROVENANCE_FILE).is_file()
            row.steps["quantize"] = "done" if built else "to run"
            rec = self.store.record(row.repo_id) or {}
            row.reasons["quantize"] = "cached" if built else "; ".join(
                diff_inputs(StepInputs.from_dict(rec.get("quantize_inputs")), inputs["quantize_inputs"]))
            rep = self.store.read_json(self.store.report_path(k["verify"]))
            row.steps["verify"] = "done" if rep else "to run"
            row.reasons["verify"] = "cached" if rep else ("after quantize" if not built else "changed verify input")
            row.steps["gate"] = "to check"
            published = self.store.published_key(row.repo_id) == k["publish"]
            row.steps["publish"] = "done" if published else "to run"
            row.reasons["publish"] = "cached" if published else (
                "new" if self.store.published_key(row.repo_id) is None else "replaces the published version")

    def _check_disk(self, plans: list[ModelPlan]) -> None:
        from ..hub.download import existing_ancestor, free_bytes, human_bytes

        need: dict[int, list] = {}  # st_dev -> [bytes, path]

        def add(path: Path, n: int) -> None:
            p = existing_ancestor(path)
            need.setdefault(os.stat(p).st_dev, [0, p])[0] += n

        seen_repos = set()
        for mp in plans:
            pp = mp.pull_plan
            if (pp.repo_id, pp.commit) not in seen_repos:
                seen_repos.add((pp.repo_id, pp.commit))
                add(self.settings.hub_cache, pp.disk_bytes_needed)
            for _r, row, _i in mp.artifacts:
                if row.steps["quantize"] == "to run" and row.memory.get("output_bytes"):
                    add(self.store.root, int(row.memory["output_bytes"] * 1.1))
        self.summary.disk = {str(p): {"needed_bytes": n, "free_bytes": free_bytes(p)} for n, p in need.values()}
        for p, d in self.summary.disk.items():
            n, free = d["needed_bytes"], d["free_bytes"]
            if n > free:
                raise errors.DiskSpaceError(
                    f"The plan needs {human_bytes(n)} on the filesystem of {p} (downloads and quantized outputs "
                    f"together); {human_bytes(free)} are free. Nothing was started.",
                    hint="Free space, point HF_HUB_CACHE / the store elsewhere, or provision fewer models (--only).",
                )

    # -- stage 2: the steps -----------------------------------------------------------------------

    def pull(self, mp: ModelPlan) -> None:
        """The model's planned files into the HF cache (qtk pull: resumable, verified); nothing when cached."""
        from ..hub.download import pull

        spec, p = mp.spec, mp.pull_plan
        if not p.missing:
            self.emit("pull", "skipped", model=spec.name, commit=p.commit, bytes=0, reason="all files cached")
            status = "cached"
        else:
            self.emit("pull", "start", model=spec.name, commit=p.commit, bytes_planned=p.bytes_to_transfer)
            t0 = time.monotonic()
            res = pull(p, lock_timeout=self.opts.lock_timeout)
            self.summary.bytes_downloaded += res.stats.bytes_downloaded
            self.emit("pull", "done", model=spec.name, commit=p.commit, bytes=res.stats.bytes_downloaded,
                      bytes_resumed=res.stats.bytes_resumed, duration_s=round(time.monotonic() - t0, 2))
            status = "done"
        for _r, row, _i in mp.artifacts:
            row.steps["pull"] = status

    def _source_dir(self, mp: ModelPlan) -> Path:
        """The model's planned files and nothing else, as a checkpoint directory (in the store: the same
        path on every node): quantize and verify read what the keys hashed, fetch nothing more."""
        if mp.view is None:
            p = mp.pull_plan
            files = {f.file.path: p.root / f.file.path for f in p.files}
            if not p.missing and not all(t.is_file() for t in files.values()):
                from ..hub.download import pull

                # a new commit whose files the cache already holds (a README-only upstream commit): the
                # pull step had nothing to fetch; link this commit's snapshot to the blobs (no download)
                pull(p, lock_timeout=self.opts.lock_timeout)
            key = key_of({"v": 1, "repo": p.repo_id, "commit": p.commit, "root": str(p.root),
                          "files": mp.source["files"]})
            mp.view = self.store.source_view(key, files)
        return mp.view

    def _artifact(self, mp: ModelPlan, recipe: Recipe, row: ArtifactRow, inputs: dict,
                  stages: tuple[str, ...] = STAGES) -> None:
        """``stages``: both here (the local executor), or one per Ray task: ``quantize``, then ``verify``
        (verify, gate, publish) on the build the quantize task left under its key."""
        store = self.store
        lock_name = "artifact-" + row.repo_id.replace("/", "--")

        def waiting() -> None:
            self.emit("lock", "waiting", model=row.model, artifact=row.repo_id,
                      reason="another qtk provision is working on this artifact")

        with store.lock(lock_name, timeout=self.opts.lock_timeout, on_wait=waiting):
            build = self.build(mp, row, inputs) if "quantize" in stages else self.built(row, inputs)
            if "verify" not in stages:
                return
            report = self.verify(mp, row, inputs, build)
            if not self.gate(row, inputs, report):
                return
            self.publish(mp, recipe, row, inputs, build, report)

    def build(self, mp: ModelPlan, row: ArtifactRow, inputs: dict) -> Path:
        """The quantize step: the build under the artifact's quantize key, made here (in the key's
        workspace, under the build's lock) unless it exists. Returns its directory."""
        from ..quantize.run import PROVENANCE_FILE, quantize

        key = inputs["keys"]["quantize"]
        build = self.store.build_dir(key)
        if (build / PROVENANCE_FILE).is_file():
            self.emit("quantize", "skipped", model=row.model, artifact=row.repo_id, key=key, reason="cached")
            row.steps["quantize"] = "cached"
            self._note_inputs(row, inputs)
            return build
        with self.store.lock(f"build-{key}", timeout=self.opts.lock_timeout):  # two recipes, one key
            if (build / PROVENANCE_FILE).is_file():
                row.steps["quantize"] = "cached"
                self._note_inputs(row, inputs)
                return build
            logfile = self._step_log(row, "quantize")
            self.emit("quantize", "start", model=row.model, artifact=row.repo_id, key=key,
                      reason=row.reasons.get("quantize"), params=inputs["qopts"].to_dict(),
                      log=str(logfile) if logfile else None)
            t0 = time.monotonic()
            # the build is written in the key's workspace, owned by this run's lease while it works: only an
            # expired lease lets another run take it over; a method's resume checkpoint stays at its path
            work = self.store.claim_workspace(key, timeout=self.opts.lock_timeout)
            try:
                src = self._source_dir(mp)  # exactly the files the key hashed (not the snapshot's others)
                with output_to_file(logfile):
                    res = quantize(str(src), work / key, inputs["qopts"], overwrite=True, settings=self.settings,
                                   log=self.log, warn=self.warn, origin={
                                       "repo_id": mp.spec.repo, "commit": mp.pull_plan.commit,
                                       "path": str(mp.pull_plan.root), "files": dict(mp.source["files"])})
                if build.exists():  # an unfinished build under the final name (qtk before workspaces)
                    shutil.rmtree(build)
                _fs.replace_durable(work / key, build)  # sealed by quantize; the rename made durable too
                self.store.release_workspace(key, finished=True)
            except BaseException:
                self.store.release_workspace(key, finished=False)
                raise
            dt = time.monotonic() - t0
            size = self.store.disk_usage(build)
            self.emit("quantize", "done", model=row.model, artifact=row.repo_id, key=key, duration_s=round(dt, 2),
                      bytes=size, device=res.provenance.get("device"))
        row.steps["quantize"] = "done"
        self._note_inputs(row, inputs)
        return build

    def built(self, row: ArtifactRow, inputs: dict) -> Path:
        """The build a quantize task finished under this artifact's key (a verify task's input)."""
        from ..quantize.run import PROVENANCE_FILE

        build = self.store.build_dir(inputs["keys"]["quantize"])
        if not (build / PROVENANCE_FILE).is_file():
            raise errors.ProvisionFailedError(
                f"{row.repo_id}: no finished build under quantize key {inputs['keys']['quantize']} on this node "
                f"({self.store.builds}).",
                hint="The verify task takes the quantize task's key, so this node does not see the build: give "
                     "every node the same shared store path.")
        return build

    def _note_inputs(self, row: ArtifactRow, inputs: dict) -> None:
        """Keep what this artifact was last built from, so that a later run can say what changed."""
        rec = self.store.record(row.repo_id) or {"repo_id": row.repo_id}  # under the artifact's lock
        if rec.get("quantize_inputs") != inputs["quantize_inputs"].to_dict():
            rec["quantize_inputs"] = inputs["quantize_inputs"].to_dict()
            self.store.write_json(self.store.record_path(row.repo_id), rec)

    def verify(self, mp: ModelPlan, row: ArtifactRow, inputs: dict, build: Path) -> dict:
        """The verify step: the report under the verify key (reference = the source's planned files),
        made here unless it exists."""
        from ..verify.run import verify

        key = inputs["keys"]["verify"]
        path = self.store.report_path(key)
        report = self.store.read_json(path)
        if report is not None:
            self.emit("verify", "skipped", model=row.model, artifact=row.repo_id, key=key, reason="report exists")
            row.steps["verify"] = "cached"
            return report
        logfile = self._step_log(row, "verify")
        self.emit("verify", "start", model=row.model, artifact=row.repo_id, key=key,
                  log=str(logfile) if logfile else None)
        t0 = time.monotonic()
        with output_to_file(logfile):
            report = verify(str(self._source_dir(mp)), [str(build)], inputs["vopts"], log=self.log)
        report["models"][0]["name"] = row.source
        report["models"][1]["name"] = row.repo_id
        self.store.write_json(path, report)
        self.emit("verify", "done", model=row.model, artifact=row.repo_id, key=key,
                  duration_s=round(time.monotonic() - t0, 2), metrics=_metrics(report))
        row.steps["verify"] = "done"
        return report

    def gate(self, row: ArtifactRow, inputs: dict, report: dict) -> bool:
        """The recipe's gates on the report: True if they pass; a failure is recorded (numbers and gates)."""
        from ..verify.run import check_gates

        rep = copy.deepcopy(report)
        failures = check_gates(rep, inputs["gates"])
        row.metrics = _metrics(rep)
        row.gate_failures = [f.split(": ", 1)[-1] for f in failures]
        gates = inputs["gates_set"]
        if failures:
            row.steps["gate"] = "FAILED"
            row.steps["publish"] = "blocked"
            self.emit("gate", "failed", model=row.model, artifact=row.repo_id, metrics=row.metrics, gates=gates,
                      failures=row.gate_failures)
            self._write_record(row, self.store.record(row.repo_id) or {},
                               self._last_run(row, inputs, "gate_failed", gate_failures=row.gate_failures))
            return False
        row.steps["gate"] = "passed"
        self.emit("gate", "passed", model=row.model, artifact=row.repo_id, metrics=row.metrics, gates=gates)
        return True

    def _last_run(self, row: ArtifactRow, inputs: dict, result: str, **extra) -> dict:
        return {"at": now_iso(), "run": self.summary.run_id, "keys": row.keys, "metrics": row.metrics,
                "gates": inputs["gates_set"], "result": result, **extra}

    def _write_record(self, row: ArtifactRow, rec: dict, last: dict) -> None:
        rec = {**rec, "repo_id": row.repo_id, "model": row.model, "method": row.method, "source": row.source,
               "last_run": last}
        self.store.write_json(self.store.record_path(row.repo_id), rec)

    def publish(self, mp: ModelPlan, recipe: Recipe, row: ArtifactRow, inputs: dict, build: Path,
                report: dict) -> None:
        """The publish step: ``STORE/<repo>`` becomes the version under the publish key (atomically, under
        the publish lock; skipped when it already is), the versions the store no longer keeps are pruned
        (``opts.prune``), then the optional push to a Hub."""
        from ..verify.report import markdown

        key = inputs["keys"]["publish"]
        store = self.store
        last = self._last_run(row, inputs, "published")
        if store.published_key(row.repo_id) == key:
            self.emit("publish", "skipped", model=row.model, artifact=row.repo_id, key=key, reason="already published")
            row.steps["publish"] = "cached"
            self._write_record(row, store.record(row.repo_id) or {}, last)
        else:
            self.emit("publish", "start", model=row.model, artifact=row.repo_id, key=key)
            t0 = time.monotonic()
            prov = {"qtk_version": __version__, "published": now_iso(), "repo_id": row.repo_id, "model": row.model,
                    "source": mp.source | {"files": len(mp.source["files"])}, "recipe": {"name": recipe.name,
                    "method": recipe.method, **inputs["qopts"].to_dict()},
                    "calibration_sha256": inputs["calibration_sha256"], "keys": row.keys, "gates": last["gates"],
                    "metrics": row.metrics, "manifest": str(self.m.path)}
            card = (build / "README.md").read_text() if (build / "README.md").is_file() else f"# {row.repo_id}\n"
            card += (f"\n## Verification (qtk provision)\n\nGates passed: "
                     f"{', '.join(f'{k} {v}' for k, v in last['gates'].items()) or 'none set'}.\n\n" + markdown(report))
            extra = {"qtk_verify_report.json": _json.dumps(report, indent=2) + "\n",
                     "qtk_provision.json": _json.dumps(prov, indent=2) + "\n", "README.md": card}
            with store.lock("publish", timeout=self.opts.lock_timeout):  # one writer of links at a time
                previous = store.published_key(row.repo_id)
                store.publish(row.repo_id, key, build, extra)
                rec = {**(store.record(row.repo_id) or {}), "published": {"key": key, "at": now_iso(),
                       "keys": row.keys, "metrics": row.metrics}, "previous": previous}
                self._write_record(row, rec, last)
                if self.opts.prune:
                    store.prune_artifacts()  # the store's kept-versions policy
            self.emit("publish", "done", model=row.model, artifact=row.repo_id, key=key, previous=previous,
                      path=str(store.repo_path(row.repo_id)), duration_s=round(time.monotonic() - t0, 2))
            row.steps["publish"] = "done"
        self._push(mp, row, key)

    def _push(self, mp: ModelPlan, row: ArtifactRow, key: str) -> None:
        """Optionally upload the published version to a Hub endpoint (huggingface_hub's upload API)."""
        pub = mp.spec.publish
        push = pub.get("push_to_hub", False) if self.opts.push is None else self.opts.push
        if not push:
            return
        from huggingface_hub import HfApi

        from ..hub._errors import HubContext, map_hub_errors
        from ..hub.auth import get_token

        hub_repo = f"{pub.get('hub_org') or row.repo_id.split('/')[0]}/{row.repo_id.split('/')[1]}"
        rec = self.store.record(row.repo_id) or {}
        if rec.get("pushed", {}).get("key") == key and rec["pushed"].get("repo") == hub_repo:
            self.emit("push", "skipped", model=row.model, artifact=row.repo_id, hub_repo=hub_repo, reason="pushed")
            return
        token = get_token(self.settings)
        if token is None:
            raise errors.NotLoggedInError(f"publish.push_to_hub needs a token to create {hub_repo}.",
                                          hint="Run `qtk login` or set HF_TOKEN.")
        self.emit("push", "start", model=row.model, artifact=row.repo_id, hub_repo=hub_repo)
        t0 = time.monotonic()
        api = HfApi(endpoint=self.settings.endpoint, token=token.value, library_name="qtk", library_version=__version__)
        with map_hub_errors(HubContext(self.settings.endpoint, hub_repo, "main", has_token=True)):
            api.create_repo(hub_repo, private=pub.get("hub_private", True), exist_ok=True)
            info = api.upload_folder(folder_path=str(self.store.artifacts / key), repo_id=hub_repo,
                                     commit_message=f"qtk provision: {row.repo_id} ({key})")
        rec["pushed"] = {"key": key, "repo": hub_repo, "at": now_iso(), "commit": getattr(info, "oid", None)}
        self.store.write_json(self.store.record_path(row.repo_id), rec)
        self.emit("push", "done", model=row.model, artifact=row.repo_id, hub_repo=hub_repo,
                  duration_s=round(time.monotonic() - t0, 2))

    # -- the run ----------------------------------------------------------------------------------

    def _fail(self, exc: BaseException, *, model: str, rows: list[ArtifactRow], step: str) -> None:
        err = error_dict(exc)
        self.emit(step, "error", model=model, artifact=rows[0].repo_id if len(rows) == 1 else None, error=err)
        if not rows:
            self.summary.model_errors.append({"model": model, "step": step, **err})
        for row in rows:
            row.error = err
            row.steps[step] = "ERROR"
            if not self.opts.dry_run:
                rec = self.store.record(row.repo_id) or {}
                self._write_record(row, rec, {"at": now_iso(), "run": self.summary.run_id, "result": "error",
                                              "step": step, "error": err})
        if self.summary.first_error is None:
            self.summary.first_error = exc
        if not self.opts.keep_going:
            raise StopRun from None

    def pull_or_record(self, mp: ModelPlan) -> bool:
        """:meth:`pull`, a failure recorded on the model's rows (False; without --keep-going: StopRun)."""
        try:
            self.pull(mp)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, model=mp.spec.name, rows=[row for _r, row, _i in mp.artifacts], step="pull")
            return False
        return True

    def run_artifact(self, mp: ModelPlan, recipe: Recipe, row: ArtifactRow, inputs: dict,
                     stages: tuple[str, ...] = STAGES) -> None:
        """build -> verify -> gate -> publish for one artifact under its lock (or ``stages`` of it: a Ray
        task runs ``("quantize",)``, then another ``("verify",)`` on the build the first left under its key);
        a failure is recorded (and, without --keep-going, raises StopRun)."""
        t1 = time.monotonic()
        step = lambda: next((s for s in STEPS if row.steps[s] in ("to run", "to check", "-")), "publish")  # noqa: E731
        try:
            self._artifact(mp, recipe, row, inputs, stages)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, model=mp.spec.name, rows=[row], step=step())
        finally:
            row.seconds = round(time.monotonic() - t1, 2)

    def _shard(self, models: list[ModelSpec], index: int, count: int) -> list[ModelSpec]:
        """This shard's (model, recipe) pairs; a model with none of its recipes here is not even pulled."""
        from .shard import select

        mine = set(select([s.artifact_repo(r) for s in models for r in s.recipes], index, count))
        out = []
        for s in models:
            recipes = tuple(r for r in s.recipes if s.artifact_repo(r) in mine)
            if recipes:
                out.append(replace(s, recipes=recipes))
        self.summary.shard = f"{index}/{count}"
        return out

    def run(self, execute: Callable[["Provisioner", list[ModelPlan]], None]) -> Summary:
        """Plan every model (stage 1), check the disk, then ``execute(self, plans)`` runs the steps (stage 2:
        :func:`run_local`, or :func:`qtk.provision.ray_executor.run_on_ray`); a dry run stops after the plan."""
        t0 = time.monotonic()
        models = [s for s in self.m.models if not self.opts.only or s.name in self.opts.only or s.repo in self.opts.only]
        if self.opts.only and not models:
            raise errors.UsageError(f"--only {', '.join(self.opts.only)} matches no model of {self.m.path}.",
                                    hint="Models: " + ", ".join(s.name for s in self.m.models))
        if self.opts.shard is not None:
            models = self._shard(models, *self.opts.shard)
        if not self.opts.dry_run:
            self.store.init()
            self.store.start_lease()
        plans: list[ModelPlan] = []
        try:
            if not self.opts.dry_run:
                self.store.clean_stale(timeout=self.opts.lock_timeout)
            for spec in models:  # stage 1: metadata only
                try:
                    mp = self.plan(spec)
                except Exception as exc:  # noqa: BLE001 - recorded, then stop or go on
                    self._fail(exc, model=spec.name, rows=[], step="plan")
                    continue
                plans.append(mp)
                self.summary.rows += [row for _r, row, _i in mp.artifacts]
            self._check_disk(plans)
            if self.opts.dry_run:
                return self.summary
            execute(self, plans)
        except StopRun:
            pass
        finally:
            self.summary.seconds = time.monotonic() - t0
            if self.store.lease is not None:
                self.store.lease.close()
        return self.summary


class StopRun(Exception):
    """Raised by a recorded failure without --keep-going: the executor stops, the run returns its summary."""


def _round(x, n: int):
    return None if x is None else round(x, n)


def _metrics(report: dict) -> dict:
    ref, cand = report["models"][0], report["models"][-1]
    kl = cand.get("kl") or {}
    smoke = cand.get("smoke") or []
    return {
        "ppl_reference": round(ref["perplexity"]["ppl"], 4),
        "ppl": round(cand["perplexity"]["ppl"], 4),
        "ppl_increase_pct": round(cand["ppl_increase_pct"], 2),
        "kld_mean": round(kl["mean"], 5) if kl else None,
        "top1_pct": round(kl["top1_agreement"] * 100, 2) if kl else None,
        "smoke_ok": f"{sum(s['ok'] for s in smoke)}/{len(smoke)}" if smoke else None,
        "recovery_pct": _round((cand.get("recovery") or {}).get("overall"), 2),
        "size_bytes": cand["size_bytes"],
    }


def run_local(prov: Provisioner, plans: list[ModelPlan]) -> None:
    """The local executor (stage 2 here, one step at a time): each model pulled, then its artifacts."""
    for mp in plans:
        if not prov.pull_or_record(mp):
            continue
        for recipe, row, inputs in mp.artifacts:
            prov.run_artifact(mp, recipe, row, inputs)
            if row.gate_failures and not prov.opts.keep_going:
                raise StopRun
