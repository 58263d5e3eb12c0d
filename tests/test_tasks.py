"""qtk verify --tasks without loading a model: task names, where tasks come from (qtk's own, --tasks-dir
with local data, lm-eval's registry with a real task definition over local rows, a dataset served by
`qtk serve` then read offline from the HF datasets cache), bad task inputs, recovery, the recovery gates
(failing closed on missing and non-finite values), the manifest's task options, the report and progress."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtk import errors
from qtk.verify.gates import Gates, check_gates
from qtk.verify.tasks import parse_task_names, recovery, task_recovery

ARC_ROWS = [  # ARC's own format (id, question, choices {text, label}, answerKey), written for this test
    {"id": "t1", "question": "Which of these gives off its own light?",
     "choices": {"text": ["the Sun", "the Moon", "a mirror", "a rock"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "t2", "question": "What do plants need to make food?",
     "choices": {"text": ["darkness", "sunlight", "plastic", "salt"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
    {"id": "t3", "question": "Which state of water is ice?",
     "choices": {"text": ["gas", "liquid", "solid"], "label": ["A", "B", "C"]}, "answerKey": "C"},
]


def write_arc_copy(tasks_dir: Path, name: str = "arc_easy_local", rows=ARC_ROWS) -> Path:
    """A local copy of lm-eval's arc_easy: its own YAML (included, unchanged) over a few rows in jsonl."""
    import lm_eval

    tasks_dir.mkdir(parents=True, exist_ok=True)
    (tasks_dir / "data").mkdir(exist_ok=True)
    for split in ("train", "validation", "test"):
        (tasks_dir / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    arc = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    yaml = tasks_dir / f"{name}.yaml"
    yaml.write_text(f"include: {arc}\ntask: {name}\ntag: []\ndataset_path: json\ndataset_name: null\n"
                    "dataset_kwargs:\n  data_files:\n    train: data/train.jsonl\n    validation: data/validation.jsonl\n"
                    "    test: data/test.jsonl\n")
    return yaml


# ------------------------------------------------------------------------------------------- task names

@pytest.mark.parametrize("values, expected", [
    (["qtk_cloze"], ["qtk_cloze"]),
    (["arc_easy,hellaswag", "arc_easy", " piqa "], ["arc_easy", "hellaswag", "piqa"]),
    (["mmlu_pro", "a.b-c+d"], ["mmlu_pro", "a.b-c+d"]),
    ([",,", ""], []),
])
def test_task_names_are_split_deduplicated_and_kept_in_order(values, expected):
    assert parse_task_names(values) == expected


@pytest.mark.parametrize("bad", ["../etc/passwd", "a b", "x;rm -rf", "/abs/path.yaml", "-flag", "name\x00", "ü", "a" * 201])
def test_task_names_that_are_not_names_are_refused(bad):
    with pytest.raises(errors.UsageError) as e:
        parse_task_names([bad])
    assert e.value.exit_code == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_any_task_option_either_parses_to_safe_names_or_is_a_usage_error(values):
    try:
        names = parse_task_names(values)
    except errors.UsageError:
        return
    for n in names:
        assert n and "/" not in n and ".." not in n[:2] and n.isascii() and not n.startswith("-")


# -------------------------------------------------------------------------------------------- recovery

def row(value, metric="acc", hib=True):
    return {"metric": metric, "value": value, "higher_is_better": hib}


@pytest.mark.parametrize("ref, cand, expected", [
    (row(0.8), row(0.6), 75.0),
    (row(0.5), row(0.55), 110.0),
    (row(20.0, "word_perplexity", False), row(25.0, "word_perplexity", False), 80.0),  # lower is better
    (row(0.0), row(0.5), None),  # nothing to recover
    (row(0.8), row(float("nan")), None),
    (row(float("inf")), row(0.5), None),
    (row(0.8), row(None), None),
    (row(0.8), None, None),  # the candidate lacks the task
    (row(0.8), row(0.8, "acc_norm"), None),  # not the same metric
    (row(0.8), row(True), None),  # a bool is not an accuracy
])
def test_task_recovery(ref, cand, expected):
    got = task_recovery(ref, cand)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_overall_recovery_is_the_mean_and_missing_when_any_task_is():
    ref = {"a": row(0.8), "b": row(0.5)}
    assert recovery(ref, {"a": row(0.6), "b": row(0.55)}) == {"tasks": {"a": 75.0, "b": pytest.approx(110.0)},
                                                              "overall": pytest.approx(92.5)}
    rec = recovery(ref, {"a": row(0.6)})
    assert rec["tasks"]["b"] is None and rec["overall"] is None


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdef"), st.tuples(st.floats(0.01, 1), st.floats(0, 1)), min_size=1))
def test_recovery_properties(pairs):
    ref = {k: row(r) for k, (r, _) in pairs.items()}
    cand = {k: row(c) for k, (_, c) in pairs.items()}
    rec = recovery(ref, cand)
    per = list(rec["tasks"].values())
    assert all(math.isclose(p, 100 * cand[k]["value"] / ref[k]["value"]) for k, p in rec["tasks"].items())
    assert min(per) - 1e-9 <= rec["overall"] <= max(per) + 1e-9
    assert recovery(ref, ref)["overall"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------ gates

def report_with(*recoveries) -> dict:
    models = [{"name": "ref", "gate_failures": [], "smoke": []}]
    models += [{"name": f"cand{i}", "gate_failures": [], "smoke": [], "recovery": r} for i, r in enumerate(recoveries)]
    return {"models": models}


@pytest.mark.parametrize("rec, gates, expected", [
    ({"tasks": {"a": 99.0, "b": 97.0}, "overall": 98.0}, Gates(min_recovery_pct=95), []),
    ({"tasks": {"a": 99.0, "b": 89.0}, "overall": 94.0}, Gates(min_recovery_pct=95),
     ["task accuracy recovery 94.0% < 95%"]),
    ({"tasks": {"a": 99.0, "b": 89.0}, "overall": 94.0}, Gates(min_task_recovery_pct=90),
     ["task accuracy recovery (b) 89.0% < 90%"]),
    (None, Gates(min_recovery_pct=1), ["task accuracy recovery not measured"]),  # no --tasks: fails closed
    (None, Gates(min_task_recovery_pct=1), ["task accuracy recovery not measured"]),
    ({"tasks": {"a": 99.0, "b": None}, "overall": None}, Gates(min_recovery_pct=1),
     ["task accuracy recovery not measured"]),
    ({"tasks": {"a": 99.0, "b": None}, "overall": None}, Gates(min_task_recovery_pct=1),
     ["task accuracy recovery not measured (no --tasks, or a task's accuracy missing or not finite) (b)"]),
    ({"tasks": {"a": float("nan")}, "overall": float("nan")}, Gates(min_recovery_pct=1),
     ["task accuracy recovery is not a finite number (nan)"]),
    ({"tasks": {"a": 120.0, "b": float("nan")}, "overall": 100.0}, Gates(min_task_recovery_pct=1),
     ["task accuracy recovery (b) is not a finite number (nan)"]),
    ({"tasks": {}, "overall": None}, Gates(min_task_recovery_pct=1), ["task accuracy recovery not measured"]),
])
def test_recovery_gates_fail_closed(rec, gates, expected):
    report = report_with(rec)
    failures = check_gates(report, gates)
    assert len(failures) == len(expected)
    for f, e in zip(failures, expected):
        assert f.startswith("cand0: ") and e in f, f
    assert report["models"][1]["gate_failures"] == [f.split(": ", 1)[1] for f in failures]


@pytest.mark.parametrize("option", ["--min-recovery", "--min-task-recovery"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "NaN"])
def test_recovery_gate_limits_that_are_not_finite_are_refused(qtk, tmp_path, option, value):
    r = qtk("verify", str(tmp_path / "ref"), str(tmp_path / "cand"), "--tasks", "qtk_cloze", f"{option}={value}")
    assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.stderr, r.stderr


@pytest.mark.parametrize("args, words", [
    (["--min-recovery", "95"], "min_recovery_pct compares task accuracy: give --tasks"),
    (["--min-task-recovery", "95"], "give --tasks"),
    (["--tasks-dir", "."], "apply to --tasks"),
    (["--limit", "5"], "apply to --tasks"),
    (["--tasks", "qtk_cloze", "--limit", "0"], "Invalid value for '--limit'"),
    (["--tasks", "qtk_cloze", "--num-fewshot", "-1"], "Invalid value for '--num-fewshot'"),
    (["--tasks", "../x"], "is not a task name"),
])
def test_task_options_are_checked_before_anything_loads(qtk, tmp_path, args, words):
    pytest.importorskip("numpy")  # verify's body needs its extra (without it: exit 50, tested in test_inputs.py)
    r = qtk("verify", str(tmp_path / "ref"), str(tmp_path / "cand"), *args)
    assert r.exit_code == 2 and words in r.stderr, r.stderr


# --------------------------------------------------------------------------------------------- manifest

MANIFEST = 'store = "s"\n[[models]]\nrepo = "acme/x"\n[[models.recipes]]\nmethod = "nf4"\n'


def test_manifest_takes_tasks_and_the_recovery_gates(tmp_path):
    from qtk.provision.manifest import load_manifest

    m = tmp_path / "m.toml"
    m.write_text('store = "s"\n[defaults.verify]\ntasks = ["qtk_cloze", "arc_easy"]\ntasks_dir = "my-tasks"\n'
                 'limit = 50\nnum_fewshot = 0\n[defaults.gates]\nmin_recovery_pct = 95\nmin_task_recovery_pct = 90.5\n'
                 + MANIFEST.split("\n", 1)[1])
    spec = load_manifest(m).models[0]
    assert spec.verify["tasks"] == ["qtk_cloze", "arc_easy"] and spec.verify["limit"] == 50
    assert spec.verify["tasks_dir"] == str(tmp_path / "my-tasks")  # relative to the manifest
    assert spec.recipes[0].gates == {"min_recovery_pct": 95, "min_task_recovery_pct": 90.5}


@pytest.mark.parametrize("text, words", [
    ("[defaults.verify]\nlimit = 0\n", "defaults.verify.limit: must be positive"),
    ("[defaults.verify]\nnum_fewshot = -1\n", "verify.num_fewshot: must be >= 0"),
    ('[defaults.verify]\ntasks = "qtk_cloze"\n', "defaults.verify.tasks"),
    ("[defaults.gates]\nmin_recovery_pct = nan\n", "defaults.gates.min_recovery_pct: must be a finite number"),
    ("[defaults.gates]\nmin_task_recovery_pct = -3\n", "must be >= 0"),
    ("[defaults.gates]\nmin_recovery = 95\n", "did you mean 'min_recovery_pct'?"),
])
def test_manifest_refuses_bad_task_options(tmp_path, text, words):
    from qtk.provision.manifest import ManifestError, load_manifest

    m = tmp_path / "m.toml"
    m.write_text('store = "s"\n' + text + MANIFEST.split("\n", 1)[1])
    with pytest.raises(ManifestError, match=words):
        load_manifest(m)


def test_task_inputs_change_with_the_task_files_only(tmp_path):
    """provision's verify key: a changed row of a local task changes it; the same files do not."""
    from qtk.verify.tasks import task_inputs

    d = tmp_path / "t"
    d.mkdir()
    (d / "x.yaml").write_text("task: x\n")
    (d / "x.jsonl").write_text('{"a": 1}\n')
    one = task_inputs(["x"], str(d), 10, None)
    assert one == task_inputs(["x"], str(d), 10, None) and one["tasks_dir_sha256"]
    (d / "x.jsonl").write_text('{"a": 2}\n')
    assert task_inputs(["x"], str(d), 10, None)["tasks_dir_sha256"] != one["tasks_dir_sha256"]
    assert task_inputs(["x"], str(d), 11, None) != task_inputs(["x"], str(d), 10, None)


def test_task_inputs_ignore_the_bytecode_a_task_function_leaves(tmp_path):
    """A --tasks-dir YAML with `!function utils.f` makes lm-eval import utils.py, and Python writes
    __pycache__/utils.*.pyc beside it: the verify key must not change because a run happened (a second
    `qtk provision` would verify again), nor when another Python version writes its own bytecode."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks._yaml_loader import load_yaml

    from qtk.verify.tasks import task_inputs

    d = tmp_path / "t"
    d.mkdir()
    (d / "utils.py").write_text("def process_docs(ds):\n    return ds\n")
    (d / "x.yaml").write_text("task: x\nprocess_docs: !function utils.process_docs\n")
    before = task_inputs(["x"], str(d), 10, None)
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = False
    try:
        load_yaml(d / "x.yaml", resolve_func=True)  # what lm-eval does when it reads the task
    finally:
        sys.dont_write_bytecode = dont_write
    assert list((d / "__pycache__").glob("utils.*.pyc"))
    (d / "__pycache__" / "utils.cpython-399.pyc").write_bytes(b"another Python's bytecode")
    assert task_inputs(["x"], str(d), 10, None) == before


# ----------------------------------------------------------------------------------- progress, report

class _Req:
    def __init__(self, task, doc, text=""):
        self.task_name, self.doc_id, self.args = task, doc, (text, " a")


def test_progress_counts_answers_in_one_call_per_request_kind():
    """All requests reach the model in one call (its own batching intact); each answer it reports to its
    cache hook moves the documents counter; the LM's own hook is put back; answers pass through."""
    from qtk.verify.tasks import _Metered

    calls, reports, own_hook = [], [], object()

    class LM:
        cache_hook = own_hook

        def loglikelihood(self, reqs):
            calls.append(reqs)
            for r in reqs:
                self.cache_hook.add_partial("loglikelihood", r.args, (0.0, True))
            return [r.args for r in reqs]

    class Silent(LM):  # an LM that never reports its answers: progress at the end of the call
        def loglikelihood(self, reqs):
            return [r.args for r in reqs]

    reqs = [_Req("t", d, "x" * (d % 7 + 1)) for d in range(40) for _ in range(4)] + [_Req("u", 0, "y")] * 3
    lm = LM()
    meter = _Metered(lm, lambda done, total: reports.append((done, total)))
    assert meter.run("loglikelihood", reqs) == [r.args for r in reqs] and len(calls) == 1
    assert lm.cache_hook is own_hook
    done = [d for d, _ in reports]
    assert reports[0] == (0, 41) and reports[-1] == (41, 41) and done == sorted(done) and len(done) > 30
    quiet = []
    assert _Metered(Silent(), lambda d, t: quiet.append((d, t))).run("loglikelihood", reqs) == [r.args for r in reqs]
    assert quiet == [(0, 41), (41, 41)]


def test_progress_line_shows_documents_per_second():
    from rich.console import Console

    from qtk.cli._progress import StepProgress

    con = Console(file=io.StringIO(), force_terminal=False)
    lines = []
    con.print = lambda text, **k: lines.append(text)  # noqa: E731
    p = StepProgress(con)
    p("task 1/2 qtk_cloze, model 1/3 smol: documents", 0, 40, None, unit="docs")
    p._t0 -= 10  # ten seconds later
    p("task 1/2 qtk_cloze, model 1/3 smol: documents", 20, 40, None, unit="docs")
    assert "20/40" in lines[-1] and "2.0 docs/s" in lines[-1] and "ETA 10s" in lines[-1]


def synthetic_report() -> dict:
    models = []
    for i, (fmt, acc) in enumerate([("bf16", 0.8), ("gptq", 0.7), ("gguf", None)]):
        tasks = {"qtk_cloze": {"metric": "acc", "value": acc, "stderr": 0.04 if acc else None, "docs": 100,
                               "docs_per_s": 10.0 + i, "higher_is_better": True},
                 "arc_easy": {"metric": "acc", "value": 0.5, "stderr": 0.05, "docs": 100, "docs_per_s": 8.0,
                              "higher_is_better": True}}
        models.append({"name": f"/m/model-{fmt}", "format": fmt, "role": "reference" if i == 0 else "candidate",
                       "size_bytes": 1e8 * (3 - i), "perplexity": {"ppl": 10.0 + i, "stderr": 0.2}, "smoke": [],
                       "prefill_tps": 100.0, "load_s": 1.0, "tasks": tasks, "gate_failures": [],
                       "recovery": None if i == 0 else recovery(tasks and models[0]["tasks"], tasks)})
    return {"models": models, "hardware": {"device": "cpu"},
            "protocol": {"ctx": 512, "text": "prose-heldout", "text_sha256": "0" * 64,
                         "tasks": {"tasks": [{"name": "qtk_cloze", "source": "qtk", "sha256": "ab" * 32},
                                             {"name": "arc_easy", "source": "lm-eval", "sha256": None}],
                                   "limit": 100, "seed": 0, "num_fewshot": None, "lm_eval": "0.4.13"}},
            "versions": {"qtk": "0"}}


def test_report_shows_accuracy_beside_perplexity_and_recovery(tmp_path):
    from rich.console import Console

    from qtk.verify.report import markdown, task_columns, task_rows, table

    rep = synthetic_report()
    assert task_columns(rep) == ["model", "format", "ppl", "qtk_cloze acc", "qtk_cloze recovery", "arc_easy acc",
                                 "arc_easy recovery", "recovery (mean)", "docs/s"]
    rows = task_rows(rep)
    assert rows[0][3:5] == ["80.0 ± 4.0", "ref"] and rows[1][3:5] == ["70.0 ± 4.0", "87.5%"]
    assert rows[1][7] == "93.8%" and rows[2][3:5] == ["—", "—"] and rows[2][7] == "—"  # missing: no overall
    con = Console(width=250, record=True, file=io.StringIO())
    con.print(table(rep))
    text = con.export_text()
    assert "task accuracy (lm-eval 0.4.13, first 100 documents" in text and "87.5%" in text
    md = markdown(rep)
    assert "## Task accuracy" in md and "| model-gptq | gptq | 11.000 | 70.0 ± 4.0 | 87.5% |" in md
    assert "`qtk_cloze` (qtk, sha256 `abababababab…`)" in md


def test_plot_has_a_task_panel_only_with_tasks(tmp_path):
    pytest.importorskip("matplotlib")
    from qtk.verify.report import plot

    rep = synthetic_report()
    legend = plot(rep, tmp_path / "t.png")
    assert len(legend.figure.axes) == 3 and legend.figure.axes[2].get_title().startswith("task accuracy")
    for m in rep["models"]:
        m.pop("tasks")
    assert len(plot(rep, tmp_path / "p.png").figure.axes) == 2


# ------------------------------------------------------------------------------- tasks through lm-eval

@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval")


def test_the_shipped_task_loads_offline_from_package_data(lm_eval):
    from qtk.verify.tasks import load_tasks, shipped_tasks_dir

    ts = load_tasks(["qtk_cloze"])
    spec = ts.specs[0]
    assert (spec.source, spec.kind, spec.local_data, ts.offline) == ("qtk", "task", True, True)
    assert Path(spec.path) == shipped_tasks_dir() / "qtk_cloze.yaml" and len(spec.sha256) == 64
    task = ts.objects["qtk_cloze"]["tasks"]["qtk_cloze"]
    docs = list(task.test_docs())
    assert len(docs) == 100 and {d["kind"] for d in docs[:8]} == {"fact", "sense", "word", "count"}
    assert task.doc_to_text(docs[0]) == "The capital of France is"
    assert task.doc_to_choice(docs[0])[task.doc_to_target(docs[0])] == "Paris"


def test_a_real_lm_eval_task_definition_over_local_rows(lm_eval, tmp_path):
    """lm-eval's own arc_easy YAML (included unchanged) over three rows in ARC's format, with relative
    data_files: the prompt, the choices and the gold answer (letter and digit labels) come out right."""
    from qtk.verify.tasks import load_tasks

    write_arc_copy(tmp_path / "tasks")
    ts = load_tasks(["arc_easy_local"], tmp_path / "tasks")
    spec = ts.specs[0]
    assert (spec.source, spec.dataset, spec.local_data, ts.offline) == ("local", "json", True, True)
    task = ts.objects["arc_easy_local"]["tasks"]["arc_easy_local"]
    docs = list(task.test_docs())
    assert [task.doc_to_text(d) for d in docs][:1] == ["Question: Which of these gives off its own light?\nAnswer:"]
    assert [task.doc_to_choice(d)[task.doc_to_target(d)] for d in docs] == ["the Sun", "sunlight", "solid"]
    assert [m["metric"] for m in task.config.metric_list] == ["acc", "acc_norm"]


def test_a_tasks_dir_task_shadows_a_registry_name(lm_eval, tmp_path):
    from qtk.verify.tasks import load_tasks

    write_arc_copy(tmp_path / "tasks", name="arc_easy")
    ts = load_tasks(["arc_easy"], tmp_path / "tasks")
    assert ts.specs[0].source == "local" and len(list(ts.objects["arc_easy"]["tasks"]["arc_easy"].test_docs())) == 3


@pytest.mark.parametrize("yaml, files, code, words", [
    (("task: t\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: nowhere.jsonl\ntest_split: test\n"
      "output_type: multiple_choice\ndoc_to_text: x\ndoc_to_target: 0\ndoc_to_choice: [a, b]\n"), {},
     2, "data file"),
    (("task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: d.jsonl}}\ntest_split: test\n"
      "output_type: multiple_choice\ndoc_to_text: x\ndoc_to_target: 0\ndoc_to_choice: [a, b]\n"),
     {"d.jsonl": "this is not json\n"}, 2, "could not be loaded"),
    ("task: t\ninclude: missing_base.yaml\n", {}, 2, "cannot be read"),
    ("task: t\ndataset_path: json\n  bad: indentation\n", {}, 2, "cannot be read"),
])
def test_bad_task_files(lm_eval, tmp_path, yaml, files, code, words):
    from qtk.verify.tasks import load_tasks

    d = tmp_path / "tasks"
    d.mkdir()
    (d / "t.yaml").write_text(yaml)
    for name, text in files.items():
        (d / name).write_text(text)
    with pytest.raises(errors.QtkError) as e:
        load_tasks(["t"], d)
    assert e.value.exit_code == code and words in str(e.value), str(e.value)


def test_unknown_task_suggests_close_names_and_a_missing_dir_is_refused(lm_eval, qtk, tmp_path):
    from qtk.verify.tasks import load_tasks

    with pytest.raises(errors.UsageError) as e:
        load_tasks(["qtk_clozee"])
    assert "Unknown task 'qtk_clozee'" in str(e.value) and "qtk_cloze" in e.value.hint
    r = qtk("verify", str(tmp_path), "--tasks", "qtk_cloze", "--tasks-dir", str(tmp_path / "nope"))
    assert r.exit_code == 2


def test_a_registry_task_offline_without_its_dataset_is_exit_17(lm_eval, monkeypatch):
    from qtk.verify.tasks import load_tasks

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # HF_HOME is this test's own: an empty cache
    with pytest.raises(errors.LocalNotFoundError) as e:
        load_tasks(["arc_easy"])
    assert e.value.exit_code == 17 and "allenai/ai2_arc" in str(e.value) and "--tasks-dir" in e.value.hint


def test_datasets_offline_is_scoped(lm_eval):
    import datasets.config as dconf
    import huggingface_hub.constants as hconst

    from qtk.verify.tasks import datasets_offline

    before = (dconf.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE"))
    with datasets_offline(True):
        assert dconf.HF_HUB_OFFLINE and hconst.HF_HUB_OFFLINE and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert (dconf.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE")) == before


def test_a_dataset_served_by_qtk_serve_then_read_offline_from_the_cache(lm_eval, tmp_path):
    """A cluster without the Hub: lm-eval's arc_easy definition over a dataset repo that `qtk serve`
    mirrors (HF_ENDPOINT), then, with the mirror gone and HF_HUB_OFFLINE=1, from the HF datasets cache."""
    repo = tmp_path / "store" / "datasets" / "acme" / "arc-mini"
    (repo / "ARC-Easy").mkdir(parents=True)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: ARC-Easy\n  data_files:\n"
                                    + "".join(f"  - split: {s}\n    path: ARC-Easy/{s}.jsonl\n"
                                              for s in ("train", "validation", "test")) + "---\n")
    for s in ("train", "validation", "test"):
        (repo / "ARC-Easy" / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARC_ROWS))
    (tmp_path / "tasks").mkdir()
    arc = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    (tmp_path / "tasks" / "arc_mirror.yaml").write_text(f"include: {arc}\ntask: arc_mirror\ntag: []\n"
                                                        "dataset_path: acme/arc-mini\n")
    # in a fresh process: huggingface_hub and datasets read HF_ENDPOINT and HF_HOME once, at import
    probe = ("import json, sys; from qtk.verify.tasks import load_tasks; ts = load_tasks(['arc_mirror'], sys.argv[1]); "
             "t = ts.objects['arc_mirror']['tasks']['arc_mirror']; "
             "print(json.dumps([ts.offline, ts.specs[0].dataset, [d['id'] for d in t.test_docs()]]))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    srv = subprocess.Popen([sys.executable, "-m", "qtk", "serve", str(tmp_path / "store"), "--port", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        env["HF_ENDPOINT"] = srv.stdout.readline().strip()
        online = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "tasks")], env=env,
                                capture_output=True, text=True, timeout=300)
    finally:
        srv.terminate()
        srv.wait()
    assert online.returncode == 0, online.stderr[-2000:]
    assert json.loads(online.stdout.splitlines()[-1]) == [False, "acme/arc-mini", ["t1", "t2", "t3"]]
    env["HF_HUB_OFFLINE"] = "1"  # the mirror is gone: the HF datasets cache answers
    offline = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "tasks")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert json.loads(offline.stdout.splitlines()[-1]) == [True, "acme/arc-mini", ["t1", "t2", "t3"]]
    assert (tmp_path / "hf" / "datasets").is_dir()
