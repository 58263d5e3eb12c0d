"""Smoke generation: a small shipped prompt set through each model's chat template, greedy by
default, stopping on every terminator the model declares; simple checks per answer."""

from __future__ import annotations

from dataclasses import dataclass

from .models import Generation, Model

__all__ = ["PROMPTS", "SmokeResult", "run_smoke", "repetition_ratio"]

_FACT = "The access code for the blue door is 4817."


def _long_context() -> list[dict]:
    from ..texts import load_texts

    docs = load_texts("prose-heldout").documents
    filler = "\n\n".join(docs)[:6000]
    half = len(filler) // 2
    passage = filler[:half] + "\n\n" + _FACT + "\n\n" + filler[half:]
    return [{"role": "user", "content": f"Read this text.\n\n{passage}\n\nQuestion: what is the access code for the "
             "blue door? Answer with the code only."}]


PROMPTS: list[tuple[str, object, str | None]] = [  # (name, messages or factory, expected substring)
    ("factual", [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}], "Paris"),
    ("arithmetic", [{"role": "user", "content": "What is 12 + 30? Answer with the number only."}], "42"),
    ("instruction", [{"role": "user", "content": "Name three colors, separated by commas, and nothing else."}], ","),
    ("two-turn", [{"role": "user", "content": "Hi! My name is Ada and I like sailing."},
                  {"role": "assistant", "content": "Nice to meet you, Ada! Sailing sounds wonderful."},
                  {"role": "user", "content": "What is my name?"}], "Ada"),
    ("long-context", _long_context, "4817"),
]


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0: none; near 1: a loop)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


@dataclass(frozen=True)
class SmokeResult:
    name: str
    answer: str
    tokens: int
    stopped: bool
    repetition: float
    expected: str | None
    correct: bool | None
    ttft_s: float
    decode_tps: float
    prompt_tokens: int

    @property
    def ok(self) -> bool:
        """Non-empty, ended on a terminator before the limit, not a repetition loop."""
        return bool(self.answer) and self.stopped and self.repetition < 0.5

    def to_dict(self) -> dict:
        return {**self.__dict__, "ok": self.ok}


def run_smoke(model: Model, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
              seed: int = 0) -> list[SmokeResult]:
    out = []
    for name, messages, expected in PROMPTS:
        msgs = messages() if callable(messages) else messages
        g: Generation = model.chat(msgs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        correct = None if expected is None else expected.lower() in g.text.lower()
        out.append(SmokeResult(name, g.text, g.tokens, g.stopped, repetition_ratio(g.text), expected, correct,
                               g.ttft_s, g.decode_tps, g.prompt_tokens))
    return out
