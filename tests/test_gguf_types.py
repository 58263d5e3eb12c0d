"""GGUF without a model: llama.cpp's type table as qtk carries it, the planner's GGUF sizes, --gguf-type and
--no-imatrix validation (CLI, options, manifests), and the importance-matrix file format read back by gguf-py."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qtk import errors
from qtk.quantize.base import QuantizeOptions
from qtk.quantize.gguf_convert import VENDOR_DIR, converter_info, supported_architectures
from qtk.gguf_types import FILE_TYPES, GGML_TYPES, GGUFTensor, _fallback, file_type

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256,
            "tie_word_embeddings": False}
SMOL = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}


def _vendored_constants():
    """gguf-py's constants.py as vendored (stdlib only), loaded under a private name: never as `gguf`."""
    spec = importlib.util.spec_from_file_location("_qtk_test_vendored_gguf_constants",
                                                  VENDOR_DIR / "gguf-py" / "gguf" / "constants.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses/enums look their module up while the file executes
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


def test_vendored_converter_is_whole_and_pinned():
    info = converter_info()  # re-hashes the tree: every file shipped, none edited
    assert info["llama_cpp_commit"] == "0c1e57098" and "0.3.36" in info["source"]
    assert (VENDOR_DIR / "LICENSE").read_text().startswith("MIT License")
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= supported_architectures()


def test_type_table_is_the_vendored_gguf_py_one():
    c = _vendored_constants()
    ours = {name: (tid, block, size) for name, (tid, block, size) in GGML_TYPES.items()}
    theirs = {t.name: (int(t), *c.GGML_QUANT_SIZES[t]) for t in c.GGMLQuantizationType}
    assert ours == theirs


def test_file_types_are_llama_cpps():
    c = _vendored_constants()
    for ft in FILE_TYPES.values():
        assert c.LlamaFileType[f"MOSTLY_{ft.name}"] == ft.ftype, ft.name
        assert ft.default in GGML_TYPES
    try:
        import llama_cpp
    except ImportError:
        return
    for ft in FILE_TYPES.values():  # the bindings qtk calls take the same numbers
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ft.name}") == ft.ftype, ft.name


def test_issue_types_are_all_made():
    assert {"BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_M", "IQ2_XS"} <= set(FILE_TYPES)
    assert all(FILE_TYPES[t].needs_imatrix for t in FILE_TYPES if t.startswith("IQ"))


@settings(max_examples=200, deadline=None)
@given(ncols=st.integers(1, 20000), want=st.sampled_from(sorted(t for t in GGML_TYPES if GGML_TYPES[t][1] > 1)))
def test_fallback_always_fits_the_row(ncols, want):
    got = _fallback(GGUFTensor("blk.0.attn_q.weight", (ncols, 8)), want)
    assert ncols % GGML_TYPES[got][1] == 0
    assert got == want or ncols % GGML_TYPES[want][1] != 0


