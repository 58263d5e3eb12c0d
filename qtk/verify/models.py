"""Open any model qtk verifies behind one small interface: HF checkpoints (BF16/FP16, GPTQ, AWQ, NF4,
compressed-tensors FP8/W8A8, decompressed on the CPU) through transformers, GGUF files through llama-cpp-python on the CPU.

    model = open_model("./llama-awq")            # or "org/repo", "model.gguf", ("org/repo", gguf_file=...)
    ids = model.tokenize(text)                   # the model's own tokenizer, no special tokens
    logits = model.logits(window_ids)            # float32 [len(window), vocab]
    gen = model.chat(messages, max_new_tokens=64)
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import errors
from ..hfload import load_causal_lm, read_config

__all__ = ["Model", "Generation", "open_model", "detect_format", "GGUF_MAGIC"]

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int
    stopped: bool  # ended on a terminator before the token limit
    ttft_s: float  # time to first token (prefill)
    decode_tps: float  # tokens/s after the first
    prompt_tokens: int


def rss_bytes() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def detect_format(path: Path) -> str:
    """'gguf', 'gptq', 'awq', 'nf4', 'fp8', 'w8a8', 'bf16', 'fp16', 'fp32' (from magic bytes or config.json)."""
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(4) == GGUF_MAGIC:
                return "gguf"
        raise errors.ModelFormatError(f"{path} is a file but not a GGUF (no 'GGUF' magic).",
                                      hint="Pass a GGUF file or a Hugging Face checkpoint directory.")
    cfg = read_config(path, missing=f"{path} has no config.json and is not a GGUF file.")
    qc = cfg.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method == "bitsandbytes":
        return "nf4" if qc.get("bnb_4bit_quant_type") == "nf4" else "bnb"
    if method in ("gptq", "awq"):
        return method
    if method == "compressed-tensors":
        return _compressed_format(qc)
    if method:
        return method
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def _compressed_format(qc: dict) -> str:
    """'fp8' or 'w8a8' (the qtk methods that write them) for a compressed-tensors checkpoint whose one
    config group holds 8-bit float / int weights with 8-bit input activations; else 'compressed-tensors'
    (transformers still loads it)."""
    groups = qc.get("config_groups")
    group = next(iter(groups.values())) if isinstance(groups, dict) and len(groups) == 1 else None
    w = group.get("weights") if isinstance(group, dict) else None
    a = group.get("input_activations") if isinstance(group, dict) else None
    if isinstance(w, dict) and isinstance(a, dict) and w.get("num_bits") == 8 == a.get("num_bits") \
            and w.get("type") == a.get("type") and w.get("type") in ("float", "int"):
        return "fp8" if w["type"] == "float" else "w8a8"
    return "compressed-tensors"


class Model(ABC):
    name: str
    format: str
    path: Path
    load_s: float
    add_bos: bool
    bos_id: int | None
    vocab_size: int

    @abstractmethod
    def tokenize(self, text: str) -> list[int]: ...

    @abstractmethod
    def logits(self, ids: list[int], start: int = 0) -> np.ndarray:
        """float32 logits for positions ``start..len(ids)-1`` (only what will be scored is copied out)."""

    @abstractmethod
    def chat(self, messages: list[dict], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0) -> Generation: ...

    @abstractmethod
    def stream(self, messages: list[dict], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0) -> Iterator[str]:
        """Yield the answer's text as it is generated (qtk chat)."""

    @property
    def size_bytes(self) -> int:
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(p.stat().st_size for p in self.path.glob("*.safetensors"))

    def memory(self) -> dict:
        return {"rss_bytes": rss_bytes()}


