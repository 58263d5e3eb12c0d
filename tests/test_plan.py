"""qtk plan: parameter counts, weight and KV-cache memory against published figures and a real checkpoint."""

from __future__ import annotations

import json

import pytest

from qtk import errors
from qtk import plan as P

# The public config.json values of the Llama 3.1 models (hidden, layers, heads, kv heads, intermediate).
LLAMA = {
    "8B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336),
    "70B": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672),
    "405B": dict(hidden_size=16384, num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                 intermediate_size=53248),
}


def llama(size: str, **over) -> P.ModelShape:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
           "tie_word_embeddings": False, **LLAMA[size], **over}
    return P.shape_from_config(cfg)


# Published table (seed 001): weights in GB for FP16 / FP8 / INT4
@pytest.mark.parametrize("size, fp16, fp8, int4", [("8B", 16, 8, 4), ("70B", 140, 70, 35), ("405B", 810, 405, 203)])
def test_weights_match_the_published_table_within_2_percent(size, fp16, fp8, int4):
    shape = llama(size)
    for fmt, want in (("bf16", fp16), ("fp8", fp8), ("int4", int4)):
        got = P.weight_bytes(shape, P.FORMATS[fmt]) / P.GB
        assert abs(got - want) / want < 0.02, (size, fmt, got, want)


# Published KV cache, FP16, GiB at 1,024 / 16,000 / 128,000 tokens
@pytest.mark.parametrize("size, kv_heads, expected", [
    ("8B", 8, (0.125, 1.95, 15.62)),
    ("70B", 8, (0.313, 4.88, 39.06)),
    ("405B", 16, (0.984, 15.38, 123.05)),  # the table's row: 16 KV heads (an early 405B layout)
    ("405B", 8, (0.492, 7.69, 61.52)),  # the published config.json: 8 KV heads, half the table
])
def test_kv_cache_matches_the_published_table(size, kv_heads, expected):
    shape = llama(size, num_key_value_heads=kv_heads)
    for tokens, want in zip((1024, 16000, 128000), expected):
        got = P.kv_bytes(shape, tokens, dtype="fp16") / P.GiB
        assert abs(got - want) / want < 0.02, (size, kv_heads, tokens, got, want)


def test_kv_scales_with_batch_and_dtype():
    shape = llama("8B")
    assert P.kv_bytes(shape, 1000, batch=4, dtype="fp8") == P.kv_bytes(shape, 1000, dtype="fp16") * 2


def test_parameter_count_of_a_real_checkpoint_is_exact(smol_bf16):
    """SmolLM2-135M (tied embeddings, 3 KV heads): the planner's count equals the tensors on disk."""
    from qtk.quantize.source import resolve_model

    on_disk = resolve_model(str(smol_bf16))  # the tensors' shapes, from the safetensors headers
    shape = P.shape_from_config(on_disk.config)
    assert shape.tied_embeddings and shape.kv_heads == 3
    assert shape.total == on_disk.num_params
    # bf16 weights = the safetensors payload
    payload = on_disk.weight_bytes
    assert abs(P.weight_bytes(shape, P.FORMATS["bf16"]) - payload) / payload < 0.001


def test_moe_counts_every_expert():
    cfg = {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "num_local_experts": 8,
           "num_experts_per_tok": 2}
    shape = P.shape_from_config(cfg)
    assert abs(shape.total / 1e9 - 46.7) < 0.2  # Mixtral 8x7B: 46.7 B parameters


def test_fit_uses_tensor_parallel_when_one_gpu_is_too_small():
    # 70B in BF16 = 141 GB; at 8k tokens + 2 GB margin per GPU: 2 GPUs need 73.9 GB each
    r = P.plan(llama("70B"), formats=["bf16", "int4"], contexts=[8192], gpus={"H100-80G": 80})
    rows = {row["format"]: row for row in r["formats"]}
    assert rows["bf16"]["min_gpus"] == {"H100-80G": 4}  # 73.9 > 0.9 x 80
    assert rows["int4"]["min_gpus"] == {"H100-80G": 1}
    r = P.plan(llama("70B"), formats=["bf16"], contexts=[8192], gpus={"H100-80G": 80}, utilization=1.0)
    assert r["formats"][0]["min_gpus"] == {"H100-80G": 2}
    r = P.plan(llama("405B"), formats=["bf16"], contexts=[8192], gpus={"L4": 24})
    assert r["formats"][0]["min_gpus"] == {}  # not even over 8


def test_parsers_and_bad_input():
    assert P.parse_context("1k, 16000,128k") == [1024, 16000, 131072]
    assert P.parse_gpus(["MI300X=192"])["MI300X"] == 192
    for bad in ("abc", "0", ""):
        with pytest.raises(errors.UsageError):
            P.parse_context(bad)
    with pytest.raises(errors.UsageError):
        P.parse_gpus(["MI300X"])
    with pytest.raises(errors.ModelFormatError, match="hidden_size"):
        P.shape_from_config({"vocab_size": 10})
    with pytest.raises(errors.UsageError, match="Unknown format"):
        P.plan(llama("8B"), formats=["q1"], contexts=[1])


def test_cli_json_and_table(qtk, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, **LLAMA["8B"]}))
    r = qtk("plan", str(cfg), "--context", "1024,128000", "--gpus", "T4=16", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert round(doc["params"]["total"] / 1e9, 2) == 8.03
    assert [round(c["GiB"], 3) for c in doc["kv_cache"]["by_context"]] == [0.125, 15.625]
    assert "T4" in doc["gpus"]
    r = qtk("plan", str(tmp_path))  # a checkpoint dir works too; human table on stdout
    assert r.exit_code == 0 and "8.03 B parameters" in r.stdout and "GiB" in r.stdout
    r = qtk("plan", str(tmp_path / "nope"))
    assert r.exit_code == errors.ModelFormatError.exit_code
    r = qtk("plan", str(cfg), "--formats", "bogus")
    assert r.exit_code == 2 and "Unknown format" in r.stderr


@pytest.mark.parametrize("cfg, published_b", [
    # Qwen2.5-7B (q/k/v biases), Gemma-2-9B (head_dim 256, tied), Mistral-7B-v0.3: public configs and counts
    (dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
          num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False), 7.6156),
    (dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, num_hidden_layers=42, num_attention_heads=16,
          num_key_value_heads=8, head_dim=256, intermediate_size=14336, tie_word_embeddings=True), 9.2415),
    (dict(model_type="mistral", vocab_size=32768, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
          num_key_value_heads=8, intermediate_size=14336), 7.2480),
])
def test_other_decoder_families(cfg, published_b):
    assert abs(P.shape_from_config(cfg).total / 1e9 - published_b) / published_b < 0.005


def test_repo_id_fetches_config_json_alone(qtk, hub, cache_dir, monkeypatch):
    """Through the local Hub mirror with the real client: only config.json crosses; a second run, and an
    offline one, read it from the cache."""
    pytest.importorskip("numpy")
    r = qtk("plan", "acme/tiny-llama", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["shape"]["layers"] == 2 and doc["source"].startswith("acme/tiny-llama@")
    snapshot = next((cache_dir / "models--acme--tiny-llama" / "snapshots").iterdir())
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json"]
    assert json.loads(qtk("plan", "acme/tiny-llama", "--json").stdout)["params"] == doc["params"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = qtk("plan", "acme/tiny-llama", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["params"] == doc["params"]
