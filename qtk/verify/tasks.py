"""Downstream task accuracy for ``qtk verify --tasks``, through lm-eval (0.4.13) used as a library.

    taskset = load_tasks(["qtk_cloze", "arc_easy"], tasks_dir="./my-tasks")   # before any model loads
    results = evaluate_model(lm_for(model), taskset, limit=50, seed=0)         # per loaded model
    rec = recovery(reference_results, candidate_results)                      # candidate / reference

Where tasks come from, first match wins:
- ``--tasks-dir DIR``: lm-eval task YAMLs of the user (``dataset_path: json`` + ``dataset_kwargs.data_files``
  over local jsonl, or any dataset the HF cache holds). A relative ``data_files`` path is resolved against
  the YAML's own directory (lm-eval alone would use the working directory).
- qtk's own tasks, package data under ``qtk/data/tasks/`` (``qtk_cloze``: see its YAML for what it measures).
- lm-eval's registry (arc_easy, hellaswag, piqa, winogrande, mmlu, gsm8k, ...): their datasets come from
  ``HF_ENDPOINT`` (the Hub, or a ``qtk serve`` mirror) or, offline, from the HF datasets cache.

Offline (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``, or when every task reads local files only) the
datasets library runs with ``HF_DATASETS_OFFLINE=1`` for the duration, so nothing waits on a Hub that
cannot be reached. Every model is evaluated on the same task objects, document order, few-shot seed and
``limit`` (the first N documents of the evaluation split). HF models run in process (lm-eval's HFLM wraps
the model object qtk already loaded, so a model is loaded once for perplexity, KL, smoke and tasks);
GGUF files run through :class:`qtk.verify.lmeval_gguf.GGUFLM`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .. import errors
from .._digest import TreeTooLarge, tree_digest

__all__ = ["TaskSpec", "TaskSet", "parse_task_names", "load_tasks", "lm_for", "evaluate_model", "evaluate_all",
           "recovery", "task_recovery", "task_inputs", "datasets_offline", "shipped_tasks_dir", "PRIMARY_METRICS",
           "BOOTSTRAP_ITERS"]

PRIMARY_METRICS = ("acc", "acc_norm", "exact_match")  # the metric a task's accuracy is read from, first found
BOOTSTRAP_ITERS = 1000  # only metrics without a closed-form stderr are bootstrapped (acc/exact_match are not)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$")
_NO_PROGRESS = lambda *a, **k: None  # noqa: E731
_FILE_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders over local data_files


def shipped_tasks_dir() -> Path:
    """qtk's own task YAMLs + data, package data (a wheel installs them as plain files)."""
    from importlib.resources import files

    return Path(str(files("qtk") / "data" / "tasks"))


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str  # "local" (--tasks-dir), "qtk" (shipped), "lm-eval" (its registry)
    path: str | None = None  # the task's YAML (local and qtk tasks)
    sha256: str | None = None  # local and qtk tasks: the YAML and its data files, hashed together
    kind: str = "task"  # "task", "group" (one aggregate result), or "tag" (expanded to its tasks)
    dataset: str | None = None  # dataset_path: a Hub dataset id, or a datasets builder over local files (json)
    local_data: bool = False  # its data are local files: nothing to fetch

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TaskSet:
    """Tasks loaded once (datasets read, documents built), evaluated on every model."""

    specs: list[TaskSpec]
    objects: dict[str, dict]  # requested name -> lm-eval's {"tasks", "groups", "group_map"} for it
    report_names: dict[str, list[str]]  # requested name -> the result names it reports (a tag: its tasks)
    offline: bool
    lm_eval_version: str
    datasets: dict[str, str] = field(default_factory=dict)  # task -> dataset path (registry tasks)

    def names(self) -> list[str]:
        return [n for s in self.specs for n in self.report_names[s.name]]

    def protocol(self, *, limit: int | None, seed: int, num_fewshot: int | None) -> dict:
        return {"tasks": [s.to_dict() for s in self.specs], "limit": limit, "seed": seed, "num_fewshot": num_fewshot,
                "bootstrap_iters": BOOTSTRAP_ITERS, "lm_eval": self.lm_eval_version, "offline": self.offline,
                "documents": "the first `limit` documents of each task's evaluation split",
                "accuracy": f"the first of {', '.join(PRIMARY_METRICS)} a task reports",
                "recovery": "candidate / reference accuracy per task (reference / candidate for a lower-is-better "
                            "metric); overall: the mean of the per-task recoveries"}