class HFModel(Model):
    def __init__(self, path: Path, fmt: str, device: str, name: str) -> None:
        import torch
        from transformers import AutoTokenizer, GenerationConfig

        t0 = time.monotonic()
        self.path, self.format, self.name, self.device = path, fmt, name, device
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        # On the CPU float32 is the fast path (measured here: a 512-token forward of SmolLM2 takes 1.1 s
        # in fp32 against 7.3 s in bf16 without AVX512-BF16); on CUDA, the checkpoint's half type.
        if device == "cpu" or fmt == "fp32":
            dtype = torch.float32
        else:
            dtype = torch.float16 if fmt == "fp16" else torch.bfloat16
        self.compute_dtype = str(dtype).replace("torch.", "")
        try:
            self.model, _ = load_causal_lm(path, dtype=dtype, device=device)
        except torch.cuda.OutOfMemoryError as exc:
            raise errors.ResourceError(f"{name} does not fit in GPU memory.", hint="Use --device cpu or a bigger GPU.") from exc
        except MemoryError as exc:
            raise errors.ResourceError(
                f"{name} does not fit in CPU memory ({self.size_bytes / 1e9:.1f} GB of weights on disk).",
                hint="Compare fewer models at once, or use a machine with more memory.") from exc
        except ImportError as exc:
            raise errors.BackendUnavailableError(f"Loading {name} ({fmt}) needs a backend: {exc}",
                                                 hint="pip install 'qtk[quantize]' (after torch).") from exc
        try:
            gen = GenerationConfig.from_pretrained(path)
            eos = gen.eos_token_id
        except OSError:
            eos = None
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tok.eos_token_id is not None:
            eos_ids.append(self.tok.eos_token_id)
        self.terminators = sorted(set(eos_ids))
        probe = self.tok("a")["input_ids"]
        self.bos_id = self.tok.bos_token_id
        self.add_bos = bool(self.bos_id is not None and probe and probe[0] == self.bos_id)
        self.vocab_size = self.model.config.vocab_size
        self._warm = False
        self.load_s = time.monotonic() - t0

    def tokenize(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def logits(self, ids: list[int], start: int = 0) -> np.ndarray:
        torch = self.torch
        x = torch.tensor([ids], device=self.model.device)
        with torch.no_grad():
            return self.model(x).logits[0, start:].float().cpu().numpy()

    def _gen_kwargs(self, max_new_tokens, temperature, top_p) -> dict:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.terminators or [0])[0]
        kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=self.terminators or None,
                  pad_token_id=pad)
        if temperature > 0:
            kw.update(temperature=temperature, top_p=top_p)
        return kw

    def chat(self, messages, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0) -> Generation:
        from transformers.generation.streamers import BaseStreamer

        torch = self.torch
        enc = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        n_prompt = enc["input_ids"].shape[1]
        if not self._warm:  # the first generate() on a CPU pays one-off costs: keep them out of the timings
            with torch.no_grad():
                self.model.generate(**enc, **self._gen_kwargs(1, 0.0, 1.0))
            self._warm = True

        class Clock(BaseStreamer):  # time of every generated token, from inside the one generate() call
            def __init__(self):
                self.times: list[float] = []
                self.prompt_seen = False

            def put(self, value):
                if self.prompt_seen:
                    self.times.append(time.monotonic())
                self.prompt_seen = True

            def end(self):
                pass

        clock = Clock()
        torch.manual_seed(seed)
        with torch.no_grad():
            t0 = time.monotonic()
            out = self.model.generate(**enc, **self._gen_kwargs(max_new_tokens, temperature, top_p), streamer=clock)
        new = out[0, n_prompt:].tolist()
        stopped = bool(new) and new[-1] in self.terminators
        n = len(new)
        if stopped:
            new = new[:-1]
        ttft = clock.times[0] - t0 if clock.times else 0.0
        span = clock.times[-1] - clock.times[0] if len(clock.times) > 1 else 0.0
        decode_tps = (len(clock.times) - 1) / span if span > 0 else 0.0
        return Generation(self.tok.decode(new, skip_special_tokens=True).strip(), n, stopped, ttft, decode_tps, n_prompt)

    def stream(self, messages, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0) -> Iterator[str]:
        import threading

        from transformers import TextIteratorStreamer

        torch = self.torch
        enc = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        torch.manual_seed(seed)
        kw = {**self._gen_kwargs(max_new_tokens, temperature, top_p), "streamer": streamer}

        def run() -> None:
            with torch.no_grad():
                self.model.generate(**enc, **kw)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()


