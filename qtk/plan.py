"""Memory planning from config.json alone: parameters, weight bytes per format, KV cache, GPU fit.

Units: weights in GB (10^9 bytes: parameters x bytes, as model cards and vendors quote them);
KV cache in GiB (2^30 bytes, as the Llama 3.1 tables quote it). Every number is also given in bytes
(``--json``), and the fit check works in bytes.

The KV cache of a decoder is ``2 (K and V) x layers x kv_heads x head_dim x tokens x batch x bytes``;
it depends on the checkpoint's ``num_key_value_heads``: the published Llama 3.1 405B config has 8 KV
heads (0.492 GiB per 1,024 tokens in FP16); the often-copied table value 0.984 corresponds to 16.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import errors
from .hfload import read_config
from .gguf_types import FILE_TYPES as _GGUF_TYPES
from .gguf_types import GGML_TYPES as _GGML_TYPES

__all__ = ["ModelShape", "FORMATS", "GPUS", "shape_from_config", "weight_bytes", "kv_bytes", "plan",
           "parse_context", "parse_gpus", "load_config"]

GB, GiB = 1e9, 2**30

# name -> nominal memory in GB, as sold (the fit check uses nominal x 10^9 bytes: conservative)
GPUS = {"L4": 24, "RTX-4090": 24, "A100-40G": 40, "L40S": 48, "A6000": 48, "A100-80G": 80, "H100-80G": 80,
        "H100-NVL": 94, "H200": 141}

KV_DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    linear_bits: float  # bits per weight of the decoder's linear layers, scales/zeros included
    other_bits: float  # embeddings, lm_head, norms
    gguf: str | None = None  # a GGUF file type (Q4_K_M): sized tensor by tensor as llama.cpp's quantizer types them


def _type_bits(ggml_type: str) -> float:
    _, block, size = _GGML_TYPES[ggml_type]
    return size * 8 / block


def _group_bits(group: int, zero_bits: float) -> float:
    # 4-bit weights + one fp16 scale and one packed zero point per group
    return 4 + (16 + zero_bits) / group


# GGUF types: each tensor sized at the type llama_model_quantize gives it (qtk.gguf_types: llama.cpp's
# type table and its per-tensor mix rules; a K-quant mix keeps some tensors at more bits, rows whose width the
# 256-block does not divide fall back to 32-block types). linear_bits: the file type's base type, for display.
FORMATS = {f.name: f for f in [
    Format("bf16", "16-bit (BF16/FP16)", 16, 16),
    Format("fp8", "8-bit FP8 (params x 1 byte)", 8, 8),
    Format("int8", "8-bit integer (params x 1 byte)", 8, 8),
    Format("int4", "4-bit, every parameter (params x 0.5 byte; the vendor-table convention)", 4, 4),
    Format("gptq-g128", "GPTQ 4-bit, group 128 (fp16 scale + 4-bit zero per group; embeddings/lm_head 16-bit)",
           _group_bits(128, 4), 16),
    Format("awq-g128", "AWQ 4-bit, group 128 (fp16 scale + 4-bit zero per group; embeddings/lm_head 16-bit)",
           _group_bits(128, 4), 16),
    # NF4 with double quantization: 4 bits + 8-bit absmax per 64 weights + fp32 per 256 absmax
    Format("nf4", "bitsandbytes NF4, double quant (embeddings/lm_head 16-bit)", 4 + 8 / 64 + 32 / (64 * 256), 16),
    # qtk quantize --method fp8 / w8a8 (compressed-tensors): 8-bit linears + one 16-bit scale per output row
    # (16 / in_features bits per weight: 0.03 at SmolLM2's 576, 0.004 at 4096), embeddings/lm_head/norms 16-bit
    Format("fp8-dynamic", "FP8 E4M3 per-channel, dynamic per-token activations (compressed-tensors; "
           "embeddings/lm_head 16-bit)", 8.01, 16),
    Format("int8-w8a8", "INT8 per-channel, dynamic per-token activations (compressed-tensors; "
           "embeddings/lm_head 16-bit)", 8.01, 16),
    *(Format(f"gguf-{t.name.lower()}", f"GGUF {t.name} ({t.description})", _type_bits(t.default),
             _type_bits(t.default), gguf=t.name) for t in _GGUF_TYPES.values()),
]}


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied_embeddings: bool
    experts: int = 0  # 0: dense
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    attention_bias: bool = False
    # parameter counts, filled by shape_from_config
    params: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.params.values())

    @property
    def linear(self) -> int:
        """Parameters in the decoder's linear layers (what GPTQ/AWQ/NF4 quantize)."""
        return self.params["attention"] + self.params["mlp"]


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    if default is not None:
        return default
    raise errors.ModelFormatError(f"config.json has none of {', '.join(names)}: not a decoder config qtk knows.",
                                  hint="qtk plan reads Llama/Mistral/Qwen/Gemma-style decoder configs.")