def parse_task_names(values: Sequence[str]) -> list[str]:
    """``--tasks a,b --tasks c`` -> ["a", "b", "c"] (order kept, duplicates dropped); bad names: exit 2."""
    names: list[str] = []
    for v in values:
        for n in (p.strip() for p in str(v).split(",")):
            if not n:
                continue
            if not _NAME_RE.match(n):
                raise errors.UsageError(f"{n!r} is not a task name (letters, digits, '_', '.', '+', '-').",
                                        hint="List lm-eval's tasks with `lm-eval ls tasks`; qtk ships qtk_cloze.")
            if n not in names:
                names.append(n)
    return names


def _tree_sha256(root: Path | None, limit_bytes: int = 1 << 30) -> str | None:
    """:func:`qtk._digest.tree_digest` of a task directory (the bytecode a task's ``!function`` module
    leaves there does not count); None: no directory."""
    if root is None or not root.is_dir():
        return None
    try:
        return tree_digest(root, max_bytes=limit_bytes)
    except TreeTooLarge:
        raise errors.UsageError(f"--tasks-dir {root} holds more than {limit_bytes >> 30} GiB.",
                                hint="Point it at the task YAMLs and their data only.") from None


def task_inputs(names: Sequence[str], tasks_dir: str | None, limit: int | None, num_fewshot: int | None) -> dict:
    """What a task evaluation depends on, without importing lm-eval or reading a dataset (provision's verify
    key): the names, the task directories' contents, limit, few-shot, and lm-eval's version (its registry's
    task definitions)."""
    import importlib.metadata as md

    try:
        version = md.version("lm_eval")
    except md.PackageNotFoundError:
        version = None
    return {"names": parse_task_names(names), "tasks_dir_sha256": _tree_sha256(Path(tasks_dir)) if tasks_dir else None,
            "qtk_tasks_sha256": _tree_sha256(shipped_tasks_dir()), "limit": limit, "num_fewshot": num_fewshot,
            "lm_eval": version}


def _offline_wanted() -> bool:
    from ..settings import Settings

    datasets_flag = os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return Settings.from_env().offline or datasets_flag


@contextlib.contextmanager
def datasets_offline(offline: bool) -> Iterator[None]:
    """While the block runs, the datasets library makes no request when ``offline``.

    huggingface_hub and datasets read their offline switch once, at import; qtk may have imported them
    before it knew. So besides the environment (for anything imported later), the two module flags are
    set for the block and restored after it."""
    if not offline:
        yield
        return
    import datasets.config as dconf
    import huggingface_hub.constants as hconst

    env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    saved = (dconf.HF_HUB_OFFLINE, dconf.HF_DATASETS_OFFLINE, hconst.HF_HUB_OFFLINE)
    os.environ.update({k: "1" for k in env})
    dconf.HF_HUB_OFFLINE = dconf.HF_DATASETS_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconf.HF_HUB_OFFLINE, dconf.HF_DATASETS_OFFLINE, hconst.HF_HUB_OFFLINE = saved
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise errors.BackendUnavailableError(
            f"qtk verify --tasks needs lm-eval: {exc}.",
            hint="pip install 'qtk[tasks]' with torch pinned in the same command (README: Install).") from exc
    return TaskManager


def _lm_eval_version() -> str:
    import importlib.metadata as md

    try:
        return md.version("lm_eval")
    except md.PackageNotFoundError:  # pragma: no cover - imported above, so installed
        return "unknown"


