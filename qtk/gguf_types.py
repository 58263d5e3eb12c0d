"""llama.cpp's GGUF file types, and which tensor type each tensor of a decoder gets under each of them.

Torch-free and gguf-free: the planner (:mod:`qtk.plan`) sizes GGUF outputs from config.json alone,
and the GGUF method validates ``--gguf-type`` with it before any work.

Two tables come from llama.cpp at the vendored commit (qtk/_vendor/llama_cpp/VENDORED.json):

- ``GGML_TYPES``: block size and bytes per block of every tensor type (gguf-py's ``GGML_QUANT_SIZES``;
  ``tests/test_gguf_types.py`` checks this copy against the vendored gguf-py);
- the per-tensor type choice of ``llama_model_quantize`` (``src/llama-quant.cpp``:
  ``llama_ftype_get_default_type``, ``llama_tensor_get_type_impl``, ``tensor_type_fallback``), ported in
  :func:`tensor_type` for the tensors of Llama-style decoders (dense, and MoE with stacked experts). A
  K-quant "mix" (Q4_K_M...) keeps some tensors at more bits (attn_v and ffn_down of some layers, the
  output/tied embedding); a tensor whose row width is not a multiple of the type's block (SmolLM2's
  576-wide inputs against K-quants' 256) falls back to a 32-block type. The tests compare this port
  with the tensor types of files ``llama_model_quantize`` wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GGML_TYPES", "FileType", "FILE_TYPES", "file_type", "GGUFTensor", "decoder_tensors",
           "tensor_type", "planned_types", "tensor_bytes", "IMATRIX_UNUSED"]

QK_K = 256
# ggml type -> (id, block size, bytes per block): gguf-py constants.GGML_QUANT_SIZES / GGMLQuantizationType
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q8_1": (9, 32, 36),
    "Q2_K": (10, QK_K, 2 + 2 + QK_K // 16 + QK_K // 4), "Q3_K": (11, QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    "Q4_K": (12, QK_K, 2 + 2 + QK_K // 2 + 12), "Q5_K": (13, QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    "Q6_K": (14, QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16), "Q8_K": (15, QK_K, 4 + QK_K + QK_K // 8),
    "IQ2_XXS": (16, QK_K, 2 + QK_K // 4), "IQ2_XS": (17, QK_K, 2 + QK_K // 4 + QK_K // 32),
    "IQ3_XXS": (18, QK_K, 2 + QK_K // 4 + QK_K // 8), "IQ1_S": (19, QK_K, 2 + QK_K // 8 + QK_K // 16),
    "IQ4_NL": (20, 32, 18), "IQ3_S": (21, QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    "IQ2_S": (22, QK_K, 2 + QK_K // 4 + QK_K // 16), "IQ4_XS": (23, QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    "I8": (24, 1, 1), "I16": (25, 1, 2), "I32": (26, 1, 4), "I64": (27, 1, 8), "F64": (28, 1, 8),
    "IQ1_M": (29, QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32), "BF16": (30, 1, 2),
    "TQ1_0": (34, QK_K, 2 + 4 * 13), "TQ2_0": (35, QK_K, 2 + 64), "MXFP4": (39, 32, 17), "NVFP4": (40, 64, 36),
    "Q1_0": (41, 128, 18), "Q2_0": (42, 64, 18),
}
GGML_TYPE_NAMES = {v[0]: k for k, v in GGML_TYPES.items()}


@dataclass(frozen=True)
class FileType:
    name: str  # as llama-quantize and file names spell it: Q4_K_M
    ftype: int  # llama_ftype (LLAMA_FTYPE_MOSTLY_<name>)
    default: str  # llama_ftype_get_default_type
    needs_imatrix: bool  # qtk refuses it without an importance matrix
    description: str


# The file types qtk makes. needs_imatrix: llama.cpp refuses IQ1/IQ2/IQ3_XXS and Q2_K_S without one; qtk
# refuses every IQ type without one (their grids are chosen for importance-weighted errors).
FILE_TYPES: dict[str, FileType] = {f.name: f for f in [
    FileType("F16", 1, "F16", False, "16-bit float, unquantized"),
    FileType("BF16", 32, "BF16", False, "bfloat16, unquantized (the conversion itself)"),
    FileType("Q8_0", 7, "Q8_0", False, "8.5 bpw, near-lossless"),
    FileType("Q6_K", 18, "Q6_K", False, "6.56 bpw k-quant"),
    FileType("Q5_K_M", 17, "Q5_K", False, "5-bit k-quant mix (some tensors Q6_K)"),
    FileType("Q5_K_S", 16, "Q5_K", False, "5-bit k-quant"),
    FileType("Q4_K_M", 15, "Q4_K", False, "4-bit k-quant mix (attn_v/ffn_down of some layers Q6_K): the usual choice"),
    FileType("Q4_K_S", 14, "Q4_K", False, "4-bit k-quant, smaller mix"),
    FileType("Q4_0", 2, "Q4_0", False, "legacy 4-bit, 32-blocks"),
    FileType("IQ4_XS", 30, "IQ4_XS", True, "4.25 bpw non-linear grid"),
    FileType("IQ4_NL", 25, "IQ4_NL", True, "4.5 bpw non-linear grid, 32-blocks"),
    FileType("Q3_K_L", 13, "Q3_K", False, "3-bit k-quant, large mix"),
    FileType("Q3_K_M", 12, "Q3_K", False, "3-bit k-quant mix"),
    FileType("Q3_K_S", 11, "Q3_K", False, "3-bit k-quant"),
    FileType("IQ3_M", 27, "IQ3_S", True, "3.7 bpw i-quant mix"),
    FileType("IQ3_XXS", 23, "IQ3_XXS", True, "3.06 bpw i-quant"),
    FileType("Q2_K", 10, "Q2_K", False, "2-bit k-quant mix"),
    FileType("IQ2_M", 29, "IQ2_S", True, "2.7 bpw i-quant mix"),
    FileType("IQ2_XS", 20, "IQ2_XS", True, "2.31 bpw i-quant"),
    FileType("IQ2_XXS", 19, "IQ2_XXS", True, "2.06 bpw i-quant"),
    FileType("IQ1_M", 31, "IQ1_M", True, "1.75 bpw i-quant (quality drops sharply)"),
]}
# file types whose tensors ignore an importance matrix (no point in computing one for them alone)
IMATRIX_UNUSED = frozenset({"F16", "BF16", "Q8_0"})


def file_type(name: str) -> FileType:
    """The :class:`FileType` of ``name`` (case-insensitive); KeyError when qtk does not make it."""
    return FILE_TYPES[name.strip().upper()]


@dataclass(frozen=True)
class GGUFTensor:
    name: str  # GGUF name, e.g. blk.3.attn_v.weight
    shape: tuple[int, ...]  # ggml order: ne0 (row width) first
    converted: str = "BF16"  # the type the converter writes (1D tensors and norms: F32)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def decoder_tensors(*, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                    intermediate: int, tied: bool, experts: int = 0, expert_intermediate: int = 0,
                    shared_expert_intermediate: int = 0, attention_bias: bool = False) -> list[GGUFTensor]:
    """The tensors llama.cpp's converter writes for a Llama-style decoder, in the quantizer's order
    (llama_model_loader sorts by block number, then by name)."""
    q, kv = heads * head_dim, kv_heads * head_dim
    top = [GGUFTensor("token_embd.weight", (hidden, vocab)), GGUFTensor("output_norm.weight", (hidden,), "F32")]
    if not tied:
        top.append(GGUFTensor("output.weight", (hidden, vocab)))
    out = sorted(top, key=lambda t: t.name)
    for i in range(layers):
        p = f"blk.{i}."
        blk = [GGUFTensor(p + "attn_norm.weight", (hidden,), "F32"), GGUFTensor(p + "ffn_norm.weight", (hidden,), "F32"),
               GGUFTensor(p + "attn_q.weight", (hidden, q)), GGUFTensor(p + "attn_k.weight", (hidden, kv)),
               GGUFTensor(p + "attn_v.weight", (hidden, kv)), GGUFTensor(p + "attn_output.weight", (q, hidden))]
        if attention_bias:
            blk += [GGUFTensor(p + f"attn_{n}.bias", (w,), "F32") for n, w in (("q", q), ("k", kv), ("v", kv))]
        if experts:
            e = expert_intermediate
            blk += [GGUFTensor(p + "ffn_gate_inp.weight", (hidden, experts), "F32"),
                    GGUFTensor(p + "ffn_gate_exps.weight", (hidden, e, experts)),
                    GGUFTensor(p + "ffn_up_exps.weight", (hidden, e, experts)),
                    GGUFTensor(p + "ffn_down_exps.weight", (e, hidden, experts))]
            if shared_expert_intermediate:
                s = shared_expert_intermediate
                blk += [GGUFTensor(p + "ffn_gate_shexp.weight", (hidden, s)), GGUFTensor(p + "ffn_up_shexp.weight", (hidden, s)),
                        GGUFTensor(p + "ffn_down_shexp.weight", (s, hidden))]
        else:
            blk += [GGUFTensor(p + "ffn_gate.weight", (hidden, intermediate)),
                    GGUFTensor(p + "ffn_up.weight", (hidden, intermediate)),
                    GGUFTensor(p + "ffn_down.weight", (intermediate, hidden))]
        out += sorted(blk, key=lambda t: t.name)
    return out


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _allows_quantization(t: GGUFTensor) -> bool:
    """tensor_allows_quantization, for the tensors decoder_tensors() lists."""
    return (len(t.shape) >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name
            and "ffn_gate_inp.weight" not in t.name)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(t: GGUFTensor, want: str) -> str:
    """tensor_type_fallback: a row width the type's block does not divide takes a 32-block type (or F16)."""
    ncols, block = t.shape[0], GGML_TYPES[want][1]
    if ncols % block == 0:
        return want
    to = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
          "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_0": "Q4_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
          "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(want, want)
    return to if ncols % GGML_TYPES[to][1] == 0 else "F16"


