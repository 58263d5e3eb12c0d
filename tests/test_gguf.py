"""GGUF export on the real SmolLM2 weights (first 8 layers, CPU): one conversion and one importance matrix
make nine types; each file loads and generates in llama-cpp-python, has exactly the tensor types and
sizes the planner predicts, and `qtk verify` reads it; the importance-matrix file reads back through
gguf-py and equals a plain per-column sum of squares; --no-imatrix; a provision recipe publishes and
verifies a GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from hubtest import start_server  # noqa: E402

TYPES = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_M", "IQ2_XS")
SAMPLES, SEQ_LEN = 16, 128  # 2,048 tokens: one forward batch of the collector


@pytest.fixture(scope="module")
def smol8(smol_layers) -> Path:
    return smol_layers(8)


@pytest.fixture(scope="module")
def export(smol8, tmp_path_factory):
    """All nine types from one run, with the progress it reported."""
    from qtk.quantize.base import QuantizeOptions
    from qtk.quantize.run import quantize

    out = tmp_path_factory.mktemp("gguf") / "smol-gguf"
    stages: list[tuple[str, int, int]] = []
    res = quantize(str(smol8), out, QuantizeOptions("gguf", gguf_type=TYPES, samples=SAMPLES, seq_len=SEQ_LEN,
                                                    device="cpu"),
                   progress=lambda stage, done, total, peak=None: stages.append((stage, done, total)))
    return res, stages


@pytest.mark.slow
def test_each_type_loads_and_generates_with_the_planned_tensor_types(export, smol8):
    from llama_cpp import Llama

    from qtk.hfload import read_config
    from qtk.plan import gguf_weight_bytes, shape_from_config
    from qtk.gguf_types import decoder_tensors, file_type, planned_types

    res, _ = export
    shape = shape_from_config(read_config(smol8, missing="?"))
    tensors = decoder_tensors(vocab=shape.vocab, hidden=shape.hidden, layers=shape.layers, heads=shape.heads,
                              kv_heads=shape.kv_heads, head_dim=shape.head_dim, intermediate=shape.intermediate,
                              tied=shape.tied_embeddings)
    files = sorted(p.name for p in res.out.glob("*.gguf"))
    assert files == sorted(f"smollm2-135m-bf16-8layers-{t}.gguf" for t in TYPES)
    for t in TYPES:
        path = res.out / f"smollm2-135m-bf16-8layers-{t}.gguf"
        reader = gguf.GGUFReader(path)
        got = {x.name: x.tensor_type.name for x in reader.tensors}
        want = planned_types(tensors, file_type(t), n_layer=8, heads=shape.heads, kv_heads=shape.kv_heads)
        assert got == want, t  # llama_model_quantize's choices, tensor by tensor, as qtk's planner ports them
        data = sum(int(x.n_bytes) for x in reader.tensors)
        assert data == gguf_weight_bytes(shape, t), t
        assert data < path.stat().st_size < data + 2_500_000, t  # + metadata: the 49k-token vocabulary, template
        llm = Llama(model_path=str(path), n_ctx=256, verbose=False)
        out = llm.create_completion("The capital of France is", max_tokens=6, temperature=0)
        assert out["usage"]["completion_tokens"] > 0, t
        assert int(reader.fields["general.file_type"].contents()) == file_type(t).ftype
        imatrix_keys = {k for k in reader.fields if k.startswith("quantize.imatrix.")}
        assert bool(imatrix_keys) == (t not in ("BF16", "Q8_0")), t


@pytest.mark.slow
def test_provenance_card_modelfile_and_progress(export):
    res, stages = export
    prov = json.loads((res.out / "qtk_provenance.json").read_text())
    d = prov["method_details"]
    assert prov["method"] == "gguf" and prov["options"]["gguf_type"] == list(TYPES)
    assert d["converter"]["llama_cpp_commit"] == "0c1e57098" and d["converter"]["tree_sha256"]
    assert d["imatrix"]["calibration_sha256"] == prov["calibration"]["sha256"]
    assert d["imatrix"]["chunk_count"] == SAMPLES and d["imatrix"]["chunk_size"] == SEQ_LEN
    assert set(d["files"]) == set(TYPES) and all(f["sha256"] for f in d["files"].values())
    assert not list(res.out.glob(".*"))  # the intermediate BF16 conversion and the name map are gone
    card = (res.out / "README.md").read_text()
    assert "llama-cli -m smollm2-135m-bf16-8layers-Q8_0.gguf" in card and "ollama create" in card
    assert (res.out / "Modelfile").read_text().splitlines()[-1] == "FROM ./smollm2-135m-bf16-8layers-Q8_0.gguf"
    seen = {s for s, _, _ in stages}
    assert {"gguf: converting (MB)", "gguf: importance matrix batches", "gguf: types done"} <= seen
    assert ("gguf: types done", len(TYPES), len(TYPES)) in stages
    assert not any("layers done" in s for s in seen)  # the imatrix forward passes are not reported as layers


@pytest.mark.slow
def test_imatrix_reads_back_and_is_the_per_column_sum_of_squares(export, smol8):
    """The file, read by gguf-py, against x² summed per input column by a hook written here, on the same
    tokens in the same dtype; and the converter's Q/K row permutation leaves the input columns in place."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtk.quantize.calibration import build_samples, load_calibration

    res, _ = export
    prov = json.loads((res.out / "qtk_provenance.json").read_text())
    im = prov["method_details"]["imatrix"]
    reader = gguf.GGUFReader(res.out / im["file"])
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].contents() == ["chat"]
    t = {x.name: np.asarray(x.data, dtype=np.float64).ravel() for x in reader.tensors}
    assert len(t) == 2 * 7 * 8  # q k v o gate up down, 8 blocks

    tok = AutoTokenizer.from_pretrained(smol8)
    ids = build_samples(load_calibration("chat"), tok, samples=SAMPLES, seq_len=SEQ_LEN, seed=0).input_ids
    dtype = getattr(torch, im["compute_dtype"])
    model = AutoModelForCausalLM.from_pretrained(smol8, dtype=dtype).eval()
    captured: dict[str, torch.Tensor] = {}
    layer = model.model.layers[5]
    for name, mod in (("blk.5.attn_q.weight", layer.self_attn.q_proj), ("blk.5.ffn_down.weight", layer.mlp.down_proj)):
        mod.register_forward_pre_hook(lambda m, a, name=name: captured.__setitem__(name, a[0].detach().clone()))
    with torch.inference_mode():
        model(input_ids=torch.tensor(ids))
    for name, x in captured.items():
        x = x.double().reshape(-1, x.shape[-1]).numpy()
        np.testing.assert_allclose(t[f"{name}.in_sum2"], (x * x).sum(axis=0), rtol=1e-5)
        assert t[f"{name}.counts"][0] == SAMPLES * SEQ_LEN

    # attn_q in the BF16 file: rows permuted (llama.cpp's RoPE layout), each column's sum of squares unchanged
    bf16 = gguf.GGUFReader(res.out / "smollm2-135m-bf16-8layers-BF16.gguf")
    q_gguf = next(x for x in bf16.tensors if x.name == "blk.5.attn_q.weight")
    raw = np.asarray(q_gguf.data).view(np.uint16).astype(np.uint32) << 16
    w_gguf = raw.view(np.float32).reshape(int(q_gguf.shape[1]), int(q_gguf.shape[0])).astype(np.float64)
    w_hf = layer.self_attn.q_proj.weight.detach().float().double().numpy()
    assert not np.array_equal(w_gguf, w_hf)
    np.testing.assert_array_equal((w_gguf**2).sum(axis=0), (w_hf**2).sum(axis=0))
    np.testing.assert_array_equal(np.sort(w_gguf, axis=0), np.sort(w_hf, axis=0))