class GGUFModel(Model):
    compute_dtype = "llama.cpp"

    def __init__(self, path: Path, name: str, threads: int | None, n_ctx: int) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise errors.BackendUnavailableError(
                f"Reading {path.name} needs llama-cpp-python.", hint="pip install 'qtk[gguf]' (builds llama.cpp, ~9 min)."
            ) from exc
        t0 = time.monotonic()
        self.path, self.format, self.name = path, "gguf", name
        try:
            # --threads sets both: prompt/batch evaluation (llama.cpp's n_threads_batch, default every core) and
            # decoding. On a busy 2-core machine a 15-token batch took 3.7 s with 2 batch threads, 0.37 s with 1
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads,
                             n_threads_batch=threads)
        except (ValueError, RuntimeError) as exc:
            raise errors.ModelFormatError(f"llama.cpp could not load {path}: {exc}",
                                          hint="The file may be truncated or of an unsupported architecture.") from exc
        meta = self.llm.metadata
        self.bos_id = self.llm.token_bos()
        self.add_bos = str(meta.get("tokenizer.ggml.add_bos_token", "true")).lower() == "true"
        self.terminators = sorted({self.llm.token_eos(), *(int(v) for k, v in meta.items() if k.endswith("eot_token_id"))})
        self.vocab_size = self.llm.n_vocab()
        self._formatter = None
        self.load_s = time.monotonic() - t0

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def logits(self, ids: list[int], start: int = 0) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[start : len(ids)], dtype=np.float32)

    def _prompt(self, messages: list[dict]) -> list[int]:
        """The chat prompt through the GGUF's own template, with BOS only if the model adds one.
        (llama-cpp-python's chat handler prepends BOS regardless of ``add_bos_token``; for SmolLM2
        that doubles ``<|im_start|>`` and derails the answers.)"""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if self._formatter is None:
            template = self.llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise errors.ModelFormatError(f"{self.path.name} has no chat template in its metadata.")
            piece = lambda i: self.llm.detokenize([i]).decode("utf-8", "replace")  # noqa: E731
            self._formatter = Jinja2ChatFormatter(template, eos_token=piece(self.llm.token_eos()),
                                                  bos_token=piece(self.bos_id), add_generation_prompt=True)
        text = self._formatter(messages=messages).prompt
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)

    def _completion(self, messages, max_new_tokens, temperature, top_p, seed):
        self.llm.reset()
        prompt = self._prompt(messages)
        chunks = self.llm.create_completion(prompt, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            seed=seed, stream=True)
        return prompt, chunks

    def chat(self, messages, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0) -> Generation:
        t0 = time.monotonic()
        prompt, chunks = self._completion(messages, max_new_tokens, temperature, top_p, seed)
        ttft, pieces, finish = None, [], None
        for chunk in chunks:
            choice = chunk["choices"][0]
            if choice.get("text"):
                if ttft is None:
                    ttft = time.monotonic() - t0
                pieces.append(choice["text"])
            finish = choice.get("finish_reason") or finish
        total = time.monotonic() - t0
        text = "".join(pieces).strip()
        n = len(self.tokenize(text)) + int(finish == "stop")
        ttft = ttft if ttft is not None else total
        decode_tps = (n - 1) / max(total - ttft, 1e-9) if n > 1 else 0.0
        return Generation(text, n, finish == "stop", ttft, decode_tps, len(prompt))

    def stream(self, messages, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0) -> Iterator[str]:
        _, chunks = self._completion(messages, max_new_tokens, temperature, top_p, seed)
        for chunk in chunks:
            if chunk["choices"][0].get("text"):
                yield chunk["choices"][0]["text"]


def open_model(spec: str, *, gguf_file: str | None = None, device: str = "cpu", threads: int | None = None,
               n_ctx: int = 4096, settings=None) -> Model:
    """Resolve ``spec`` (:mod:`qtk.modelspec`: a directory, a .gguf file, a repo id in the cache or pulled,
    ``org/repo:FILE.gguf``) and load it."""
    from ..modelspec import resolve_spec

    path, _, _ = resolve_spec(spec, gguf_file=gguf_file, settings=settings)
    fmt = detect_format(path)
    if fmt == "gguf":
        return GGUFModel(path, spec, threads, n_ctx)
    return HFModel(path, fmt, device, spec)