@dataclass
class _State:
    """quantize_state_impl's counters, advanced tensor by tensor in the quantizer's order."""

    n_attention_wv: int
    n_layer: int
    tied: bool
    n_gqa: float
    n_expert: int
    is_70b: bool
    has_imatrix: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _layer(st: _State, counter: int, name: str) -> int:
    return int(name.split(".")[1]) if st.n_expert > 1 else counter


def tensor_type(st: _State, t: GGUFTensor, ft: FileType) -> str:  # noqa: C901, PLR0912 - a port, kept in its shape
    """llama_tensor_get_type + llama_tensor_get_type_impl for one tensor (advances ``st``'s counters).
    Long because it mirrors llama-quant.cpp branch for branch, which is what makes it checkable."""
    if not _allows_quantization(t):
        return t.converted
    new = ft.default
    if new in ("F16", "BF16", "F32"):  # not ggml_is_quantized: no mixing, no fallback
        return new
    f, cat, name = ft.name, _category(t.name), t.name
    low_iq = f in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")
    if cat == "output" or (st.tied and cat == "token_embd"):
        if t.shape[0] % GGML_TYPES[new][1] != 0:
            new = "Q8_0"
        elif low_iq:
            new = "Q5_K"
        elif new != "Q8_0":
            new = "Q6_K"
    elif cat == "token_embd":
        if f in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            new = "Q2_K"
        elif f in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            new = "IQ3_S"
    elif f in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
        if cat in ("attn_v", "attn_qkv", "attn_kv_b"):
            if st.n_gqa >= 4 or st.n_expert >= 4:
                new = "Q4_K"
            else:
                new = "IQ3_S" if f in ("IQ2_S", "IQ2_M") else "Q2_K"
            st.i_attention_wv += 1
        elif st.n_expert == 8 and cat == "attn_k":
            new = "Q4_K"
        elif cat == "ffn_down":
            if st.i_ffn_down < st.n_layer // 8:
                new = "IQ3_S" if f in ("IQ2_S", "IQ2_M") else "Q2_K"
            st.i_ffn_down += 1
        elif cat == "attn_output":
            if st.n_expert == 8:
                new = "Q5_K"
            elif f in ("IQ1_S", "IQ1_M"):
                new = "IQ2_XXS"
            elif f in ("IQ2_S", "IQ2_M"):
                new = "IQ3_S"
    elif cat in ("attn_v", "attn_qkv", "attn_kv_b"):
        new = _attn_v(st, f, new)
        st.i_attention_wv += 1
    elif cat == "attn_k":
        if st.n_expert == 8:
            new = "Q8_0"
        elif f == "IQ3_XS":
            new = "IQ3_XXS"
        elif f == "IQ3_XXS":
            new = "IQ2_S"
    elif cat == "attn_q":
        if f == "IQ3_XS":
            new = "IQ3_XXS"
        elif f == "IQ3_XXS":
            new = "IQ2_S"
    elif cat == "ffn_down":
        new = _ffn_down(st, f, new, _layer(st, st.i_ffn_down, name))
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if st.n_expert == 8:
            if f in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M",
                     "IQ4_XS"):
                new = "Q5_K"
        else:
            new = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(f, new)
    elif cat in ("ffn_gate", "ffn_up"):
        counter = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i = _layer(st, getattr(st, counter), name)
        if f == "IQ3_XS" and st.n_layer // 8 <= i < 7 * st.n_layer // 8:
            new = "IQ3_XXS"
        setattr(st, counter, getattr(st, counter) + 1)
    return _fallback(t, new)


