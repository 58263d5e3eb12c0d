"""One method registry: a method registered once is known to the CLI, the planner and provision."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from qtk import errors
from qtk import plan as P
from qtk import methods as registry

TOY = registry.MethodSpec("toy", "toy_method:Toy", "toy", reads=("bits",), memory_model="quantized_load",
                          weights="nf4", summary="a toy that copies the weights")


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.unregister("toy")


def test_builtin_methods_and_their_implementations_agree():
    assert {"gptq", "awq", "nf4", "fp8", "w8a8"} <= set(registry.method_names())
    for spec in registry.methods():
        m = spec.load()
        assert m.name == spec.name
        assert m.needs_calibration == ("calibration" in spec.reads)
        assert m.uses_group_size == ("group_size" in spec.reads)


def test_unknown_method_lists_the_registered_ones(toy):
    with pytest.raises(errors.UsageError) as e:
        registry.method_spec("nope")
    assert "toy" in e.value.hint and "gptq" in e.value.hint


def test_a_spec_with_an_unknown_memory_model_is_refused():
    with pytest.raises(ValueError, match="memory_model"):
        replace(TOY, memory_model="guess")


def test_every_registered_method_names_a_format_the_planner_sizes():
    from qtk import plan as P

    for spec in registry.methods():
        assert spec.weights == "group" or spec.weights in P.FORMATS, spec
        assert P.quantized_format(spec.name).linear_bits > 0


def test_a_method_whose_weights_the_planner_does_not_know_is_refused_by_name():
    from qtk import plan as P

    registry.register(replace(TOY, name="toy-bad", weights="int3-mystery"))
    try:
        with pytest.raises(ValueError, match="toy-bad.*int3-mystery"):
            P.quantized_format("toy-bad")
    finally:
        registry.unregister("toy-bad")


def test_registered_method_appears_in_the_cli(qtk, toy):
    r = qtk("quantize", "--help")
    assert r.exit_code == 0
    assert "[gptq|awq|nf4|" in r.stdout and "|toy]" in r.stdout and "a toy that copies the weights" in r.stdout
    r = qtk("quantize", "x/y", "--method", "toy-not")
    assert r.exit_code == 2 and "toy" in r.stderr


def test_registered_method_is_planned_by_its_memory_model(toy):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_attention_heads": 32,
           "num_key_value_heads": 8, "num_hidden_layers": 16, "intermediate_size": 8192, "vocab_size": 128256}
    shape = P.shape_from_config(cfg)
    assert P.quantized_format("toy") == P.FORMATS["nf4"]
    assert P.quantize_memory(shape, "toy", device="cuda") == P.quantize_memory(shape, "nf4", device="cuda")
    with pytest.raises(errors.UsageError):
        P.quantize_memory(shape, "nope", device="cuda")


def _manifest(tmp_path, method: str, **params) -> object:
    text = f'store = "store"\n[[models]]\nrepo = "acme/tiny-llama"\n[[models.recipes]]\nmethod = "{method}"\n'
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in params.items())
    path = tmp_path / f"m-{len(list(tmp_path.glob('m-*')))}.toml"
    path.write_text(text)
    return path


def test_provision_validates_and_keys_a_registered_method(toy, tmp_path):
    pytest.importorskip("numpy")  # provision's verify step options live in qtk.verify (numpy)
    from qtk.provision.manifest import ManifestError, load_manifest
    from qtk.provision.run import ProvisionOptions, Provisioner

    with pytest.raises(ManifestError) as e:
        load_manifest(_manifest(tmp_path, "nope"))
    assert "toy" in e.value.hint
    m = load_manifest(_manifest(tmp_path, "toy", bits=2, samples=8))
    spec, recipe = m.models[0], m.models[0].recipes[0]
    assert recipe.method == "toy"
    prov = Provisioner(m, ProvisionOptions(dry_run=True))
    keys = prov._inputs(spec, recipe, {"repo": "acme/tiny-llama", "commit": "0" * 40})["keys"]
    # toy reads bits only: the calibration sample count does not change its quantize key; bits does
    m2 = load_manifest(_manifest(tmp_path, "toy", bits=2, samples=64))
    m3 = load_manifest(_manifest(tmp_path, "toy", bits=3))
    k2 = Provisioner(m2, ProvisionOptions(dry_run=True))._inputs(m2.models[0], m2.models[0].recipes[0],
                                                                 {"repo": "acme/tiny-llama", "commit": "0" * 40})["keys"]
    k3 = Provisioner(m3, ProvisionOptions(dry_run=True))._inputs(m3.models[0], m3.models[0].recipes[0],
                                                                 {"repo": "acme/tiny-llama", "commit": "0" * 40})["keys"]
    assert k2["quantize"] == keys["quantize"] and k3["quantize"] != keys["quantize"]
    # the allowed values are the method class's (Toy.bits), checked when the manifest loads
    with pytest.raises(ManifestError, match=r"recipes\[0\]\.bits: toy supports 2 or 3 bits, not 5"):
        load_manifest(_manifest(tmp_path, "toy", bits=5))


def test_registered_method_runs_through_the_shared_pipeline(qtk, toy, hub_root, tmp_path):
    pytest.importorskip("torch")
    src = hub_root / "acme" / "tiny-llama"
    if not src.is_dir():
        pytest.skip("tiny-llama fixture needs numpy/safetensors")
    r = qtk("quantize", str(src), "--method", "toy", "--bits", "2", "-o", str(tmp_path / "out"), "--json")
    assert r.exit_code == 0, r.stderr
    prov = json.loads((tmp_path / "out" / "qtk_provenance.json").read_text())
    assert prov["method"] == "toy" and prov["quantization_config"]["quant_method"] == "toy"