def _local_config(yaml_path: Path) -> tuple[dict, str]:
    """A local task's full config (includes merged, ``!function`` resolved), with relative ``data_files``
    made absolute against the YAML's directory; and the sha256 of the YAML plus its data files."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(yaml_path, resolve_func=True)
    except Exception as exc:  # yaml errors, a missing include or function module
        raise errors.UsageError(f"Task file {yaml_path} cannot be read: {type(exc).__name__}: {exc}",
                                hint="Check the YAML against lm-eval's task guide (docs/task_guide.md).") from exc
    h = hashlib.sha256(yaml_path.read_bytes())
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is not None:
        def fix(p):
            q = Path(os.path.expanduser(str(p)))
            q = q if q.is_absolute() else yaml_path.parent / q
            if not q.is_file():
                raise errors.UsageError(f"Task {cfg.get('task')!r} ({yaml_path}): data file {q} does not exist.",
                                        hint="data_files paths are relative to the task's YAML file.")
            h.update(str(q.name).encode() + b"\0" + q.read_bytes())
            return str(q)

        if isinstance(files, dict):
            files = {split: ([fix(p) for p in v] if isinstance(v, list) else fix(v)) for split, v in files.items()}
        else:
            files = [fix(p) for p in files] if isinstance(files, list) else fix(files)
        cfg["dataset_kwargs"] = {**kwargs, "data_files": files}
    return cfg, h.hexdigest()


def _is_under(path: Path | None, root: Path | None) -> bool:
    if path is None or root is None:
        return False
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _managers(names: list[str], tasks_dir: Path | None):
    """lm-eval's task index over qtk's and the user's directories; lm-eval's own registry (~4 s to index)
    only when some name is not found there. Later paths win, so a user's task shadows a registry name."""
    TaskManager = _import_lm_eval()
    paths = [shipped_tasks_dir(), *([tasks_dir] if tasks_dir else [])]
    tm = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    if all(n in tm.task_index for n in names):
        return tm
    for n in names:  # a broken YAML of the user's, before indexing lm-eval's registry for a name it may not have
        if n not in tm.task_index:
            _explain_unindexed(n, tasks_dir)
    return TaskManager(include_path=[str(p) for p in paths], include_defaults=True)


def _explain_unindexed(name: str, tasks_dir: Path | None) -> None:
    """lm-eval's index skips a YAML it cannot parse (with a log line): when a YAML of ``tasks_dir`` names the
    task, say what is wrong with it instead of "unknown task"."""
    if tasks_dir is None:
        return
    names_it = re.compile(rf"^task:\s*['\"]?{re.escape(name)}['\"]?\s*$", re.M)
    for path in sorted(tasks_dir.rglob("*.yaml")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if names_it.search(text):
            _local_config(path)  # raises with the loader's own complaint


def _spec_for(tm, name: str, tasks_dir: Path | None) -> tuple[TaskSpec, Any]:
    """The spec to report, and what to hand to ``TaskManager.load`` (a name, or a local task's config)."""
    entry = tm.task_index.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, tm.all_tasks, n=3, cutoff=0.75)
        raise errors.UsageError(f"Unknown task {name!r}.",
                                hint=(f"Did you mean {', '.join(close)}? " if close else "")
                                + "Names come from lm-eval's registry, qtk's own tasks (qtk_cloze) and --tasks-dir.")
    kind = getattr(entry.kind, "name", str(entry.kind)).lower()
    kind = "task" if kind in ("task", "py_task") else kind
    yaml_path = Path(entry.yaml_path) if entry.yaml_path else None
    source = ("local" if _is_under(yaml_path, tasks_dir) else "qtk" if _is_under(yaml_path, shipped_tasks_dir())
              else "lm-eval")
    if source != "lm-eval" and kind == "task" and yaml_path is not None:
        cfg, digest = _local_config(yaml_path)
        dataset = cfg.get("dataset_path")
        local = bool(cfg.get("custom_dataset")) or (dataset in _FILE_BUILDERS and bool(
            (cfg.get("dataset_kwargs") or {}).get("data_files")))
        return TaskSpec(name, source, str(yaml_path), digest, kind, dataset, local), cfg
    dataset = (entry.cfg or {}).get("dataset_path") if kind == "task" else None
    return TaskSpec(name, source, str(yaml_path) if yaml_path else None, None, kind, dataset), name


