"""FP8 and INT8 W8A8 on the real SmolLM2-135M weights (truncated to 4 layers, CPU): the config.json vLLM reads,
the tensors written (dtype, scale shapes, full use of the 8-bit range), the reload through transformers
(decompressed on the CPU) against BF16, SmoothQuant's exactness and its refusals, qtk verify and plan on the
outputs, and provision recipes that publish them."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

from qtk import errors  # noqa: E402
from qtk import plan as P  # noqa: E402
from qtk.quantize import w8a8 as W  # noqa: E402
from qtk.quantize.base import QuantizeOptions  # noqa: E402
from qtk.quantize.calibration import load_calibration  # noqa: E402
from qtk.quantize.run import PROVENANCE_FILE, quantize  # noqa: E402

LAYERS = 4
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
DTYPE = {"fp8": ("F8_E4M3", torch.float8_e4m3fn, 448.0), "w8a8": ("I8", torch.int8, 127.0)}
W8A8_CAL = dict(samples=16, seq_len=128)


@pytest.fixture(scope="module")
def src(smol_layers):
    return smol_layers(LAYERS)


@pytest.fixture(scope="module")
def outs(src, tmp_path_factory):
    """fp8, w8a8 (smoothed) and w8a8 --no-smooth of the 4-layer model, built once."""
    root = tmp_path_factory.mktemp("compressed")
    return {
        "fp8": quantize(str(src), root / "fp8", QuantizeOptions("fp8", bits=8)).out,
        "w8a8": quantize(str(src), root / "w8a8", QuantizeOptions("w8a8", bits=8, **W8A8_CAL)).out,
        "w8a8-raw": quantize(str(src), root / "w8a8-raw", QuantizeOptions("w8a8", bits=8, smooth=False)).out,
    }


def header(path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return {k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"}


def tensors(out) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def heldout(tok, n=512, window=128):
    text = "\n\n".join(load_calibration("prose-heldout").documents)
    ids = tok(text)["input_ids"][:n]
    return torch.tensor([ids[i : i + window] for i in range(0, n, window)])


def logits(path, x, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu").eval()
    with torch.no_grad():
        return model, model(x).logits.float()


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


@pytest.mark.parametrize("name, fmt, wtype", [("fp8", "float-quantized", "float"), ("w8a8", "int-quantized", "int"),
                                              ("w8a8-raw", "int-quantized", "int")])
def test_config_json_carries_the_fields_vllm_reads(outs, name, fmt, wtype):
    cfg = json.loads((outs[name] / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["ignore"], qc["quantization_status"]) == (
        "compressed-tensors", fmt, ["lm_head"], "compressed")
    assert list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == fmt and group["output_activations"] is None
    keys = ("type", "num_bits", "strategy", "symmetric", "dynamic", "group_size")
    assert {k: group["weights"][k] for k in keys} == {"type": wtype, "num_bits": 8, "strategy": "channel",
                                                        "symmetric": True, "dynamic": False, "group_size": None}
    assert {k: group["input_activations"][k] for k in keys} == {"type": wtype, "num_bits": 8, "strategy": "token",
                                                                  "symmetric": True, "dynamic": True, "group_size": None}
    assert cfg["dtype" if "dtype" in cfg else "torch_dtype"] == "bfloat16"
    prov = json.loads((outs[name] / PROVENANCE_FILE).read_text())
    assert prov["quantization_config"] == qc and prov["method"] == name.split("-")[0]
    assert "compressed-tensors" in prov["versions"]
    card = (outs[name] / "README.md").read_text()
    assert '"quant_method": "compressed-tensors"' in card and f'"format": "{fmt}"' in card


@pytest.mark.parametrize("name", ["fp8", "w8a8", "w8a8-raw"])
def test_weights_are_8_bit_with_one_scale_per_output_channel(src, outs, name):
    st_dtype, dtype, qmax = DTYPE[name.split("-")[0]]
    got, ref = header(outs[name] / "model.safetensors"), header(src / "model.safetensors")
    weights = tensors(outs[name])
    for i in range(LAYERS):
        for lin in LINEARS:
            k = f"model.layers.{i}.{lin}"
            assert got[k + ".weight"]["dtype"] == st_dtype and got[k + ".weight"]["shape"] == ref[k + ".weight"]["shape"]
            out_features = ref[k + ".weight"]["shape"][0]
            assert got[k + ".weight_scale"] == {**got[k + ".weight_scale"], "dtype": "BF16", "shape": [out_features, 1]}
            assert k + ".weight_zero_point" not in got and k + ".input_scale" not in got  # symmetric, dynamic
            q = weights[k + ".weight"]
            assert q.dtype == dtype
            row_max = q.float().abs().amax(dim=1)
            assert (row_max >= qmax * 0.98).all(), (k, row_max.min())  # each row uses the whole 8-bit range
    for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert got[k]["dtype"] == "BF16", k
    assert not any(k.startswith("lm_head") for k in got)  # tied to the embeddings, kept 16-bit


@pytest.mark.parametrize("name, max_rel", [("fp8", 0.04), ("w8a8-raw", 0.01)])
def test_dequantized_weights_are_the_source_weights(src, outs, name, max_rel):
    """Unsmoothed: scale x code reproduces the BF16 weights (FP8 E4M3 has 3 mantissa bits, int8 ~7)."""
    q, ref = tensors(outs[name]), tensors(src)
    for lin in LINEARS:
        k = f"model.layers.1.{lin}"
        w = q[k + ".weight"].float() * q[k + ".weight_scale"].float()
        rel = ((w - ref[k + ".weight"].float()).norm() / ref[k + ".weight"].float().norm()).item()
        assert rel < max_rel, (k, rel)


def test_smoothing_moves_scales_between_norms_and_linears(src, outs):
    """Smoothed W8A8: the norms changed, and per input channel norm weight x dequantized column is the source's."""
    q, ref = tensors(outs["w8a8"]), tensors(src)
    for norm, lins in (("input_layernorm", LINEARS[:3]), ("post_attention_layernorm", LINEARS[4:6])):
        nk = f"model.layers.2.{norm}.weight"
        assert not torch.equal(q[nk], ref[nk]), nk
        for lin in lins:
            k = f"model.layers.2.{lin}"
            w = q[k + ".weight"].float() * q[k + ".weight_scale"].float() * q[nk].float()
            w_ref = ref[k + ".weight"].float() * ref[nk].float()
            assert ((w - w_ref).norm() / w_ref.norm()).item() < 0.02, k
    prov = json.loads((outs["w8a8"] / PROVENANCE_FILE).read_text())
    sm = prov["method_details"]["smoothing"]
    assert (sm["groups"], sm["linears"], sm["alpha"]) == (2 * LAYERS, 5 * LAYERS, 0.5)
    assert sm["layer_rel_error"] < 5e-2 and sm["tokens"] == W8A8_CAL["samples"] * W8A8_CAL["seq_len"]
    assert prov["calibration"]["samples"] == W8A8_CAL["samples"]
    raw = json.loads((outs["w8a8-raw"] / PROVENANCE_FILE).read_text())
    assert raw["method_details"]["smoothing"] == "off" and raw["calibration"] is None