def _attn_v(st: _State, f: str, new: str) -> str:
    if f == "Q2_K":
        new = "Q4_K" if st.n_gqa >= 4 else "Q3_K"
    elif f == "Q2_K_S" and st.n_gqa >= 4:
        new = "Q4_K"
    elif f == "IQ3_XXS":
        new = "Q4_K" if st.n_gqa >= 4 else ("IQ3_S" if not st.has_imatrix else "IQ3_XXS")
    elif f in ("IQ3_XS", "IQ3_S") and st.n_gqa >= 4:
        new = "Q4_K"
    elif f == "IQ3_M":
        new = "Q4_K"
    elif f == "Q3_K_M":
        new = "Q5_K" if st.i_attention_wv < 2 else "Q4_K"
    elif f == "Q3_K_L":
        new = "Q5_K"
    elif f in ("IQ4_NL", "IQ4_XS") and st.n_gqa >= 4:
        new = "Q5_K"
    elif f in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
        new = "Q6_K"
    elif f == "Q4_K_S" and st.i_attention_wv < 4:
        new = "Q5_K"
    if st.is_70b and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"
    if st.n_expert == 8:
        new = "Q8_0"
    return new


def _ffn_down(st: _State, f: str, new: str, i: int) -> str:
    n = st.n_layer
    if f == "Q2_K":
        return "Q3_K"
    if f == "Q2_K_S":
        return "Q4_K" if i < n // 8 else new
    if f == "IQ3_XXS" and not st.has_imatrix:
        return "Q4_K" if i < n // 8 else "Q3_K"
    if f == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"  # arch != FALCON: use_more_bits or not, Q4_K
    if f == "IQ3_M" and (i < n // 8 or (st.n_expert == 8 and _use_more_bits(i, n))):
        return "Q4_K"
    if f == "Q3_K_L":
        return "Q5_K"
    if f == "Q4_K_M":
        return "Q6_K" if _use_more_bits(i, n) else new
    if i < n // 8 and f in ("IQ4_NL", "IQ4_XS") and not st.has_imatrix:
        return "Q5_K"
    if f == "Q5_K_M" and _use_more_bits(i, n):
        return "Q6_K"
    if f == "Q4_K_S" and i < n // 8:
        return "Q5_K"
    if f in ("Q4_0", "Q5_0") and st.has_imatrix and i < n // 8:
        return "Q4_1" if f == "Q4_0" else "Q5_1"
    return new


def planned_types(tensors: list[GGUFTensor], ft: FileType, *, n_layer: int, heads: int, kv_heads: int,
                  experts: int = 0, architecture: str = "llama", has_imatrix: bool = True) -> dict[str, str]:
    """GGUF tensor name -> the ggml type ``llama_model_quantize`` gives it under ``ft``."""
    st = _State(
        n_attention_wv=sum(_category(t.name) in ("attn_v", "attn_qkv", "attn_kv_b") for t in tensors),
        n_layer=n_layer, tied=not any(t.name == "output.weight" for t in tensors),
        n_gqa=heads / max(kv_heads, 1), n_expert=max(1, experts),
        is_70b=architecture == "llama" and n_layer == 80 and heads != kv_heads, has_imatrix=has_imatrix)
    return {t.name: tensor_type(st, t, ft) for t in tensors}


def tensor_bytes(t: GGUFTensor, ggml_type: str) -> int:
    _, block, size = GGML_TYPES[ggml_type]
    return t.elements // block * size