def load_tasks(names: Sequence[str], tasks_dir: str | os.PathLike | None = None) -> TaskSet:
    """Find every task, read its dataset and build its documents: all before any model loads, so a
    typo or a dataset missing offline fails in seconds (exit 2, or 17 offline / 30 unreachable)."""
    names = parse_task_names(names)
    if not names:
        raise errors.UsageError("--tasks needs at least one task name.")
    tdir = Path(tasks_dir).expanduser() if tasks_dir else None
    if tdir is not None and not tdir.is_dir():
        raise errors.UsageError(f"--tasks-dir {tdir} is not a directory.")
    tm = _managers(names, tdir)
    pairs = [_spec_for(tm, n, tdir) for n in names]
    offline = _offline_wanted() or all(s.local_data for s, _ in pairs)
    objects, report_names = {}, {}
    with datasets_offline(offline):
        for spec, what in pairs:
            try:
                loaded = tm.load([what])
            except errors.QtkError:
                raise
            except Exception as exc:
                raise _load_error(spec, exc, offline) from exc
            objects[spec.name] = loaded
            report_names[spec.name] = sorted(loaded["tasks"]) if spec.kind == "tag" else [spec.name]
    return TaskSet([s for s, _ in pairs], objects, report_names, offline, _lm_eval_version())


def _load_error(spec: TaskSpec, exc: Exception, offline: bool) -> errors.QtkError:
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > 600:
        text = text[:600] + "…"
    where = f"Task {spec.name!r} ({spec.path or 'lm-eval registry'}; dataset {spec.dataset or '?'})"
    netty = isinstance(exc, (ConnectionError, TimeoutError)) or "offline" in text.lower() or "connect" in text.lower()
    if not spec.local_data and offline and (netty or isinstance(exc, FileNotFoundError)):
        return errors.LocalNotFoundError(
            f"{where}: its dataset is not in the local cache and the Hub is offline ({text}).",
            hint="Run once with Hub access (or HF_ENDPOINT=<a qtk serve mirror>) to fill the HF datasets cache, or "
                 "copy the rows to a jsonl and point a --tasks-dir YAML at it (dataset_path: json).")
    if not spec.local_data and netty:
        return errors.NetworkError(f"{where}: its dataset could not be fetched ({text}).",
                                   hint="Check HF_ENDPOINT, or use a --tasks-dir YAML over local files.")
    return errors.UsageError(f"{where} could not be loaded: {text}",
                             hint="Check the task's YAML, its data files and their fields.")


# ----------------------------------------------------------------------------------------- models -> lm-eval


def lm_for(model, *, batch_size: int | str | None = None, max_length: int | None = None, seed: int = 0):
    """lm-eval's LM over a model qtk loaded (:mod:`qtk.verify.models`): HFLM around the same model object
    (its tokenizer copied: HFLM may set a pad token), or qtk's GGUF adapter (``seed``: its sampler's, for a
    task that samples; HF models sample from torch's generator, seeded per task)."""
    if getattr(model, "format", None) == "gguf":
        from .lmeval_gguf import GGUFLM

        return GGUFLM(model, max_length=max_length, seed=seed)
    from lm_eval.models.huggingface import HFLM

    cuda = str(getattr(model.model, "device", "cpu")).startswith("cuda")
    bs = batch_size if batch_size is not None else ("auto" if cuda else 16)
    own = getattr(model.model.config, "max_position_embeddings", None)
    if max_length and own:
        max_length = min(max_length, int(own))
    return HFLM(pretrained=model.model, tokenizer=copy.deepcopy(model.tok), batch_size=bs, max_batch_size=64,
                max_length=max_length)