@pytest.mark.parametrize("name, min_cos", [("fp8", 0.999), ("w8a8", 0.999), ("w8a8-raw", 0.999)])  # measured 0.9997-0.9998
def test_reload_in_transformers_is_close_to_bf16(src, outs, name, min_cos):
    from transformers import AutoTokenizer

    x = heldout(AutoTokenizer.from_pretrained(src))
    _, ref = logits(src, x)
    model, got = logits(outs[name], x)
    q_proj = model.model.layers[0].self_attn.q_proj
    acts = q_proj.quantization_scheme.input_activations  # the reload quantizes activations per token, as vLLM
    assert (acts.strategy, acts.dynamic, acts.num_bits) == ("token", True, 8)
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert cosine(got, ref) > min_cos
    assert top1 > 0.9, top1


def test_smoothing_is_exact_and_flattens_activation_outliers(src):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    samples = [list(range(1000 + 64 * i, 1064 + 64 * i)) for i in range(4)]
    groups, _ = W.find_groups(model, torch.tensor([samples[0][:32]]))
    assert set(groups) == {f"model.layers.{i}.{n}" for i in range(LAYERS)
                           for n in ("input_layernorm", "post_attention_layernorm")}
    assert groups["model.layers.0.input_layernorm"] == [f"model.layers.0.{n}" for n in LINEARS[:3]]
    before = W.activation_maxima(model, list(groups), samples, 8192)
    x = torch.tensor(samples)
    with torch.no_grad():
        ref = model(x).logits
    details = W.smooth(model, samples, 0.5)
    with torch.no_grad():
        got = model(x).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4  # the same function
    after = W.activation_maxima(model, list(groups), samples, 8192)
    spread = {k: (v.max() / v.median()).item() for k, v in before.items()}
    spread_after = {k: (v.max() / v.median()).item() for k, v in after.items()}
    # max/median of the per-channel maxima that the per-token int8 scale must cover: every norm's drops
    # (SmolLM2 layers 0-3: 77 -> 39 summed at alpha 0.5)
    assert all(spread_after[k] < spread[k] for k in spread), (spread, spread_after)
    assert sum(spread_after.values()) < 0.6 * sum(spread.values()), (spread, spread_after)
    assert details["groups"] == 2 * LAYERS and details["skipped"] == []


