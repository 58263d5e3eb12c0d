"""An lm-eval model over a GGUF file, through llama-cpp-python (registered with lm-eval as ``qtk-gguf``).

It answers lm-eval's three request kinds the way lm-eval's HFLM does for a Hugging Face model, so that
the two runtimes score the same token ids:

- ``loglikelihood(context, continuation)``: tokens are split the way HFLM splits them (lm-eval's
  ``TemplateLM``: trailing spaces of the context move into the continuation; context + continuation is
  tokenized whole and the continuation is what follows the context's own tokens, so a merge across the
  boundary lands in the continuation); an empty context is scored after BOS (EOS when the model has
  none). The log-probabilities of the continuation tokens are read from llama.cpp's logits (llama.cpp
  keeps logits for every position: ``logits_all``), and is_greedy says whether each continuation token
  is the argmax. A sequence longer than the context window (``n_ctx``) loses tokens on the left, as in
  HFLM. Consecutive requests sharing a prefix (the choices of one question) reuse its KV cache and the
  logits already computed: only new tokens are evaluated (none for a one-token choice); a one-time
  probe checks that this gives the same logits as a fresh evaluation (recurrent architectures cannot
  rewind), else every request starts from scratch.
- ``loglikelihood_rolling(text)``: lm-eval's own rolling windows of ``n_ctx`` tokens, BOS/EOS first.
- ``generate_until(context, {until, max_gen_toks, temperature})``: greedy unless a temperature is given,
  stopping at any ``until`` string or the end-of-generation token.

Tokenizer caveats: BOS is added exactly when the GGUF says so (``tokenizer.ggml.add_bos_token``), as HFLM
adds it when the HF tokenizer does; special-token text in a prompt is parsed as the special token, as HF
tokenizers do. llama.cpp tokenizes with the GGUF's own tokenizer, which can differ from a Hugging Face
tokenizer of the same model: transformers' GGUF conversion drops SmolLM2's digit-splitting rule (qtk's
BF16 conversion restores it; other converted tokenizers may differ on numbers), so accuracy on texts with
numbers can differ between the two runtimes for tokenization alone. SentencePiece GGUFs add a leading
space to the text (``add_space_prefix``) like the slow HF Llama tokenizer, not like every fast one.
"""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from .perplexity import log_softmax

__all__ = ["GGUFLM"]


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@register_model("qtk-gguf")
class GGUFLM(TemplateLM):
    """``GGUFLM(model)``: ``model`` is a :class:`qtk.verify.models.GGUFModel` (loaded once, shared with
    perplexity, KL and smoke), or ``GGUFLM.create_from_arg_string("path=model.gguf,n_ctx=2048")``."""

    backend = "causal"

    def __init__(self, model=None, *, path: str | None = None, n_ctx: int = 4096, threads: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0,
                 batch_size=None, max_batch_size=None, device=None) -> None:
        """``batch_size``/``max_batch_size``/``device``: what lm-eval passes every model it builds from an
        argument string; llama.cpp evaluates one sequence at a time, on the CPU."""
        super().__init__()
        if model is None:
            from pathlib import Path

            from .models import GGUFModel

            model = GGUFModel(Path(path), str(path), threads, int(n_ctx))
        self.model, self.llm = model, model.llm
        # llama.cpp may run a bigger context than asked (at least 256 tokens), but llama-cpp-python's token and
        # logits arrays hold what was asked: the smaller of the two is the window
        window = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self._max_length = min(int(max_length), window) if max_length else window
        self._max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self.add_bos = bool(model.add_bos)
        self._bos_text = self.llm.detokenize([model.bos_id], special=True).decode("utf-8", "replace") \
            if model.bos_id is not None and model.bos_id >= 0 else None
        self.prefix_reuse = self._prefix_reuse_works()

    # ------------------------------------------------------------------ what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        return self.llm.token_eos()

    @property
    def prefix_token_id(self) -> int:
        bos = self.model.bos_id
        return bos if bos is not None and bos >= 0 else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"gguf:{self.model.path.name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add_bos = self.add_bos if add_special_tokens is None else bool(add_special_tokens)
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            add_bos = False  # the text carries its BOS already (a chat-templated prompt)
        return self.llm.tokenize(string.encode("utf-8"), add_bos=add_bos, special=True)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", "replace")

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, tokens: list[int]) -> None:
        """Make llama.cpp's logits rows 0..len(tokens)-1 those of ``tokens``: evaluate what the KV cache
        does not already hold. Rows of positions already evaluated stay valid (``logits_all``), so the
        one-token answers of a question, which all read the row of its last context token, cost one
        evaluation of the context between them."""
        llm = self.llm
        keep = _common_prefix(llm.input_ids[: llm.n_tokens], tokens) if self.prefix_reuse and llm.n_tokens else 0
        if keep == len(tokens):
            return
        if keep == 0:
            llm.reset()
        else:
            llm.n_tokens = keep  # eval() drops the KV cache from here on before decoding the rest
        llm.eval(tokens[keep:])

    def _prefix_reuse_works(self) -> bool:
        """Prefix reuse must give the logits of a fresh evaluation (it cannot on recurrent models)."""
        probe = self.llm.tokenize(b"The quick brown fox jumps over the lazy dog", add_bos=False, special=False)
        if len(probe) < 4:
            return False
        self.llm.reset()
        self.llm.eval(probe)
        fresh = np.array(self.llm.scores[len(probe) - 1], dtype=np.float32)
        self.llm.reset()
        self.llm.eval(probe[:-2])
        self.llm.eval([probe[0]])  # a detour, then rewind to the shared prefix
        self.llm.n_tokens = len(probe) - 2
        self.llm.eval(probe[-2:])
        reused = np.array(self.llm.scores[len(probe) - 1], dtype=np.float32)
        self.llm.reset()
        return bool(np.allclose(fresh, reused, rtol=1e-3, atol=1e-3))

    def _score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
        whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
        inp = whole[:-1]
        n = len(continuation_enc)
        if n > len(inp):
            raise ValueError(f"continuation of {n} tokens does not fit the context window ({self.max_length})")
        self._evaluate(inp)
        rows = np.array(self.llm.scores[len(inp) - n: len(inp)], dtype=np.float32)
        lp = log_softmax(rows)
        cont = np.asarray(continuation_enc)
        return float(lp[np.arange(n), cont].sum()), bool((rows.argmax(axis=-1) == cont).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        # the requests of one question share its context: evaluated one after another, they reuse its cache
        order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
        out: list = [None] * len(requests)
        for i in order:
            key, ctx, cont = requests[i]
            out[i] = self._score(ctx, cont)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        out = []
        for (text,) in (r.args for r in requests):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            total = sum(self._score(ctx, cont)[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            eot = self.tok_decode([self.eot_token_id])
            if eot and eot not in until:
                until.append(eot)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature") or 0.0)
            if kw.get("do_sample") is False:
                temperature = 0.0  # lm-eval's greedy default
            prompt = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            res = self.llm.create_completion(prompt, max_tokens=max_new, temperature=temperature,
                                             top_p=float(kw.get("top_p", 1.0)), stop=until, seed=self.seed)
            text = res["choices"][0]["text"]
            for term in until:
                text = text.split(term)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
