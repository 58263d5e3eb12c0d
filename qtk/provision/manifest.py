"""The provisioning manifest: a TOML file read into typed, validated, merged recipes.

    store = "store"                     # model store dir (relative to this file); --store / QTK_STORE win

    [defaults]                          # everything here applies to every model unless it says otherwise
    device = "auto"                     # auto | cuda | cpu (not part of any step's hash)
    include = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]
    [defaults.quantize]                 # recipe defaults: any `qtk quantize` option
    samples = 128
    [defaults.verify]                   # `qtk verify` options
    text = "prose-heldout"
    [defaults.gates]                    # a model failing one of these is never published
    max_ppl_increase_pct = 20
    [defaults.publish]
    org = "qtk"                         # published repos: <org>/<model name>-<recipe name>

    [[models]]
    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
    revision = "main"
    [[models.recipes]]
    method = "gptq"
    group_size = 64

Errors name the file, the line and the field (``models[0].recipes[1].group_size``).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .. import errors
from ..modelspec import CHECKPOINT_FILES

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a declared dependency there)
    import tomli as tomllib

__all__ = ["Manifest", "ModelSpec", "Recipe", "load_manifest", "ManifestError"]

DEFAULT_INCLUDE = CHECKPOINT_FILES  # the one include list (qtk.modelspec)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ManifestError(errors.UsageError):
    """The manifest file is not valid TOML, or a field is missing, unknown or of the wrong type."""

    exit_code = 2


# field -> accepted python types (bool is not an int here)
_QUANTIZE = {"bits": int, "group_size": int, "sym": bool, "desc_act": bool, "calibration": str, "text_field": str,
             "samples": int, "seq_len": int, "seed": int, "chat_template": bool, "allow_fewer": bool}
_VERIFY = {"text": str, "text_field": str, "ctx": int, "max_tokens": int, "smoke": bool, "max_new_tokens": int,
           "seed": int}
_GATES = {"max_ppl_increase_pct": (int, float), "max_kld": (int, float), "min_top1_pct": (int, float),
          "require_smoke": bool}
_PUBLISH = {"org": str, "push_to_hub": bool, "hub_org": str, "hub_private": bool}
_DEFAULTS = {"device": str, "include": list, "exclude": list, "quantize": dict, "verify": dict, "gates": dict,
             "publish": dict}
_MODEL = {"repo": str, "name": str, "revision": str, "include": list, "exclude": list, "recipes": list,
          "verify": dict, "gates": dict, "publish": dict}
_RECIPE = {"method": str, "name": str, "gates": dict, **_QUANTIZE}
_TOP = {"store": str, "defaults": dict, "models": list}


@dataclass(frozen=True)
class Recipe:
    name: str  # the artifact suffix: <model>-<name>
    method: str
    params: dict  # QuantizeOptions fields (without device)
    gates: dict
    where: str  # "models[0].recipes[1]" for messages


@dataclass(frozen=True)
class ModelSpec:
    name: str
    repo: str
    revision: str | None
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    recipes: tuple[Recipe, ...]
    verify: dict
    publish: dict
    where: str

    def artifact_repo(self, recipe: Recipe) -> str:
        return f"{self.publish.get('org', 'qtk')}/{self.name}-{recipe.name}"


@dataclass(frozen=True)
class Manifest:
    path: Path
    store: Path
    device: str
    models: tuple[ModelSpec, ...]
    raw: dict = field(repr=False, default_factory=dict)


class _Locator:
    """Line numbers of tables and keys in a TOML text, addressed like the parsed data:
    ("models", 1, "recipes", 0, "group_size"). Covers [table], [[array]] and key = value lines."""

    _ARRAY = re.compile(r"^\[\[\s*([^\[\]]+?)\s*\]\]")
    _TABLE = re.compile(r"^\[\s*([^\[\]]+?)\s*\]")
    _KEY = re.compile(r"^([A-Za-z0-9_\-.\"' ]+?)\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple, int] = {}
        counters: dict[tuple, int] = {}
        current: tuple = ()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if m := self._ARRAY.match(line):
                names = self._names(m.group(1))
                key = self._resolve(names[:-1], counters) + (names[-1],)
                counters[key] = counters.get(key, -1) + 1
                current = key + (counters[key],)
                self.lines.setdefault(key, lineno)
                self.lines[current] = lineno
            elif m := self._TABLE.match(line):
                current = self._resolve(self._names(m.group(1)), counters)
                self.lines[current] = lineno
            elif m := self._KEY.match(line):
                self.lines[current + self._names(m.group(1))] = lineno

    @staticmethod
    def _names(dotted: str) -> tuple:
        return tuple(p.strip().strip("\"'") for p in dotted.split("."))

    @staticmethod
    def _resolve(names: tuple, counters: dict) -> tuple:
        path: tuple = ()
        for n in names:
            path += (n,)
            if path in counters:
                path += (counters[path],)
        return path

    def line(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


class _Checker:
    def __init__(self, file: Path, text: str) -> None:
        self.file, self.loc = file, _Locator(text)

    def fail(self, path: tuple, message: str, hint: str | None = None) -> ManifestError:
        line = self.loc.line(path)
        where = f"{self.file}:{line}" if line else str(self.file)
        field_ = f" {_dotted(path)}:" if path else ""
        return ManifestError(f"{where}:{field_} {message}", hint=hint or "See the manifest format in README.md "
                             "(section `qtk provision`) or scripts/provision-example.toml.")

    def table(self, value, schema: dict, path: tuple) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a table, got {type(value).__name__}.")
        for key, v in value.items():
            if key not in schema:
                close = difflib.get_close_matches(key, list(schema), n=1)
                raise self.fail(path + (key,), "unknown field" + (f"; did you mean {close[0]!r}?" if close else "."),
                                hint=f"Fields allowed here: {', '.join(sorted(schema))}.")
            want = schema[key]
            types = want if isinstance(want, tuple) else (want,)
            if isinstance(v, bool) and bool not in types or not isinstance(v, types):
                names = " or ".join({"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false",
                                     "list": "an array", "dict": "a table"}[t.__name__] for t in types)
                raise self.fail(path + (key,), f"expected {names}, got {type(v).__name__} {v!r}.")
            if key in ("include", "exclude") and not all(isinstance(x, str) for x in v):
                raise self.fail(path + (key,), "expected an array of strings.")
        return value

    def positive(self, d: dict, path: tuple, *keys: str) -> None:
        for k in keys:
            if k in d and d[k] <= 0 and not (k == "group_size" and d[k] == -1):
                raise self.fail(path + (k,), f"must be positive (got {d[k]}).")

    def name(self, value: str, path: tuple) -> str:
        if not _NAME_RE.match(value):
            raise self.fail(path, f"{value!r} is not a valid repo name part (letters, digits, '.', '_', '-').")
        return value


def load_manifest(path: str | Path, *, store: str | Path | None = None) -> Manifest:
    """Read and validate a manifest. ``store`` (or $QTK_STORE) overrides the manifest's store path."""
    from ..quantize.registry import method_names

    METHODS = method_names()  # noqa: N806 - read when called: methods registered later are known

    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ManifestError(f"Manifest {file} not found.", hint="Pass the path of a TOML manifest, e.g. "
                            "scripts/provision-example.toml.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"Cannot read manifest {file}: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # the message carries "(at line L, column C)"
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"{file}:{m.group(1)}:{m.group(2)}" if m else str(file)
        raise ManifestError(f"{where}: TOML syntax error: {str(exc).split(' (at line')[0]}.") from None
    c = _Checker(file, text)
    c.table(raw, _TOP, ())
    d = c.table(raw.get("defaults", {}), _DEFAULTS, ("defaults",))
    for sub, schema in (("quantize", _QUANTIZE), ("verify", _VERIFY), ("gates", _GATES), ("publish", _PUBLISH)):
        c.table(d.get(sub, {}), schema, ("defaults", sub))
    c.positive(d.get("quantize", {}), ("defaults", "quantize"), "bits", "group_size", "samples", "seq_len")
    c.positive(d.get("verify", {}), ("defaults", "verify"), "ctx", "max_tokens", "max_new_tokens")
    device = d.get("device", "auto")
    if device not in ("auto", "cuda", "cpu"):
        raise c.fail(("defaults", "device"), f"must be auto, cuda or cpu (got {device!r}).")
    org = d.get("publish", {}).get("org", "qtk")
    c.name(org, ("defaults", "publish", "org"))
    models_raw = raw.get("models")
    if not models_raw:
        raise c.fail(("models",), "no [[models]] entries: nothing to provision.")
    models: list[ModelSpec] = []
    artifacts: dict[str, str] = {}
    for i, m in enumerate(models_raw):
        mp = ("models", i)
        c.table(m, _MODEL, mp)
        if "repo" not in m:
            raise c.fail(mp, "missing required field 'repo' (namespace/name on the Hub).")
        if not _REPO_RE.match(m["repo"]):
            raise c.fail(mp + ("repo",), f"{m['repo']!r} is not a repo id (namespace/name).")
        for sub, schema in (("verify", _VERIFY), ("gates", _GATES), ("publish", _PUBLISH)):
            c.table(m.get(sub, {}), schema, mp + (sub,))
        c.positive(m.get("verify", {}), mp + ("verify",), "ctx", "max_tokens", "max_new_tokens")
        name = c.name(m.get("name") or m["repo"].split("/")[1].lower(), mp + ("name",))
        publish = {**d.get("publish", {}), **m.get("publish", {})}
        c.name(publish.get("org", "qtk"), mp + ("publish", "org"))
        if not m.get("recipes"):
            raise c.fail(mp, "no [[models.recipes]]: nothing to quantize.")
        recipes: list[Recipe] = []
        for j, r in enumerate(m["recipes"]):
            rp = mp + ("recipes", j)
            c.table(r, _RECIPE, rp)
            if "method" not in r:
                raise c.fail(rp, "missing required field 'method'.", hint=f"Methods: {', '.join(sorted(METHODS))}.")
            if r["method"] not in METHODS:
                raise c.fail(rp + ("method",), f"unknown method {r['method']!r}.",
                             hint=f"Methods: {', '.join(sorted(METHODS))}.")
            c.table(r.get("gates", {}), _GATES, rp + ("gates",))
            c.positive(r, rp, "bits", "group_size", "samples", "seq_len")
            params = {**d.get("quantize", {}), **{k: v for k, v in r.items() if k in _QUANTIZE}}
            rname = c.name(r.get("name") or r["method"], rp + ("name",))
            gates = {**d.get("gates", {}), **m.get("gates", {}), **r.get("gates", {})}
            recipe = Recipe(rname, r["method"], params, gates, _dotted(rp))
            repo_id = f"{publish.get('org', 'qtk')}/{name}-{rname}"
            if repo_id in artifacts:
                raise c.fail(rp + ("name",), f"publishes {repo_id}, as {artifacts[repo_id]} does already.",
                             hint="Give one of the recipes a distinct `name` (e.g. \"gptq-g64\").")
            artifacts[repo_id] = _dotted(rp)
            recipes.append(recipe)
        models.append(ModelSpec(
            name=name, repo=m["repo"], revision=m.get("revision"),
            include=tuple(m.get("include", d.get("include", DEFAULT_INCLUDE))),
            exclude=tuple(m.get("exclude", d.get("exclude", ()))),
            recipes=tuple(recipes), verify={**d.get("verify", {}), **m.get("verify", {})}, publish=publish,
            where=_dotted(mp),
        ))
    store_path = store or os.environ.get("QTK_STORE") or raw.get("store")
    if not store_path:
        raise c.fail(("store",), "no store: set `store = \"DIR\"` in the manifest, --store, or QTK_STORE.")
    sp = Path(store_path).expanduser()
    if not sp.is_absolute() and not (store or os.environ.get("QTK_STORE")):
        sp = file.parent / sp  # a manifest's relative store path is relative to the manifest
    return Manifest(file.absolute(), sp.absolute(), device, tuple(models), raw)