class OnePlusNorm(torch.nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w): dividing w by s does not divide the output by s."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight - 1)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * (1 + self.weight)


def test_a_norm_that_does_not_scale_with_its_weight_is_skipped(src):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    layer = model.model.layers[1]
    layer.input_layernorm = OnePlusNorm(layer.input_layernorm.weight.detach().clone())
    x = torch.tensor([list(range(2000, 2064))])
    with torch.no_grad():
        ref = model(x).logits
    details = W.smooth(model, [x[0].tolist()], 0.5)
    assert details["groups"] == 2 * LAYERS - 1
    assert details["skipped"] == ["model.layers.1.input_layernorm: OnePlusNorm output does not scale with its weight"]
    with torch.no_grad():
        assert ((model(x).logits - ref).norm() / ref.norm()).item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoothing_that_changes_the_function_is_refused(src, monkeypatch, dtype):
    """A fold that forgets the linears (a norm whose output feeds something qtk did not see) is caught, in FP32
    and in BF16 (whose own rounding of the scaled weights must not hide it, nor trip the check alone)."""
    from transformers import AutoModelForCausalLM

    def norms_only(model, groups, maxima, alpha):
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name in groups:
                modules[name].weight.mul_(0.5)
        return [2.0]

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    assert W.smooth(model, [list(range(3000, 3064))], 0.5)["layer_rel_error"] < W._MAX_REL_ERROR["half"] / 3
    monkeypatch.setattr(W, "fold", norms_only)
    with pytest.raises(errors.QuantizeError) as e:
        W.smooth(model, [list(range(3000, 3064))], 0.5)
    assert "Smoothing changed what a decoder layer computes" in str(e.value) and "--no-smooth" in e.value.hint


def test_plan_sizes_the_outputs_within_5_percent(src, outs):
    from qtk.hfload import read_config

    shape = P.shape_from_config(read_config(src, missing="?"))
    for name, fmt in (("fp8", "fp8-dynamic"), ("w8a8", "int8-w8a8")):
        planned = P.weight_bytes(shape, P.FORMATS[fmt])
        on_disk = sum(f.stat().st_size for f in outs[name].glob("*.safetensors"))
        assert abs(planned - on_disk) / on_disk < 0.05, (name, planned, on_disk)


