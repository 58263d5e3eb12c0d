"""qtk verify on the real SmolLM2 weights: the GGUF and its dequantized BF16 checkpoint, quantized
outputs, an independent perplexity computation, self-KL, gates and bad inputs."""

import json
import math

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from qtk import errors  # noqa: E402
from qtk.embedded import shipped_gguf  # noqa: E402
from qtk.verify.run import VerifyOptions, load_text, verify  # noqa: E402

OPTS = VerifyOptions(max_tokens=1024, smoke=False)  # 2 windows of 512: 510 scored tokens per model


@pytest.fixture(scope="module")
def gguf() -> str:
    return str(shipped_gguf())


@pytest.fixture(scope="module")
def base_report(smol_bf16, gguf):
    return verify(str(smol_bf16), [gguf], OPTS)


def test_gguf_and_its_dequantized_checkpoint_agree(base_report):
    """Same weights, one protocol: the perplexities must agree closely. Measured here: HF BF16 vs
    llama.cpp on the Q4_1 file differ by < 1% (the BF16 copy rounds the dequantized weights, and the
    two runtimes accumulate differently); KL mean ~0.004, top-1 ~97%. Tolerance: 3%."""
    ref, gg = base_report["models"]
    assert gg["format"] == "gguf" and ref["format"] == "bf16"
    assert gg["tokenization_match"] == 1.0  # the digit-splitting fix makes the tokenizers agree
    assert ref["perplexity"]["tokens_scored"] == gg["perplexity"]["tokens_scored"] == 510
    ratio = gg["perplexity"]["ppl"] / ref["perplexity"]["ppl"]
    assert abs(ratio - 1) < 0.03, ratio
    assert gg["kl"]["mean"] < 0.02 and gg["kl"]["top1_agreement"] > 0.9


def test_hf_perplexity_equals_a_plain_torch_loop(smol_bf16, base_report):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_bf16)
    model = AutoModelForCausalLM.from_pretrained(smol_bf16, dtype=torch.float32).eval()  # qtk's CPU compute dtype
    text, _ = load_text("prose-heldout", None)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    for start in (0, 512):
        x = torch.tensor([ids[start : start + 512]])
        with torch.no_grad():
            logits = model(x).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits[256:511], x[0, 257:512], reduction="sum").item()
        n += 255
    assert n == base_report["models"][0]["perplexity"]["tokens_scored"]
    assert math.isclose(math.exp(nll / n), base_report["models"][0]["perplexity"]["ppl"], rel_tol=1e-4)


def test_kl_of_a_model_against_itself_is_zero(smol_bf16):
    report = verify(str(smol_bf16), [str(smol_bf16)], VerifyOptions(max_tokens=512, smoke=False))
    kl = report["models"][1]["kl"]
    assert kl["mean"] < 1e-6 and kl["p99"] < 1e-5 and kl["top1_agreement"] == 1.0


@pytest.fixture(scope="module")
def nf4(smol_bf16, tmp_path_factory):
    from qtk.quantize.base import QuantizeOptions
    from qtk.quantize.run import quantize

    return quantize(str(smol_bf16), tmp_path_factory.mktemp("v") / "nf4", QuantizeOptions(method="nf4")).out


def test_cli_report_files_and_a_failing_gate(qtk, smol_bf16, nf4, gguf, tmp_path):
    args = [str(smol_bf16), str(nf4), gguf, "--max-tokens", "512", "--json", str(tmp_path / "r.json"),
            "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"), "-q"]
    r = qtk("verify", *args, "--max-ppl-increase", "1")
    assert r.exit_code == 3, r.stderr
    assert f"{nf4}: perplexity +" in r.stderr and "> 1.0%" in r.stderr
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["gates"]["passed"] is False and len(doc["models"]) == 3
    assert doc["protocol"]["ctx"] == 512 and len(doc["protocol"]["text_sha256"]) == 64
    assert {"torch", "transformers", "llama_cpp_python"} <= set(doc["versions"])
    nf4_row = doc["models"][1]
    assert nf4_row["format"] == "nf4" and nf4_row["kl"]["mean"] > 0 and nf4_row["gate_failures"]
    assert len(nf4_row["smoke"]) == 5 and all(s["answer"] for s in nf4_row["smoke"])
    md = (tmp_path / "r.md").read_text()
    assert "| model |" in md and "gate failed" in md and "## Smoke answers" in md
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    # a generous gate passes
    r = qtk("verify", str(smol_bf16), gguf, "--max-tokens", "512", "--no-smoke", "--max-ppl-increase", "5",
            "--min-top1", "80", "-q")
    assert r.exit_code == 0, r.stderr


def test_smoke_bf16_answers(smol_bf16):
    from qtk.verify.models import open_model
    from qtk.verify.smoke import run_smoke

    results = {s.name: s for s in run_smoke(open_model(str(smol_bf16)), max_new_tokens=48)}
    assert results["factual"].ok and results["factual"].correct  # "The capital of France is Paris."
    assert results["long-context"].correct  # recalls the code buried in ~1500 tokens
    assert results["two-turn"].correct  # remembers the name from the first turn
    assert all(r.answer and r.repetition < 0.5 for r in results.values())


@pytest.mark.parametrize(
    "make,code,needle",
    [
        (lambda p: (p.write_bytes(b"NOTGGUF" + b"\0" * 100), p)[1], 52, "not a GGUF"),
        (lambda p: p.parent, 52, "no config.json"),
    ],
)
def test_bad_models(qtk, smol_bf16, tmp_path, make, code, needle):
    bad = make(tmp_path / "fake.gguf")
    r = qtk("verify", str(smol_bf16), str(bad), "--no-smoke", "--max-tokens", "512")
    assert r.exit_code == code and needle in r.stderr


def test_text_too_short_and_unknown_dataset(qtk, smol_bf16, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    r = qtk("verify", str(smol_bf16), "--text", str(short), "--no-smoke")
    assert r.exit_code == 2 and "one window needs --ctx 512" in r.stderr
    r = qtk("verify", str(smol_bf16), "--text", "wikitext-2", "--no-smoke")
    assert r.exit_code == 54


def test_llama_cpp_missing_names_the_extra(monkeypatch, gguf):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from qtk.verify.models import open_model

    with pytest.raises(errors.BackendUnavailableError) as e:
        open_model(gguf)
    assert "qtk[gguf]" in e.value.hint


def test_chat_with_piped_stdin(smol_bf16):
    """qtk chat reads one turn per line from a pipe, streams answers to stdout, keeps the history,
    honours /reset, and ends cleanly at EOF."""
    import subprocess
    import sys

    turns = "What is the capital of France?\nRepeat the name of that city.\n/reset\n"
    r = subprocess.run([sys.executable, "-m", "qtk", "chat", str(smol_bf16), "--max-new-tokens", "24"],
                       input=turns, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(answers) == 2 and "Paris" in answers[0]
    assert "conversation reset" in r.stderr


def test_gguf_chat_prompt_matches_the_hf_template(smol_bf16, gguf):
    """The GGUF's own template renders the same prompt tokens as transformers' chat template (no
    extra BOS, which llama-cpp-python's chat handler would prepend)."""
    from qtk.verify.models import open_model

    g, h = open_model(gguf), open_model(str(smol_bf16))
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    hf_ids = list(h.tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert g._prompt(msgs) == hf_ids
