"""qtk verify --tasks on the real SmolLM2 weights: the GGUF adapter against a fresh llama.cpp evaluation and
against the dequantized BF16 checkpoint through lm-eval's HFLM (loglikelihood, tokenization, truncation,
rolling loglikelihood, generation), and the whole command on BF16, GPTQ, NF4 and the GGUF through qtk's
own task and lm-eval's arc_easy definition over local rows."""

from __future__ import annotations

import json
import math
import time

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")
pytest.importorskip("lm_eval")

from test_tasks import write_arc_copy  # noqa: E402

from qtk.embedded import shipped_gguf  # noqa: E402
from qtk.verify.gates import Gates, check_gates  # noqa: E402
from qtk.verify.models import GGUFModel, open_model  # noqa: E402
from qtk.verify.tasks import evaluate_model, load_tasks, lm_for  # noqa: E402

PAIRS = [  # (context, continuation): word boundary, trailing space, digits, empty context, a longer continuation
    ("The capital of France is", " Paris"),
    ("The capital of France is", " Berlin"),
    ("The year after 1999 was ", "2000"),
    ("In 2024 there were 12,345", " people in the town."),
    ("", "Hello world"),
    ("Question: Which state of water is ice?\nAnswer:", " solid"),
]


QA_YAML = r"""task: qa
dataset_path: json
dataset_kwargs: {data_files: {test: qa.jsonl}}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{q}}\nAnswer (one word):"
doc_to_target: "{{a}}"
generation_kwargs: {until: ["\n", "."], max_gen_toks: 8, do_sample: false}
filter_list:
  - name: word
    filter:
      - {function: regex, regex_pattern: "(\\w+)"}
      - {function: take_first}
metric_list:
  - {metric: exact_match, ignore_case: true, aggregation: mean, higher_is_better: true}
"""


def instances(pairs, kind="loglikelihood"):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=p, idx=0, metadata=("t", i, 1)) for i, p in enumerate(pairs)]


@pytest.fixture(scope="module")
def gguf_model():
    return GGUFModel(shipped_gguf(), "smol.gguf", 1, 2048)  # one thread: CI's 2 cores are shared


@pytest.fixture(scope="module")
def hf_model(smol_bf16):
    return open_model(str(smol_bf16), device="cpu")


def test_gguf_loglikelihood_reuses_the_cache_exactly_and_agrees_with_hf(gguf_model, hf_model):
    g, h = lm_for(gguf_model), lm_for(hf_model)
    assert g.prefix_reuse  # llama architecture: the probe found rewinding the KV cache exact
    for text in ("In 1999 there were 12,345 people.", "x = 3.14159 * 2", "The Sun"):
        assert g.tok_encode(text) == h.tok_encode(text)  # qtk's BF16 tokenizer splits digits like llama.cpp
    for ctx, cont in PAIRS[:4] + PAIRS[5:]:
        assert g._encode_pair(ctx, cont) == h._encode_pair(ctx, cont)
    reused = g.loglikelihood(instances(PAIRS))
    g.prefix_reuse = False
    try:
        fresh = g.loglikelihood(instances(PAIRS))
    finally:
        g.prefix_reuse = True
    assert [b for _, b in reused] == [b for _, b in fresh]
    assert all(math.isclose(a, b, abs_tol=2e-3) for (a, _), (b, _) in zip(reused, fresh)), (reused, fresh)
    hf = h.loglikelihood(instances(PAIRS))
    # same weights (Q4_1 dequantized to BF16), two runtimes: log-probs close, same preferred answer
    for (a, _), (b, _), (ctx, cont) in zip(reused, hf, PAIRS):
        n = len(g._encode_pair(ctx, cont)[1]) if ctx else len(g.tok_encode(cont))
        assert abs(a - b) < 0.12 * n + 0.08 * abs(b), (ctx, cont, n, a, b)  # unlikely tokens differ more
    assert reused[0][0] > reused[1][0] and hf[0][0] > hf[1][0]  # Paris over Berlin
    assert reused[0][1] and hf[0][1]  # " Paris" is the greedy continuation in both


def test_gguf_context_longer_than_the_window_is_cut_on_the_left(gguf_model):
    small = GGUFModel(shipped_gguf(), "smol-64.gguf", 1, 64)
    long_ctx = " ".join(f"Line {i} says the sky is blue." for i in range(30)) + " The colour of the sky is"
    (got, _), = lm_for(small).loglikelihood(instances([(long_ctx, " blue")]))
    big = lm_for(gguf_model)
    ctx, cont = big._encode_pair(long_ctx, " blue")
    assert len(ctx) + len(cont) > 65
    whole = (ctx + cont)[-65:]  # HFLM's rule: the last max_length + 1 tokens, the last one only predicted
    want, _ = big._score(whole[: -len(cont)], whole[-len(cont):])
    assert math.isclose(got, want, abs_tol=2e-3), (got, want)