def shape_from_config(cfg: dict) -> ModelShape:
    if "text_config" in cfg and "hidden_size" not in cfg:  # multimodal wrappers: plan the language model
        cfg = cfg["text_config"]
    hidden = int(_get(cfg, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(cfg, "num_attention_heads", "n_head"))
    kv_heads = int(_get(cfg, "num_key_value_heads", "num_kv_heads", default=heads))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(_get(cfg, "num_hidden_layers", "n_layer"))
    vocab = int(_get(cfg, "vocab_size"))
    intermediate = int(_get(cfg, "intermediate_size", "ffn_dim", default=4 * hidden))
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
    expert_inter = int(cfg.get("moe_intermediate_size") or (intermediate if experts else 0))
    shared_inter = int(cfg.get("shared_expert_intermediate_size") or 0)
    if cfg.get("n_shared_experts"):
        shared_inter = int(cfg["n_shared_experts"]) * expert_inter
    tied = bool(cfg.get("tie_word_embeddings", False))
    bias = bool(cfg.get("attention_bias", False)) or cfg.get("model_type") in ("qwen2", "qwen2_moe")

    attn = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
    if bias:
        attn += heads * head_dim + 2 * kv_heads * head_dim
    if experts:
        mlp = experts * 3 * hidden * expert_inter + hidden * experts + 3 * hidden * shared_inter
        if shared_inter:
            mlp += hidden  # the shared expert's gate (Qwen-MoE)
    else:
        mlp = 3 * hidden * intermediate
    params = {
        "embeddings": vocab * hidden,
        "lm_head": 0 if tied else vocab * hidden,
        "attention": layers * attn,
        "mlp": layers * mlp,
        "norms": layers * 2 * hidden + hidden,
    }
    return ModelShape(
        architecture=(cfg.get("architectures") or [cfg.get("model_type", "?")])[0], vocab=vocab, hidden=hidden,
        layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, intermediate=intermediate,
        tied_embeddings=tied, experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0), expert_intermediate=expert_inter,
        shared_expert_intermediate=shared_inter, attention_bias=bias, params=params,
    )


def gguf_weight_bytes(shape: ModelShape, gguf_type: str, *, imatrix: bool = True) -> int:
    """Bytes of the tensors of a GGUF file of ``gguf_type`` (metadata and the tokenizer, a few MB, not
    counted): llama.cpp's converter's tensors, each at the type llama_model_quantize picks for it."""
    from .gguf_types import decoder_tensors, file_type, planned_types, tensor_bytes

    tensors = decoder_tensors(vocab=shape.vocab, hidden=shape.hidden, layers=shape.layers, heads=shape.heads,
                              kv_heads=shape.kv_heads, head_dim=shape.head_dim, intermediate=shape.intermediate,
                              tied=shape.tied_embeddings, experts=shape.experts,
                              expert_intermediate=shape.expert_intermediate,
                              shared_expert_intermediate=shape.shared_expert_intermediate,
                              attention_bias=shape.attention_bias)
    types = planned_types(tensors, file_type(gguf_type), n_layer=shape.layers, heads=shape.heads,
                          kv_heads=shape.kv_heads, experts=shape.experts, has_imatrix=imatrix)
    return sum(tensor_bytes(t, types[t.name]) for t in tensors)


def weight_bytes(shape: ModelShape, fmt: Format) -> int:
    if fmt.gguf:
        return gguf_weight_bytes(shape, fmt.gguf)
    other = shape.total - shape.linear
    return math.ceil(shape.linear * fmt.linear_bits / 8 + other * fmt.other_bits / 8)


def kv_bytes(shape: ModelShape, tokens: int, *, batch: int = 1, dtype: str = "fp16") -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * batch * KV_DTYPES[dtype]


