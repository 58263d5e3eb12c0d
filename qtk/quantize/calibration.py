"""Calibration data: named sets, custom files, Hub datasets -> seeded token samples.

Named sets (see ``calibration/manifest.json``) are either text the project wrote itself or a recipe
that assembles the set at first use from sources already installed with Python (its reference
documentation, ``pydoc_data.topics``, and its standard library source), so no third-party text is
copied into the repo. The assembled text is hashed; the manifest pins the sha256 for the Python
versions it was built on, and provenance records the digest actually used.

    spec                           what it is
    prose / chat / code / ...      a named set (``qtk calibration list``)
    path/to/file.txt               paragraphs (blank-line separated)
    path/to/file.jsonl             --text-field (default "text"), or "messages" chats
    path/to/file.parquet           --text-field column
    hf://datasets/ns/name[@rev][/path/in/repo]   fetched with qtk's downloader, then as above
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .. import errors
from ..settings import Settings

__all__ = ["CalibrationSet", "Samples", "list_sets", "load_calibration", "build_samples", "calibration_dir"]

_HELD_OUT_FRACTION = 0.2
_CODE_MODULES = (
    "argparse", "dataclasses", "functools", "json.decoder", "json.encoder", "textwrap", "shutil", "tempfile",
    "heapq", "bisect", "csv", "contextlib", "enum", "fractions", "statistics", "string", "difflib", "ipaddress",
    "calendar", "configparser", "fnmatch", "glob", "gzip", "queue", "sched", "selectors", "shlex", "zipfile",
)


def calibration_dir() -> Path:
    """The shipped ``calibration/`` folder (repo checkout or installed package data)."""
    for cand in (Path(__file__).resolve().parents[2] / "calibration", Path(__file__).resolve().parents[1] / "_calibration"):
        if (cand / "manifest.json").is_file():
            return cand
    raise errors.CalibrationError("The shipped calibration/ folder is missing.", hint="Reinstall qtk.")


@dataclass(frozen=True)
class CalibrationSet:
    name: str
    source: str
    kind: str  # "text" or "chat"
    documents: tuple[Any, ...]  # str for text, list of {role, content} for chat
    sha256: str  # of the canonical JSON of the documents
    license: str | None = None
    pinned: bool | None = None  # digest matched the manifest pin (None: no pin for this Python)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "kind": self.kind, "documents": len(self.documents),
                "sha256": self.sha256, "license": self.license, "pinned": self.pinned}


@dataclass(frozen=True)
class Samples:
    input_ids: list[list[int]]
    seq_len: int
    seed: int
    tokens_available: int
    chat_template: bool
    calibration: CalibrationSet = field(repr=False)

    def to_dict(self) -> dict:
        return {**self.calibration.to_dict(), "samples": len(self.input_ids), "seq_len": self.seq_len,
                "seed": self.seed, "tokens_available": self.tokens_available,
                "chat_template": self.chat_template}


def _digest(documents: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(documents), ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _manifest() -> dict:
    return json.loads((calibration_dir() / "manifest.json").read_text())


def list_sets() -> list[dict]:
    return [dict(s) for s in _manifest()["sets"]]


# --------------------------------------------------------------------------- recipes


def _pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(k, re.sub(r"\n{3,}", "\n\n", topics[k].strip())) for k in sorted(topics) if len(topics[k].strip()) > 200]


def _split_held_out(items: list) -> tuple[list, list]:
    cut = int(len(items) * (1 - _HELD_OUT_FRACTION))
    return items[:cut], items[cut:]


def _recipe_prose(held_out: bool = False) -> list[str]:
    train, test = _split_held_out(_pydoc_topics())
    return [text for _, text in (test if held_out else train)]


def _recipe_chat() -> list[list[dict]]:
    chats = [json.loads(line)["messages"] for line in (calibration_dir() / "chat-seed.jsonl").read_text().splitlines() if line.strip()]
    train, _ = _split_held_out(_pydoc_topics())
    for key, text in train:
        chats.append([{"role": "user", "content": f"Explain '{key}' in Python, with the details that matter."},
                      {"role": "assistant", "content": text}])
    return chats


def _recipe_code() -> list[str]:
    docs = []
    for mod in _CODE_MODULES:
        spec = importlib.util.find_spec(mod)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        lines = Path(spec.origin).read_text(encoding="utf-8").splitlines()
        for i in range(0, len(lines), 80):  # ~80-line pieces keep samples diverse after shuffling
            piece = "\n".join(lines[i : i + 80]).strip()
            if piece:
                docs.append(f"# {mod}\n{piece}")
    return docs


_RECIPES = {
    "pydoc_topics": lambda: _recipe_prose(False),
    "pydoc_topics_held_out": lambda: _recipe_prose(True),
    "chat": _recipe_chat,
    "stdlib_source": _recipe_code,
}


def _named(name: str) -> CalibrationSet:
    sets = {s["name"]: s for s in _manifest()["sets"]}
    if name not in sets:
        raise errors.CalibrationError(
            f"Unknown calibration set {name!r}.",
            hint=f"Named sets: {', '.join(sorted(sets))}; or give a .txt/.jsonl/.parquet file or hf://datasets/...",
        )
    meta = sets[name]
    docs = _RECIPES[meta["recipe"]]()
    digest = _digest(docs)
    pin = (meta.get("sha256") or {}).get(platform.python_version())
    if pin is not None and pin != digest:
        raise errors.CalibrationError(
            f"Calibration set {name!r} assembled to sha256 {digest}, the manifest pins {pin} for Python "
            f"{platform.python_version()}: the installed sources differ from the ones it was built from.",
            hint="Check your Python installation, or pass a calibration file explicitly.",
        )
    return CalibrationSet(name, meta["source"], meta["kind"], tuple(docs), digest, meta.get("license"),
                          pinned=None if pin is None else True)


def _from_file(path: Path, text_field: str | None, source: str) -> CalibrationSet:
    suffix = path.suffix.lower()
    docs: list[Any]
    kind = "text"
    if suffix in (".txt", ".md", ".text"):
        docs = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]
    elif suffix in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise errors.CalibrationError(f"{path}:{n}: not valid JSON ({exc}).") from exc
            if text_field is None and isinstance(row, dict) and "messages" in row:
                kind = "chat"
                docs.append(row["messages"])
            else:
                key = text_field or "text"
                if not isinstance(row, dict) or not isinstance(row.get(key), str):
                    raise errors.CalibrationError(
                        f"{path}:{n}: no string field {key!r}.", hint="Pass --text-field NAME, or use 'messages' rows."
                    )
                docs.append(row[key])
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise errors.BackendUnavailableError("Reading .parquet needs pyarrow.", hint="pip install pyarrow") from exc
        table = pq.read_table(path)
        key = text_field or "text"
        if key not in table.column_names:
            raise errors.CalibrationError(f"{path} has no column {key!r} (columns: {', '.join(table.column_names)}).",
                                          hint="Pass --text-field NAME.")
        docs = [t for t in table.column(key).to_pylist() if isinstance(t, str) and t.strip()]
    else:
        raise errors.CalibrationError(f"Unsupported calibration file type {suffix!r}: {path}.",
                                      hint="Use .txt, .jsonl or .parquet.")
    if not docs:
        raise errors.CalibrationError(f"{path} holds no calibration text.")
    return CalibrationSet(source, source, kind, tuple(docs), _digest(docs))


def _from_hub(spec: str, text_field: str | None, settings: Settings | None) -> CalibrationSet:
    from ..hub.download import plan_pull, pull

    rest = spec[len("hf://datasets/"):]
    parts = rest.split("/")
    if len(parts) < 2:
        raise errors.UsageError(f"Bad dataset spec {spec!r}.", hint="Use hf://datasets/ns/name[@rev][/path/in/repo].")
    name, _, rev = parts[1].partition("@")
    repo_id, path_in_repo = f"{parts[0]}/{name}", "/".join(parts[2:])
    include = [path_in_repo] if path_in_repo else ["*.txt", "*.jsonl", "*.parquet"]
    plan = plan_pull(repo_id, revision=rev or None, include=include, repo_type="dataset", settings=settings)
    result = pull(plan)
    files = sorted(p.dest for p in plan.files)
    sets = [_from_file(Path(f), text_field, spec) for f in files]
    docs = tuple(d for s in sets for d in s.documents)
    kind = "chat" if all(s.kind == "chat" for s in sets) else "text"
    return CalibrationSet(spec, f"{spec} @ {result.plan.commit}", kind, docs, _digest(docs))


def load_calibration(spec: str, *, text_field: str | None = None, settings: Settings | None = None) -> CalibrationSet:
    if spec.startswith("hf://"):
        if not spec.startswith("hf://datasets/"):
            raise errors.UsageError(f"Only hf://datasets/... is supported, got {spec!r}.")
        return _from_hub(spec, text_field, settings)
    path = Path(spec).expanduser()
    if path.suffix and (path.exists() or "/" in spec or path.suffix.lower() in (".txt", ".jsonl", ".parquet")):
        if not path.is_file():
            raise errors.CalibrationError(f"Calibration file {path} not found.")
        return _from_file(path, text_field, str(path))
    return _named(spec)


def build_samples(
    cal: CalibrationSet,
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
    if samples < 1 or seq_len < 8:
        raise errors.UsageError(f"Need --samples >= 1 and --seq-len >= 8 (got {samples}, {seq_len}).")
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