def test_plan_sizes_every_type_and_k_quants_shrink_in_order(qtk, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA_8B))
    order = ["BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "IQ4_XS", "Q3_K_M", "IQ2_XS"]
    r = qtk("plan", str(cfg), "--formats", ",".join(f"gguf-{t.lower()}" for t in order), "--json")
    assert r.exit_code == 0, r.stderr
    sizes = [row["weight_bytes"] for row in json.loads(r.stdout)["formats"]]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    # BF16: every 2D tensor 2 bytes, norms F32 (the converter's types)
    from qtk.plan import shape_from_config

    shape = shape_from_config(LLAMA_8B)
    assert sizes[0] == 2 * shape.total + 2 * shape.params["norms"]


@pytest.mark.parametrize("given_types,expected", [
    ("q4_k_m", ("Q4_K_M",)),
    (" Q8_0 ", ("Q8_0",)),
    (("q8_0", "Q8_0", "IQ4_XS"), ("Q8_0", "IQ4_XS")),
    (["Q6_K", "q4_k_s"], ("Q6_K", "Q4_K_S")),
    ((), ()),
])
def test_gguf_types_have_one_spelling(given_types, expected):
    assert QuantizeOptions("gguf", gguf_type=given_types).gguf_type == expected


@pytest.mark.parametrize("types,imatrix,bits,field,words", [
    ((), True, 4, "gguf_type", "at least one type"),
    (("Q4_K_X",), True, 4, "gguf_type", "unknown GGUF type Q4_K_X"),
    (("Q4_K_M", "Q9"), True, 4, "gguf_type", "unknown GGUF type Q9"),
    (("IQ2_XS",), False, 4, "imatrix", "IQ2_XS is refused without an importance matrix"),
    (("Q4_K_M", "IQ4_XS", "IQ2_XS"), False, 4, "imatrix", "IQ4_XS, IQ2_XS are refused"),
    (("Q4_K_M",), True, 8, "bits", "from --gguf-type"),
])
def test_gguf_option_problems(types, imatrix, bits, field, words):
    from qtk.quantize.gguf import GGUF

    problems = GGUF().option_problems(QuantizeOptions("gguf", bits=bits, gguf_type=types, imatrix=imatrix))
    assert words in problems[field]


def test_k_quants_without_imatrix_and_unweighted_types_read_no_calibration():
    from qtk.quantize.gguf import GGUF

    m = GGUF()
    assert m.option_problems(QuantizeOptions("gguf", gguf_type=("Q4_K_M",), imatrix=False, samples=0)) == {}
    assert not m.calibrates(QuantizeOptions("gguf", gguf_type=("Q4_K_M",), imatrix=False))
    assert not m.calibrates(QuantizeOptions("gguf", gguf_type=("BF16", "Q8_0")))  # they ignore an imatrix
    assert m.calibrates(QuantizeOptions("gguf", gguf_type=("Q8_0", "Q4_K_M")))


def test_cli_refuses_iq_without_imatrix_before_any_work(qtk, tmp_path):
    """No model is read: the refusal comes from the options alone (a path that is not even a model)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**SMOL, "torch_dtype": "bfloat16"}))
    (src / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    r = qtk("quantize", str(src), "--method", "gguf", "--gguf-type", "IQ2_XS", "--no-imatrix", "-o", str(tmp_path / "o"))
    if r.exit_code == errors.BackendUnavailableError.exit_code:
        pytest.skip("gguf export backends not installed: " + r.stderr)
    assert r.exit_code == errors.UnsupportedConfigError.exit_code, r.stderr
    assert "IQ2_XS is refused without an importance matrix" in r.stderr and "Drop --no-imatrix" in r.stderr
    assert not (tmp_path / "o").exists()


def _manifest(tmp_path, recipe: str):
    p = tmp_path / "m.toml"
    p.write_text(f'store = "store"\n[[models]]\nrepo = "acme/smol"\n[[models.recipes]]\nmethod = "gguf"\n{recipe}\n')
    return p


@pytest.mark.parametrize("recipe,words,where", [
    ('gguf_type = ["Q4_K_M", "Q8_0"]', "expected a string", "recipes[0].gguf_type"),
    ('gguf_type = "Q4_K_X"', "unknown GGUF type Q4_K_X", "recipes[0].gguf_type"),
    ('gguf_type = "IQ2_XS"\nimatrix = false', "refused without an importance matrix", "recipes[0].imatrix"),
    ("", "at least one type", "gguf_type"),
    ('gguf_type = "Q4_K_M"\nimatrix = "no"', "expected true/false", "recipes[0].imatrix"),
])
def test_manifest_refuses_bad_gguf_recipes_at_load(tmp_path, recipe, words, where):
    pytest.importorskip("numpy")  # provision's manifest reads qtk.verify's gate table
    from qtk.provision.manifest import ManifestError, load_manifest

    with pytest.raises(ManifestError) as e:
        load_manifest(_manifest(tmp_path, recipe))
    assert words in str(e.value) and where in str(e.value)


def test_manifest_gguf_recipe_is_keyed_by_type_and_imatrix(tmp_path):
    pytest.importorskip("numpy")
    from qtk.provision.manifest import load_manifest
    from qtk.provision.run import ProvisionOptions, Provisioner

    def key(recipe: str) -> str:
        m = load_manifest(_manifest(tmp_path, recipe))
        return Provisioner(m, ProvisionOptions(dry_run=True))._inputs(
            m.models[0], m.models[0].recipes[0], {"repo": "acme/smol", "commit": "0" * 40})["keys"]["quantize"]

    base = key('gguf_type = "Q4_K_M"')
    assert key('gguf_type = "q4_k_m"') == base  # one spelling
    assert key('gguf_type = "Q4_K_M"\nbits = 4') == base  # not read by gguf
    assert len({base, key('gguf_type = "Q5_K_M"'), key('gguf_type = "Q4_K_M"\nimatrix = false'),
                key('gguf_type = "Q4_K_M"\nsamples = 16')}) == 4


names = st.lists(st.from_regex(r"blk\.[0-9]{1,2}\.(attn_[qkv]|ffn_(up|down|gate))\.weight", fullmatch=True),
                 min_size=1, max_size=6, unique=True)


@settings(max_examples=25, deadline=None)
@given(names=names, cols=st.integers(1, 300), counts=st.integers(1, 10**6),
       datasets=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=2), chunks=st.integers(0, 5000))
def test_imatrix_file_round_trips_through_gguf_py(tmp_path_factory, names, cols, counts, datasets, chunks):
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    from qtk.quantize.imatrix import Imatrix

    rng = np.random.default_rng(cols)
    im = Imatrix({n: rng.random(cols) * 1e3 for n in names}, {n: counts + i for i, n in enumerate(names)},
                 chunk_count=chunks, chunk_size=256, datasets=datasets)
    path = tmp_path_factory.mktemp("im") / "x.imatrix"
    im.write(path)
    r = gguf.GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == datasets
    assert r.fields["imatrix.chunk_count"].contents() == chunks
    assert r.fields["imatrix.chunk_size"].contents() == 256
    got = {t.name: t for t in r.tensors}
    assert [t.name for t in r.tensors] == [f"{n}.{s}" for n in sorted(names) for s in ("in_sum2", "counts")]
    for i, n in enumerate(names):
        s, c = got[f"{n}.in_sum2"], got[f"{n}.counts"]
        assert s.tensor_type.name == "F32" and list(map(int, s.shape)) == [cols, 1]
        np.testing.assert_allclose(np.asarray(s.data).ravel(), im.sums[n].astype(np.float32))
        assert float(np.asarray(c.data).ravel()[0]) == np.float32(counts + i)
        np.testing.assert_allclose(im.means()[n], (im.sums[n] / (counts + i)).astype(np.float32), rtol=1e-6)


def test_every_file_type_name_parses_case_insensitively():
    for name in FILE_TYPES:
        assert file_type(name.lower()).name == name
    with pytest.raises(KeyError):
        file_type("Q4_K_X")