@pytest.mark.slow
def test_qtk_verify_reads_the_files(export, smol8, qtk, tmp_path):
    res, _ = export
    files = [str(res.out / f"smollm2-135m-bf16-8layers-{t}.gguf") for t in ("Q8_0", "IQ2_XS")]
    r = qtk("verify", str(smol8), *files, "--ctx", "128", "--max-tokens", "512", "--no-smoke",
            "--json", str(tmp_path / "report.json"))
    assert r.exit_code == 0, r.stderr
    models = json.loads((tmp_path / "report.json").read_text())["models"]
    assert [m["format"] for m in models] == ["bf16", "gguf", "gguf"]
    q8, iq2 = models[1], models[2]
    assert q8["kl"]["mean"] < iq2["kl"]["mean"]  # 8.5 bits closer to BF16 than 2.3


@pytest.mark.slow
def test_no_imatrix_reads_no_calibration_and_changes_the_k_quant(export, smol8, qtk, tmp_path, monkeypatch):
    monkeypatch.setenv("QTK_LOG_DIR", str(tmp_path / "logs"))
    out = tmp_path / "plain"
    r = qtk("quantize", str(smol8), "--method", "gguf", "--gguf-type", "q4_k_m", "--no-imatrix", "-o", str(out),
            "--json")
    assert r.exit_code == 0, r.stderr
    prov = json.loads((out / "qtk_provenance.json").read_text())
    assert prov["calibration"] is None and "imatrix" not in prov["method_details"]
    assert not list(out.glob("*.imatrix"))
    plain = out / "smollm2-135m-bf16-8layers-Q4_K_M.gguf"
    weighted = export[0].out / "smollm2-135m-bf16-8layers-Q4_K_M.gguf"
    p, w = gguf.GGUFReader(plain), gguf.GGUFReader(weighted)
    assert [(t.name, t.tensor_type) for t in p.tensors] == [(t.name, t.tensor_type) for t in w.tensors]
    changed = [t.name for t, u in zip(p.tensors, w.tensors) if bytes(t.data) != bytes(u.data)]
    assert "blk.3.ffn_down.weight" in changed and "token_embd.weight" not in changed  # Q8_0 ignores an imatrix
    assert not {k for k in p.fields if k.startswith("quantize.imatrix.")}