def test_cli_keeps_the_backend_in_the_log(qtk, smol_layers, tmp_path, monkeypatch):
    """compressed-tensors' bars and loguru lines go to the run's log; the terminal gets qtk's few lines."""
    monkeypatch.setenv("QTK_LOG_DIR", str(tmp_path / "logs"))
    r = qtk("quantize", str(smol_layers(2)), "--method", "fp8", "-o", str(tmp_path / "f"))
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "f")
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 4 and "Done in" in lines[-1] and "fp8 8-bit" in lines[-1], r.stderr
    (log,) = (tmp_path / "logs").glob("*.log")
    assert "Compressing model" in log.read_text() and "Compressing" not in r.stderr


def test_disk_check_uses_the_8_bit_output_size(src, tmp_path, monkeypatch):
    """The output is ~0.6 of the BF16 bytes, not the 4-bit methods' ~1/4: refused before loading anything."""
    import shutil as sh

    from qtk.hfload import read_config

    planned = P.weight_bytes(P.shape_from_config(read_config(src, missing="?")), P.FORMATS["fp8-dynamic"])
    bf16 = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    free = (bf16 // 3 + planned) // 2  # enough for a third of BF16, not for the FP8 output
    assert bf16 // 3 < free < planned
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=free))
    with pytest.raises(errors.DiskSpaceError, match="needs roughly"):
        quantize(str(src), tmp_path / "fp8", QuantizeOptions("fp8", bits=8))
    assert not (tmp_path / "fp8").exists()


@pytest.mark.slow
def test_qtk_verify_measures_both_outputs(qtk, src, outs, tmp_path):
    report = tmp_path / "r.json"
    r = qtk("verify", str(src), str(outs["fp8"]), str(outs["w8a8"]), "--ctx", "128", "--max-tokens", "512",
            "--no-smoke", "--device", "cpu", "--json", str(report), "--quiet")
    assert r.exit_code == 0, r.stderr
    models = {m["format"]: m for m in json.loads(report.read_text())["models"]}
    assert set(models) == {"bf16", "fp8", "w8a8"}
    for fmt in ("fp8", "w8a8"):
        m = models[fmt]
        assert m["tokenization_match"] == 1.0 and m["perplexity"]["tokens_scored"] > 0
        assert m["kl"]["mean"] < 0.05 and m["kl"]["top1_agreement"] > 0.85, m["kl"]
        assert abs(m["ppl_increase_pct"]) < 10, m["ppl_increase_pct"]


@pytest.mark.slow
def test_provision_recipes_publish_and_verify_fp8_and_w8a8(qtk, smol_layers, tmp_path, monkeypatch):
    from hubtest import start_server

    upstream = tmp_path / "upstream"
    shutil.copytree(smol_layers(2), upstream / "acme" / "smol")
    srv = start_server(upstream)
    try:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        manifest = tmp_path / "m.toml"
        manifest.write_text(
            'store = "store"\n[defaults]\ndevice = "cpu"\n[defaults.quantize]\nsamples = 8\nseq_len = 128\n'
            '[defaults.verify]\ntext = "prose-heldout"\nctx = 128\nmax_tokens = 384\nsmoke = false\n'
            '[defaults.gates]\nmax_ppl_increase_pct = 10\n[[models]]\nrepo = "acme/smol"\nname = "smol"\n'
            '[[models.recipes]]\nmethod = "fp8"\n[[models.recipes]]\nmethod = "w8a8"\nsmooth_alpha = 0.6\n')
        r = qtk("provision", str(manifest), "--json")
        assert r.exit_code == 0, r.stderr[-3000:]
    finally:
        srv.shutdown()
        srv.server_close()
    store = tmp_path / "store"
    for name, fmt in (("smol-fp8", "float-quantized"), ("smol-w8a8", "int-quantized")):
        art = (store / "qtk" / name).resolve()
        qc = json.loads((art / "config.json").read_text())["quantization_config"]
        assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", fmt)
        verify = json.loads((art / "qtk_verify_report.json").read_text())
        assert {m["format"] for m in verify["models"]} >= {name.split("-")[1]}
    prov = json.loads(((store / "qtk" / "smol-w8a8").resolve() / PROVENANCE_FILE).read_text())
    assert prov["options"]["smooth_alpha"] == 0.6 and prov["options"]["bits"] == 8