def test_rolling_loglikelihood_and_generation_through_lm_eval_tasks(gguf_model, hf_model, tmp_path):
    """Two local task YAMLs (a loglikelihood_rolling one, a generate_until one) on the GGUF adapter and on
    HFLM, with a 64-token window so the rolling windows are many: same numbers up to the runtimes."""
    d = tmp_path / "tasks"
    d.mkdir()
    texts = [" ".join(f"Sentence {i}.{j}: water boils at one hundred degrees and freezes at zero." for j in range(6))
             for i in range(2)]
    (d / "roll.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (d / "roll.yaml").write_text("task: roll\ndataset_path: json\ndataset_kwargs: {data_files: {test: roll.jsonl}}\n"
                                 "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                                 "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
                                 "  - metric: bits_per_byte\n")
    qa = [("What is the capital of France?", "Paris"), ("What is the capital of Japan?", "Tokyo")]
    (d / "qa.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in qa))
    (d / "qa.yaml").write_text(QA_YAML)
    ts = load_tasks(["roll", "qa"], d)
    got = {name: evaluate_model(lm_for(m, max_length=64), ts) for name, m in (("gguf", gguf_model), ("hf", hf_model))}
    for name in ("gguf", "hf"):
        assert got[name]["roll"]["metric"] == "word_perplexity" and got[name]["roll"]["docs"] == 2
        assert got[name]["qa"]["metric"].startswith("exact_match") and got[name]["qa"]["docs"] == 2
        assert not got[name]["roll"]["higher_is_better"]
    g, h = got["gguf"]["roll"]["value"], got["hf"]["roll"]["value"]
    assert 1 < g < 1e4 and abs(g / h - 1) < 0.05, (g, h)
    # greedy, stopped at "\n"/".", first word: both answer Paris; for Japan llama.cpp says Tokyo and the BF16 copy
    # Japan (measured; greedy choices may differ on near ties between two runtimes)
    assert got["gguf"]["qa"]["value"] >= 0.5 and got["hf"]["qa"]["value"] >= 0.5


@pytest.fixture(scope="module")
def quantized(smol_bf16, tmp_path_factory):
    """GPTQ (group 64: SmolLM2's widths) and NF4 of the real model, built once for this module."""
    from qtk.quantize.base import QuantizeOptions
    from qtk.quantize.run import quantize

    root = tmp_path_factory.mktemp("tq")
    t0 = time.monotonic()
    gptq = quantize(str(smol_bf16), root / "gptq", QuantizeOptions(method="gptq", group_size=64, samples=8,
                                                                    seq_len=128, calibration="chat")).out
    nf4 = quantize(str(smol_bf16), root / "nf4", QuantizeOptions(method="nf4")).out
    print(f"quantized GPTQ + NF4 in {time.monotonic() - t0:.0f} s")
    return {"gptq": gptq, "nf4": nf4}


def test_verify_tasks_on_bf16_gptq_nf4_and_gguf(qtk, smol_bf16, quantized, tmp_path):
    """One run: every model loaded once, qtk_cloze and lm-eval's arc_easy definition over local rows, the
    report's task numbers, and a recovery gate that fails every candidate (exit 3, each named)."""
    tasks_dir = tmp_path / "tasks"
    write_arc_copy(tasks_dir)
    gguf = str(shipped_gguf())
    t0 = time.monotonic()
    r = qtk("verify", str(smol_bf16), str(quantized["gptq"]), str(quantized["nf4"]), gguf, "--max-tokens", "512",
            "--no-smoke", "--threads", "1", "--tasks", "qtk_cloze,arc_easy_local", "--tasks-dir", str(tasks_dir), "--limit", "12",
            "--min-recovery", "1000", "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md"))
    print(f"qtk verify, 4 models x 2 tasks: {time.monotonic() - t0:.0f} s")
    assert r.exit_code == 3, r.stderr[-3000:]
    for cand in (quantized["gptq"], quantized["nf4"], gguf):
        assert f"{cand}: task accuracy recovery" in r.stderr and "< 1000.0%" in r.stderr
    assert "task 2/2 arc_easy_local, model 4/4" in r.stderr and "docs/s" in r.stderr  # progress
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["protocol"]["tasks"]["limit"] == 12 and doc["versions"]["lm_eval"]
    assert [m["format"] for m in doc["models"]] == ["bf16", "gptq", "nf4", "gguf"]
    for m in doc["models"]:
        cloze, arc = m["tasks"]["qtk_cloze"], m["tasks"]["arc_easy_local"]
        assert (cloze["docs"], arc["docs"], cloze["metric"], arc["metric"]) == (12, 3, "acc", "acc")
        assert 0 <= cloze["value"] <= 1 and cloze["stderr"] > 0 and cloze["docs_per_s"] > 0
    ref, *cands = doc["models"]
    assert ref["recovery"] is None and ref["tasks"]["qtk_cloze"]["value"] >= 0.5  # chance is 0.25
    for m in cands:
        per = m["recovery"]["tasks"]
        want = {t: 100 * m["tasks"][t]["value"] / ref["tasks"][t]["value"] for t in per}
        assert per == pytest.approx(want) and m["recovery"]["overall"] == pytest.approx(sum(want.values()) / 2)
    gg = cands[2]["tasks"]["qtk_cloze"]["value"]
    assert abs(gg - ref["tasks"]["qtk_cloze"]["value"]) <= 2 / 12  # same weights: at most two answers differ
    for m in doc["models"]:
        m["gate_failures"] = []
    assert check_gates(doc, Gates(min_recovery_pct=1, min_task_recovery_pct=1)) == []
    md = (tmp_path / "r.md").read_text()
    assert "## Task accuracy" in md and "qtk_cloze recovery" in md and "`arc_easy_local` (local" in md


def test_the_reference_against_itself_recovers_exactly(smol_bf16):
    """The same task objects, document order and seed for every model: the reference twice is 100%."""
    from qtk.verify.run import VerifyOptions, verify

    rep = verify(str(smol_bf16), [str(smol_bf16)],
                 VerifyOptions(max_tokens=512, smoke=False, tasks=("qtk_cloze",), limit=8, device="cpu"))
    a, b = rep["models"]
    assert a["tasks"]["qtk_cloze"]["value"] == b["tasks"]["qtk_cloze"]["value"]
    assert b["recovery"] == {"tasks": {"qtk_cloze": 100.0}, "overall": 100.0}
    assert rep["protocol"]["tasks"]["tasks"][0]["source"] == "qtk"