@pytest.mark.slow
def test_provision_recipe_publishes_and_verifies_a_gguf(smol_layers, tmp_path, monkeypatch, qtk):
    root = tmp_path / "upstream"
    shutil.copytree(smol_layers(2), root / "acme" / "smol")
    srv = start_server(root)
    try:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        manifest = tmp_path / "m.toml"
        manifest.write_text(
            'store = "store"\n[defaults]\ndevice = "cpu"\n[defaults.quantize]\nsamples = 8\nseq_len = 128\n'
            '[defaults.verify]\ntext = "prose-heldout"\nctx = 256\nmax_tokens = 768\nsmoke = false\n'
            '[defaults.gates]\nmax_ppl_increase_pct = 50\n'
            '[[models]]\nrepo = "acme/smol"\nname = "smol"\n'
            '[[models.recipes]]\nmethod = "gguf"\nname = "q4km"\ngguf_type = "Q4_K_M"\n')
        r = qtk("provision", str(manifest), "--json")
        assert r.exit_code == 0, r.stderr + r.stdout
        row = json.loads(r.stdout)["artifacts"][0]
        assert row["outcome"] == "ok" and row["steps"]["publish"] == "done"
        assert row["metrics"]["kld_mean"] is not None and row["metrics"]["ppl"] > 0
        pub = tmp_path / "store" / "qtk" / "smol-q4km"
        assert (pub / "smol-Q4_K_M.gguf").is_file() and (pub / "smol.imatrix").is_file()
        report = json.loads((pub / "qtk_verify_report.json").read_text())
        assert report["models"][1]["format"] == "gguf"
        r = qtk("provision", str(manifest), "--json")  # nothing changed: nothing runs again
        assert json.loads(r.stdout)["artifacts"][0]["steps"]["quantize"] == "cached"
    finally:
        srv.shutdown()
        srv.server_close()