class _Metered:
    """Counts lm-eval's answers as the model gives them, for progress: documents done of the total.

    lm-eval hands all of a task's requests of one kind to the model in one call (HFLM then sorts and
    batches them as one set: slicing them into calls would cost batches and padding, 1.15-1.25x the CPU
    time on qtk_cloze, measured). Every LM reports each answer to its ``cache_hook`` (lm-eval's request
    cache; HFLM and qtk's GGUF adapter both do): a counting hook stands in for the call's duration."""

    def __init__(self, lm, on_docs: Callable[[int, int], None]) -> None:
        self.lm, self.on_docs = lm, on_docs
        self.seconds = 0.0
        self.docs_done = 0
        self.docs_total = 0

    def run(self, method: str, requests: list) -> list:
        docs = len({(r.task_name, r.doc_id) for r in requests})
        self.docs_total = max(self.docs_total, docs)
        base, answered = self.docs_done, [0]
        self.on_docs(self.docs_done, self.docs_total)  # the clock starts now

        def answer(*_):
            answered[0] += 1
            done = min(base + docs * answered[0] // max(len(requests), 1), self.docs_total)
            if done > self.docs_done:
                self.docs_done = done
                self.on_docs(done, self.docs_total)

        hook = type("CountingHook", (), {"add_partial": staticmethod(answer)})()
        saved = getattr(self.lm, "cache_hook", None)
        self.lm.cache_hook = hook
        t0 = time.monotonic()
        try:
            out = getattr(self.lm, method)(requests)
        finally:
            self.seconds += time.monotonic() - t0
            self.lm.cache_hook = saved
        if self.docs_done < min(base + docs, self.docs_total):  # an LM that reports no answers: at the end
            self.docs_done = min(base + docs, self.docs_total)
            self.on_docs(self.docs_done, self.docs_total)
        return out


def _metered_lm(lm, meter: _Metered):
    """An lm-eval LM (it checks the type) whose three request kinds go through ``meter``; everything else
    (rank, tokenizer, chat template) is the wrapped LM's."""
    from lm_eval.api.model import LM

    class Metered(LM):
        def __init__(self):
            super().__init__()

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return meter.run("loglikelihood", requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return meter.run("loglikelihood_rolling", requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return meter.run("generate_until", requests)

        def __getattr__(self, name):
            return getattr(lm, name)

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return lm.apply_chat_template(chat_history, add_generation_prompt)

        def chat_template(self, chat_template=False):
            return lm.chat_template(chat_template)

        @property
        def tokenizer_name(self):
            return lm.tokenizer_name

        @property
        def rank(self):
            return lm.rank

        @property
        def world_size(self):
            return lm.world_size

    return Metered()


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(seed)


def _configure(loaded: dict, *, num_fewshot: int | None, seed: int) -> None:
    """What lm-eval's simple_evaluate does to tasks before evaluating (without its environment report,
    which shells out to git and pip): few-shot count (a task that pins 0 keeps it) and few-shot seed."""
    for task in loaded["tasks"].values():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)


def evaluate_model(lm, taskset: TaskSet, *, limit: int | None = None, seed: int = 0, num_fewshot: int | None = None,
                   label: str = "", progress=_NO_PROGRESS) -> dict[str, dict]:
    """Every task of ``taskset`` on one model: {result name: task result (see :func:`_task_result`)}.
    ``progress(stage, docs_done, docs_total, None, unit="docs")`` as the model answers."""
    from lm_eval import evaluator

    out: dict[str, dict] = {}
    n = len(taskset.specs)
    for i, spec in enumerate(taskset.specs):
        stage = f"task {i + 1}/{n} {spec.name}{', ' + label if label else ''}: documents"
        meter = _Metered(lm, lambda d, t, stage=stage: progress(stage, d, t, None, unit="docs"))
        loaded = taskset.objects[spec.name]
        _configure(loaded, num_fewshot=num_fewshot, seed=seed)
        _seed_everything(seed)
        with datasets_offline(taskset.offline):
            res = evaluator.evaluate(lm=_metered_lm(lm, meter), task_dict=loaded, limit=limit,
                                     bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False)
        for name in taskset.report_names[spec.name]:
            out[name] = _task_result(res, name, meter)
    return out


def evaluate_all(models: list, taskset: TaskSet, opts, n_ctx: int, progress=_NO_PROGRESS) -> list[dict[str, dict]]:
    """``qtk verify``'s task pass: every loaded model (reference first) on every task, with one context
    window for all (``n_ctx``: what the GGUF was opened with; an HF model's own limit when smaller)."""
    from .._stdio import stdout_to_stderr
    from .report import short_name

    out = []
    for i, m in enumerate(models):
        label = f"model {i + 1}/{len(models)} {short_name(m.name)}"
        with stdout_to_stderr():
            lm = lm_for(m, max_length=n_ctx, seed=opts.seed)
            out.append(evaluate_model(lm, taskset, limit=opts.limit, seed=opts.seed, num_fewshot=opts.num_fewshot,
                                      label=label, progress=progress))
    return out


def _number(v) -> float | None:
    """A metric's value as a float; None for lm-eval's "N/A" (a stderr it did not compute) and the like."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _task_result(res: dict, name: str, meter: _Metered) -> dict:
    """{metric, value, stderr, higher_is_better, metrics (all of them), docs, seconds, docs_per_s, n_shot}.
    ``value`` None: the task reported no metric qtk can read (recovery and gates treat it as missing)."""
    row = (res.get("results") or {}).get(name) or (res.get("groups") or {}).get(name) or {}
    metrics: dict[str, float | None] = {}
    for k, v in row.items():
        if "," not in k or "_stderr" in k:
            continue
        metric, filt = k.split(",", 1)
        metrics[metric if filt == "none" else f"{metric},{filt}"] = _number(v)
    primary = next((m for m in PRIMARY_METRICS if m in metrics), None)
    if primary is None:  # a filtered exact_match (gsm8k: strict-match first), or the first metric it has
        primary = next((m for m in metrics if m.split(",")[0] in PRIMARY_METRICS), next(iter(metrics), None))
    base, _, filt = (primary or "").partition(",")
    stderr = _number(row.get(f"{base}_stderr,{filt or 'none'}")) if primary else None
    hib = ((res.get("higher_is_better") or {}).get(name) or {}).get(base, True)
    n = (res.get("n-samples") or {}).get(name) or {}
    docs = n.get("effective") if n else meter.docs_total
    return {"metric": primary, "value": metrics.get(primary) if primary else None, "stderr": stderr,
            "higher_is_better": bool(hib), "metrics": metrics, "docs": docs, "seconds": round(meter.seconds, 3),
            "docs_per_s": (meter.docs_total / meter.seconds) if meter.seconds > 0 else None,
            "n_shot": (res.get("n-shot") or {}).get(name)}


# --------------------------------------------------------------------------------------------- recovery


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def task_recovery(ref: dict | None, cand: dict | None) -> float | None:
    """candidate / reference accuracy in percent (reference / candidate for a lower-is-better metric);
    None when either is missing or not a finite number, the metrics differ, or the divisor is 0."""
    if not ref or not cand or ref.get("metric") != cand.get("metric"):
        return None
    r, c = ref.get("value"), cand.get("value")
    if not (_finite(r) and _finite(c)):
        return None
    num, den = (c, r) if ref.get("higher_is_better", True) else (r, c)
    return 100.0 * num / den if den > 0 else None


def recovery(ref_tasks: dict[str, dict], cand_tasks: dict[str, dict]) -> dict:
    """{"tasks": {name: pct or None}, "overall": the mean of the per-task recoveries, or None when any is
    missing (a gate on it then fails closed)}. Tasks are the reference's."""
    per = {name: task_recovery(r, cand_tasks.get(name)) for name, r in ref_tasks.items()}
    vals = list(per.values())
    overall = sum(vals) / len(vals) if vals and all(v is not None for v in vals) else None
    return {"tasks": per, "overall": overall}
