"""The one model-spec resolver: what MODEL means for quantize, verify, plan and provision.

    ./dir, /abs/dir, ~/dir, a/b/c      a local path (a checkpoint dir, a .gguf or config.json file)
    org/name                           a repo id: the HF cache, pulled with qtk's verified downloader when missing
    org/name:FILE.gguf                 one GGUF file of a repo

A spec that looks like a path (starts with ``/ . ~``, has more than one ``/``, or ends in a file
suffix qtk reads) and does not exist is refused at once ("no such directory"), before any download
or load; the files a checkpoint needs are one include list, :data:`CHECKPOINT_FILES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import errors

__all__ = ["CHECKPOINT_FILES", "ModelRef", "parse_spec", "check_spec", "resolve_spec"]

# what a Hugging Face checkpoint needs to load, tokenize and chat (weights, configs, tokenizer, template)
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt")
_FILE_SUFFIXES = (".gguf", ".json", ".safetensors")


@dataclass(frozen=True)
class ModelRef:
    spec: str  # as the user wrote it
    path: Path | None  # local path (None: a repo id)
    repo_id: str | None
    repo_file: str | None  # a file inside the repo (GGUF)

    @property
    def label(self) -> str:
        return self.spec


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.lower().endswith(_FILE_SUFFIXES)


def _lone_gguf(path: Path) -> Path | None:
    """A directory without config.json holding exactly one .gguf file (what ``qtk quantize --method gguf``
    makes for one type) stands for that file."""
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = list(path.glob("*.gguf"))
    return found[0] if len(found) == 1 else None


def parse_spec(spec: str, *, gguf_file: str | None = None) -> ModelRef:
    """Classify ``spec`` without touching the network; a path-like spec that does not exist is an error."""
    if not spec or not spec.strip():
        raise errors.UsageError("Empty model spec.", hint="Give a checkpoint directory, a .gguf file or a repo id.")
    path = Path(spec).expanduser()
    if path.exists():
        return ModelRef(spec, _lone_gguf(path) or path, None, None)
    repo, sep, file = spec.partition(":")
    if sep and not _looks_like_path(repo) and repo.count("/") == 1:
        return ModelRef(spec, None, repo, file or None)
    if _looks_like_path(spec):
        kind = "file" if spec.lower().endswith(_FILE_SUFFIXES) else "directory"
        raise errors.ModelFormatError(f"{spec}: no such {kind}.",
                                      hint="Check the path (it is resolved from the current directory).")
    from .hub.names import is_repo_id

    if not is_repo_id(spec):
        raise errors.ModelFormatError(f"{spec} is neither a local path nor a repo id (namespace/name).",
                                      hint="Give a checkpoint directory, a .gguf file or a repo id.")
    return ModelRef(spec, None, spec, gguf_file)


def check_spec(spec: str, *, gguf_file: str | None = None, must_be_model: bool = True) -> ModelRef:
    """:func:`parse_spec`, and for a local path: readable, and (``must_be_model``) a GGUF file or a
    directory with a config.json — all before anything is loaded."""
    ref = parse_spec(spec, gguf_file=gguf_file)
    if ref.path is None or not must_be_model:
        return ref
    p = ref.path
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(f.name for f in p.glob("*.gguf"))
            raise errors.ModelFormatError(
                f"{p} has no config.json: not a Hugging Face checkpoint"
                + (f"; it holds {len(ggufs)} GGUF files ({', '.join(ggufs[:4])}{'...' if len(ggufs) > 4 else ''})."
                   if ggufs else "."),
                hint="Pass one of the .gguf files (e.g. out/*.gguf)." if ggufs else
                "Give the checkpoint directory (the one with config.json), or a .gguf file.")
        try:
            with open(p / "config.json", "rb"):
                pass
        except OSError as exc:
            raise errors.ModelFormatError(f"{p / 'config.json'} is not readable: {exc.strerror}.") from None
    else:
        try:
            with open(p, "rb") as fh:
                head = fh.read(4)
        except OSError as exc:
            raise errors.ModelFormatError(f"{p} is not readable: {exc.strerror}.") from None
        if head != b"GGUF" and p.name != "config.json":
            raise errors.ModelFormatError(f"{p} is a file but not a GGUF (no 'GGUF' magic).",
                                          hint="Pass a GGUF file or a Hugging Face checkpoint directory.")
    return ref


def resolve_spec(spec: str | ModelRef, *, revision: str | None = None, settings=None,
                 include: tuple[str, ...] | list[str] = CHECKPOINT_FILES, gguf_file: str | None = None
                 ) -> tuple[Path, str | None, str | None]:
    """(local path, repo id or None, commit or None): a local path as it is; a repo id from the cache,
    pulled with qtk's downloader when missing (only ``include``, or the one GGUF file)."""
    ref = spec if isinstance(spec, ModelRef) else parse_spec(spec, gguf_file=gguf_file)
    if ref.path is not None:
        return ref.path.resolve(), None, None
    from .hub.download import plan_pull, pull
    from .settings import Settings

    files = [ref.repo_file] if ref.repo_file else list(include)
    plan = pull(plan_pull(ref.repo_id, revision=revision, include=files, settings=settings or Settings.from_env())).plan
    root = plan.root / ref.repo_file if ref.repo_file else plan.root
    if ref.repo_file and not root.is_file():
        raise errors.ModelFormatError(f"{ref.repo_id} has no file {ref.repo_file}.")
    return root, ref.repo_id, plan.commit