def parse_context(text: str) -> list[int]:
    """'1k,16k,128k' -> [1024, 16384, 131072]; plain numbers are tokens ('16000')."""
    out = []
    for part in str(text).split(","):
        p = part.strip().lower()
        if not p:
            continue
        try:
            n = int(float(p[:-1]) * 1024) if p.endswith("k") else int(p)
        except ValueError:
            raise errors.UsageError(f"--context: {part!r} is not a token count (e.g. 4096, 16k).") from None
        if n <= 0:
            raise errors.UsageError(f"--context: {part!r} must be positive.")
        out.append(n)
    if not out:
        raise errors.UsageError("--context needs at least one token count.")
    return out


def parse_gpus(specs) -> dict[str, float]:
    """Extra GPUs as NAME=GB (repeatable or comma-separated), added to the built-in list."""
    gpus = dict(GPUS)
    for spec in specs or ():
        for item in str(spec).split(","):
            name, sep, gb = item.partition("=")
            try:
                if not sep or not name.strip():
                    raise ValueError
                gpus[name.strip()] = float(gb)
            except ValueError:
                raise errors.UsageError(f"--gpus: {item!r} is not NAME=GB (e.g. MI300X=192).") from None
    return gpus


def load_config(spec: str, *, revision: str | None = None, settings=None) -> tuple[dict, str]:
    """config.json from a file, a checkpoint dir, or a repo id (the cache, else fetched alone with qtk's
    downloader). Returns (config, where it came from)."""
    from .modelspec import parse_spec, resolve_spec

    ref = parse_spec(spec)
    if ref.path is not None:
        path = ref.path
        return read_config(path, missing=f"{path} has no config.json."), str(path if path.is_file() else path / "config.json")
    root, _, commit = resolve_spec(ref, revision=revision, settings=settings, include=["config.json"])
    return read_config(root, missing=f"{spec} has no config.json."), f"{spec}@{commit[:12]}"


@dataclass
class Fit:
    gpu: str
    gpu_gb: float
    tp: int
    per_gpu_bytes: int
    fits: bool


