"""Calibration samples: a text set (:mod:`qtk.texts`, the one owner of named texts, files and Hub
datasets) -> seeded token windows for a calibrated method.

Sampling is seeded: the documents are shuffled, rendered (chats through the model's chat template),
tokenized into one stream with EOS between documents, and cut into ``samples`` windows of
``seq_len`` tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .. import errors
from ..texts import TextSet, list_sets, load_texts

__all__ = ["CalibrationSet", "Samples", "list_sets", "load_calibration", "build_samples", "MIN_SEQ_LEN"]

MIN_SEQ_LEN = 8  # tokens per calibration sample, at least

# the calibration-side names of the shared text loader (qtk.texts)
CalibrationSet = TextSet
load_calibration = load_texts


@dataclass(frozen=True)
class Samples:
    input_ids: list[list[int]]
    seq_len: int
    seed: int
    tokens_available: int
    chat_template: bool
    calibration: TextSet = field(repr=False)

    def to_dict(self) -> dict:
        return {**self.calibration.to_dict(), "samples": len(self.input_ids), "seq_len": self.seq_len,
                "seed": self.seed, "tokens_available": self.tokens_available,
                "chat_template": self.chat_template}


def build_samples(
    cal: TextSet,
    tokenizer,
    *,
    samples: int,
    seq_len: int,
    seed: int,
    chat_template: bool | None = None,
    allow_fewer: bool = False,
) -> Samples:
    """Shuffle the documents with ``seed``, render chats (through the model's chat template when
    ``chat_template``), tokenize into one stream with EOS between documents, and cut ``samples``
    windows of ``seq_len`` tokens."""
    if samples < 1 or seq_len < MIN_SEQ_LEN:
        raise errors.UsageError(f"Need --samples >= 1 and --seq-len >= {MIN_SEQ_LEN} (got {samples}, {seq_len}).")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    use_template = has_template if chat_template is None else chat_template
    if use_template and not has_template:
        raise errors.CalibrationError("--chat-template was asked for, but the tokenizer has no chat template.",
                                      hint="Use --no-chat-template.")
    docs = list(cal.documents)
    random.Random(seed).shuffle(docs)
    texts = []
    for d in docs:
        if isinstance(d, list):  # chat
            if use_template:
                texts.append(tokenizer.apply_chat_template(d, tokenize=False))
            else:
                texts.append("\n\n".join(f"{m['role']}: {m['content']}" for m in d))
        else:
            texts.append(d)
    need = samples * seq_len
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    available = len(stream)
    if available < need:
        if not allow_fewer or available < seq_len:
            raise errors.CalibrationError(
                f"Calibration set {cal.name!r} has {available} tokens; {samples} samples x {seq_len} tokens need {need}.",
                hint="Lower --samples or --seq-len, use a larger set, or pass --allow-fewer.",
            )
        samples = available // seq_len
    ids = [stream[i * seq_len : (i + 1) * seq_len] for i in range(samples)]
    return Samples(ids, seq_len, seed, available, use_template, cal)
