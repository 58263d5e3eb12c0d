"""Named texts, the one module that owns them: calibration (``qtk quantize --calibration``) and
evaluation (``qtk verify --text``, the smoke test's long-context passage) both read text here.

Named sets (``calibration/texts.json`` at the top of the repository, shipped as the package data of
``qtk.calibration`` and read through :mod:`importlib.resources`, so an installed wheel has them) are either text the project wrote itself or a recipe that assembles the
set at first use from sources already installed with Python (its reference documentation,
``pydoc_data.topics``, and its standard library source), so no third-party text is copied into the
repo. The assembled text is hashed; the manifest pins the sha256 for the Python versions it was
built on, and provenance records the digest actually used.

    spec                           what it is
    prose / chat / code / ...      a named set (``qtk calibration list``)
    path/to/file.txt               paragraphs (blank-line separated)
    path/to/file.jsonl             --text-field (default "text"), or "messages" chats
    path/to/file.parquet           --text-field column
    hf://datasets/ns/name[@rev][/path/in/repo]   fetched with qtk's downloader, then as above
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import errors
from .settings import Settings

__all__ = ["TextSet", "list_sets", "load_texts", "joined_text", "data_file"]

_HELD_OUT_FRACTION = 0.2
_MANIFEST = "texts.json"
_CODE_MODULES = (
    "argparse", "dataclasses", "functools", "json.decoder", "json.encoder", "textwrap", "shutil", "tempfile",
    "heapq", "bisect", "csv", "contextlib", "enum", "fractions", "statistics", "string", "difflib", "ipaddress",
    "calendar", "configparser", "fnmatch", "glob", "gzip", "queue", "sched", "selectors", "shlex", "zipfile",
)


def data_file(name: str) -> str:
    """The text of a named-text file: the repository's ``calibration/`` folder, installed as the package
    ``qtk.calibration`` (wheel or editable install)."""
    try:
        return importlib.resources.files("qtk.calibration").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError) as exc:
        raise errors.CalibrationError(f"qtk's package data file calibration/{name} is missing from this "
                                      "installation.", hint="Reinstall qtk (pip install --force-reinstall qtk).") from exc


@dataclass(frozen=True)
class TextSet:
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

    def joined(self) -> str:
        """All documents as one text (chats: their turns' content), blank-line separated."""
        docs = [d if isinstance(d, str) else "\n".join(m["content"] for m in d) for d in self.documents]
        return "\n\n".join(docs)


def _digest(documents: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(list(documents), ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _manifest() -> dict:
    return json.loads(data_file(_MANIFEST))


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
    chats = [json.loads(line)["messages"] for line in data_file("chat-seed.jsonl").splitlines() if line.strip()]
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


def _named(name: str) -> TextSet:
    sets = {s["name"]: s for s in _manifest()["sets"]}
    if name not in sets:
        raise errors.CalibrationError(
            f"Unknown text set {name!r}.",
            hint=f"Named sets: {', '.join(sorted(sets))}; or give a .txt/.jsonl/.parquet file or hf://datasets/...",
        )
    meta = sets[name]
    docs = _RECIPES[meta["recipe"]]()
    digest = _digest(docs)
    pin = (meta.get("sha256") or {}).get(platform.python_version())
    if pin is not None and pin != digest:
        raise errors.CalibrationError(
            f"Text set {name!r} assembled to sha256 {digest}, the manifest pins {pin} for Python "
            f"{platform.python_version()}: the installed sources differ from the ones it was built from.",
            hint="Check your Python installation, or pass a text file explicitly.",
        )
    return TextSet(name, meta["source"], meta["kind"], tuple(docs), digest, meta.get("license"),
                   pinned=None if pin is None else True)


def _from_file(path: Path, text_field: str | None, source: str) -> TextSet:
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
        raise errors.CalibrationError(f"Unsupported text file type {suffix!r}: {path}.",
                                      hint="Use .txt, .jsonl or .parquet.")
    if not docs:
        raise errors.CalibrationError(f"{path} holds no text.")
    return TextSet(source, source, kind, tuple(docs), _digest(docs))


def _from_hub(spec: str, text_field: str | None, settings: Settings | None) -> TextSet:
    from .hub.download import plan_pull, pull

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
    return TextSet(spec, f"{spec} @ {result.plan.commit}", kind, docs, _digest(docs))


def load_texts(spec: str, *, text_field: str | None = None, settings: Settings | None = None) -> TextSet:
    """A named set, a .txt/.jsonl/.parquet file, or ``hf://datasets/...`` as documents."""
    if spec.startswith("hf://"):
        if not spec.startswith("hf://datasets/"):
            raise errors.UsageError(f"Only hf://datasets/... is supported, got {spec!r}.")
        return _from_hub(spec, text_field, settings)
    path = Path(spec).expanduser()
    if path.suffix and (path.exists() or "/" in spec or path.suffix.lower() in (".txt", ".jsonl", ".parquet")):
        if not path.is_file():
            raise errors.CalibrationError(f"Text file {path} not found.")
        return _from_file(path, text_field, str(path))
    return _named(spec)


def joined_text(spec: str, text_field: str | None = None, *, settings: Settings | None = None) -> tuple[str, str]:
    """(text, sha256 of it): an evaluation text as one string (``qtk verify --text``)."""
    text = load_texts(spec, text_field=text_field, settings=settings).joined()
    return text, hashlib.sha256(text.encode()).hexdigest()