def plan(shape: ModelShape, *, formats: list[str], contexts: list[int], batch: int = 1, kv_dtype: str = "fp16",
         gpus: dict[str, float] | None = None, tp: tuple[int, ...] = (1, 2, 4, 8), margin_gb: float = 2.0,
         utilization: float = 0.9) -> dict:
    """Everything ``qtk plan`` prints. A configuration fits when, per GPU,
    (weights + KV at the longest context) / tp + margin <= utilization x memory."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise errors.UsageError(f"Unknown format(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}.")
    if kv_dtype not in KV_DTYPES:
        raise errors.UsageError(f"Unknown KV dtype {kv_dtype!r}; known: {', '.join(KV_DTYPES)}.")
    gpus = gpus if gpus is not None else dict(GPUS)
    kv = {n: kv_bytes(shape, n, batch=batch, dtype=kv_dtype) for n in contexts}
    longest = max(contexts)
    rows = []
    for name in formats:
        w = weight_bytes(shape, FORMATS[name])
        fits = []
        for gpu, gb in gpus.items():
            for t in tp:
                per_gpu = math.ceil((w + kv[longest]) / t + margin_gb * GB)
                fits.append(Fit(gpu, gb, t, per_gpu, per_gpu <= utilization * gb * GB))
        smallest = {}
        for f in fits:  # per GPU: the fewest GPUs that hold it
            if f.fits and f.gpu not in smallest:
                smallest[f.gpu] = f.tp
        rows.append({"format": name, "description": FORMATS[name].description, "weight_bytes": w,
                     "weight_GB": w / GB, "total_bytes_at_longest_context": w + kv[longest],
                     "min_gpus": smallest, "fits": [asdict(f) for f in fits]})
    return {
        "architecture": shape.architecture,
        "shape": {k: v for k, v in asdict(shape).items() if k != "params"},
        "params": {**shape.params, "total": shape.total, "linear": shape.linear},
        "kv_cache": {"dtype": kv_dtype, "batch": batch,
                     "bytes_per_token": kv_bytes(shape, 1, dtype=kv_dtype),
                     "by_context": [{"tokens": n, "bytes": b, "GiB": b / GiB} for n, b in kv.items()]},
        "assumptions": {"margin_GB_per_gpu": margin_gb, "utilization": utilization, "tp": list(tp),
                        "fit_context_tokens": longest,
                        "units": "weights in GB (1e9 bytes), KV cache in GiB (2^30 bytes), GPUs nominal GB"},
        "formats": rows,
        "gpus": gpus,
    }


# -- memory that qtk's own steps need (quantize, verify), for early refusal and provision --dry-run ---------

def quantized_format(method: str, group_size: int = 128) -> Format:
    """The on-disk/in-memory format a ``qtk quantize`` recipe produces (the method registry's
    ``weights`` says which: a :data:`FORMATS` entry such as NF4 or FP8, or 4-bit with group scales/zeros)."""
    from .methods import method_spec

    weights = method_spec(method).weights
    if weights != "group":
        if weights not in FORMATS:
            raise ValueError(f"method {method!r}: weights {weights!r} is neither 'group' nor one of qtk.plan.FORMATS")
        return FORMATS[weights]
    g = group_size if group_size and group_size > 0 else 1 << 30  # per row: one scale per row
    return Format(f"{method}-g{group_size}", f"{method.upper()} 4-bit, group {group_size}", _group_bits(g, 4), 16)


# The quantizing process itself before any weight is loaded (Python, torch, transformers and the backend
# imported, calibration tokenized), fitted to peak RSS measured on this project's CPU machine (2026-11,
# torch 2.13 CPU, gptqmodel 7.6, bitsandbytes 0.50.2; BENCHMARKS.md, "qtk quantize at scale"): ~0.75 GB
# with GPTQModel (+0.06 GB for AWQ's processor; 0.12 GB before qtk's clip search dropped its [tokens x out]
# temporaries: SmolLM2 2 layers 790 -> 756 MB, Llama-1B width 2 layers 1932 MB), ~0.5 GB with bitsandbytes.
_RUNTIME_BYTES = {"layerwise": 750_000_000, "quantized_load": 500_000_000, "whole_model": 500_000_000}
_CALIBRATION_TOKENS_PER_FORWARD = 8192  # the whole-model methods' calibration batches (qtk.quantize.w8a8)
_AWQ_RUNTIME_EXTRA = 60_000_000


def quantize_memory(shape: ModelShape, method: str, *, device: str, group_size: int = 128, samples: int = 128,
                    seq_len: int = 512) -> dict:
    """Peak memory of ``qtk quantize`` (bytes), by where it lands, and what the method holds at once.

    Layer-wise methods (GPTQ, AWQ through GPTQModel): the model is a lazily loaded shell; one decoder
    layer at a time is materialized (BF16), worked on (float32 copies, GPTQ's float32 Hessian of the
    widest input and its inverse, AWQ's cached inputs of every linear) and offloaded, and freed heap is
    handed back at each layer (qtk calls malloc_trim), so the peak grows with depth only by the finished
    layers' packed 4-bit size: runtime + embeddings + one layer's working set + the calibration
    activations + the packed layers. On a GPU the layer and the activations sit in
    VRAM (calibrated on SmolLM2-135M on an H100: GPTQ 128x512 343 MB measured).

    NF4 (bitsandbytes) loads the whole model: on the CPU the BF16 checkpoint is read in full (its pages
    stay resident) beside the 4-bit copy, so the host peak is runtime + the BF16 weights; on a GPU the
    4-bit model lands in VRAM (113 MB measured for SmolLM2). ``holds`` says which ("whole model" or
    "one layer"), so a refusal can say why."""
    from .methods import method_spec

    bf16 = weight_bytes(shape, FORMATS["bf16"])
    q = weight_bytes(shape, quantized_format(method, group_size))
    model = method_spec(method).memory_model  # the registry says which formula applies
    runtime = _RUNTIME_BYTES.get(model, _RUNTIME_BYTES["layerwise"])
    if model == "quantized_load":  # on the CPU: the BF16 checkpoint read in full, tensors in flight, the 4-bit copy
        host = runtime + (bf16 * 3 // 2 if device == "cpu" else q)
        return {"device": device, "device_bytes": host if device == "cpu" else q, "host_bytes": host,
                "holds": "whole model"}
    if model == "whole_model":
        return _whole_model_memory(shape, method, device, bf16, runtime, samples, seq_len)
    layer = 2 * (shape.linear + shape.params["norms"]) // max(shape.layers, 1)
    tokens = samples * seq_len
    hidden_acts = 3 * tokens * shape.hidden * 2  # the layer's inputs and outputs (BF16), one spare
    widest = max(shape.hidden, shape.intermediate if not shape.experts else shape.expert_intermediate)
    if method == "awq":  # AWQ caches every linear's input (hidden x 4 groups + the MLP's intermediate), keeps
        # float32 master copies of the weights it scales and a quantized scratch copy
        work = tokens * (4 * shape.hidden + widest) * 2 + 4 * layer
    else:  # GPTQ: float32 Hessian of the widest input and its inverse Cholesky factor, float32 copy of the layer
        work = 2 * 4 * widest * widest + 2 * layer
    embed = 2 * shape.params["embeddings"]
    if method == "awq":
        runtime += _AWQ_RUNTIME_EXTRA
    # finished layers, packed to 4 bits, still add ~0.3 of a layer's BF16 per layer (measured: SmolLM2
    # width, 8 -> 32 layers, GPTQ +58 MB for 170 MB of BF16) -- about their 4-bit size
    packed = weight_bytes(shape, quantized_format(method, group_size)) - (shape.total - shape.linear) * 2
    if device == "cpu":
        host = runtime + embed + layer + hidden_acts + work + max(packed, 0)
        return {"device": "cpu", "device_bytes": host, "host_bytes": host, "holds": "one layer"}
    device_bytes = layer + 3 * tokens * shape.hidden * 2 + embed  # what the H100 measurement calibrated
    if method == "awq":
        device_bytes += tokens * (4 * shape.hidden + widest) * 2
    return {"device": device, "device_bytes": device_bytes, "host_bytes": runtime + embed + 2 * layer,
            "holds": "one layer"}


def _whole_model_memory(shape: ModelShape, method: str, device: str, bf16: int, runtime: int, samples: int,
                        seq_len: int) -> dict:
    """Methods that load the whole model (FP8, W8A8, GGUF's importance matrix): the model in its working
    dtype (FP32 on the CPU for a method that runs calibration passes, else BF16) + half its BF16 size in
    flight (checkpoint pages while loading, the 8-bit copy while compressing) + one calibration batch's
    activations (float32 on the CPU: a layer's inputs, q/k/v/o, the MLP's three intermediates, the
    attention scores). Measured on SmolLM2-135M, CPU, host peak: FP8 0.82-0.88 GB (this gives 0.90), W8A8
    smoothed over 64 x 256 tokens 1.32 GB in FP32, 1.08-1.18 GB in BF16 on an AMX CPU (1.47)."""
    from .methods import method_spec

    calibrates = "calibration" in method_spec(method).reads
    width = 4 if device == "cpu" else 2
    loaded = bf16 * width // 2 if calibrates else bf16
    tokens = min(samples * seq_len, _CALIBRATION_TOKENS_PER_FORWARD) if calibrates else 0
    acts = tokens * (4 * shape.hidden + 3 * shape.intermediate) * width + tokens * min(seq_len, tokens) * shape.heads * width
    if device == "cpu":
        host = runtime + loaded + bf16 // 2 + acts
        return {"device": "cpu", "device_bytes": host, "host_bytes": host, "holds": "whole model"}
    return {"device": device, "device_bytes": loaded + acts, "host_bytes": runtime + bf16 // 2, "holds": "whole model"}


def inference_memory(shape: ModelShape, fmt: Format, *, device: str, ctx: int = 512) -> int:
    """Bytes to hold a model for ``qtk verify``: the weights (upcast to FP32 on the CPU, where verify
    computes in FP32) plus a few windows of whole-vocabulary FP32 logits."""
    w = weight_bytes(shape, fmt)
    if device == "cpu":
        w = weight_bytes(shape, Format("fp32", "", 32, 32)) if fmt.linear_bits >= 16 else w + shape.params["embeddings"] * 2
    return w + 3 * ctx * shape.vocab * 4


def device_capacity(device: str) -> tuple[str, int | None]:
    """(label, bytes free now) of ``cuda`` (GPU 0) or ``cpu`` (MemAvailable); None when unknown."""
    if device == "cuda":
        try:
            import torch

            free, _total = torch.cuda.mem_get_info()
            return f"cuda:{torch.cuda.get_device_name(0)}", int(free)
        except Exception:  # noqa: BLE001 - no torch, no driver: unknown, not an error here
            return "cuda", None
    try:
        with open("/proc/meminfo") as fh:
            avail = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable"))
        return "cpu", avail
    except (OSError, StopIteration, ValueError):
        return "cpu", None


def check_fits(need: int, device: str, what: str, *, hint: str) -> None:
    """Raise :class:`~qtk.errors.ResourceError` before any loading when ``need`` bytes cannot fit."""
    label, free = device_capacity(device)
    if free is not None and need > free:
        raise errors.ResourceError(f"{what} needs about {need / GB:.2f} GB on {label}; {free / GB:.2f} GB are free.",
                                   hint=hint)
