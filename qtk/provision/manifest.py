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

import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import errors
from ..hub.names import repo_id_problem
from ..modelspec import CHECKPOINT_FILES
from ..tomlcheck import Array, Checker, dotted, read_toml
from ..verify.gates import BY_NAME as GATE_BY_NAME
from ..verify.gates import limit_problem

__all__ = ["Manifest", "ModelSpec", "Recipe", "load_manifest", "ManifestError"]

DEFAULT_INCLUDE = CHECKPOINT_FILES  # the one include list (qtk.modelspec)
_HINT = "See the manifest format in README.md (section `qtk provision`) or scripts/provision-example.toml."


class ManifestError(errors.UsageError):
    """The manifest file is not valid TOML, or a field is missing, unknown or of the wrong type."""

    exit_code = 2


# field -> accepted python types (bool is not an int here)
_QUANTIZE = {"bits": int, "group_size": int, "sym": bool, "desc_act": bool, "calibration": str, "text_field": str,
             "samples": int, "seq_len": int, "seed": int, "chat_template": bool, "allow_fewer": bool,
             "smooth": bool, "smooth_alpha": (int, float),
             "gguf_type": str, "imatrix": bool}  # gguf: one file type per recipe (each artifact is verified and gated)
_VERIFY = {"text": str, "text_field": str, "ctx": int, "max_tokens": int, "smoke": bool, "max_new_tokens": int,
           "seed": int,
           "tasks": Array(str), "tasks_dir": str, "limit": int, "num_fewshot": int}  # qtk verify --tasks
_GATES = {**{name: (int, float) for name in GATE_BY_NAME}, "require_smoke": bool}  # one row per gate (qtk.verify.gates)
_PUBLISH = {"org": str, "push_to_hub": bool, "hub_org": str, "hub_private": bool}
_DEFAULTS = {"device": str, "include": Array(str), "exclude": Array(str), "quantize": dict, "verify": dict,
             "gates": dict, "publish": dict}
_MODEL = {"repo": str, "name": str, "revision": str, "include": Array(str), "exclude": Array(str),
          "recipes": Array(dict), "verify": dict, "gates": dict, "publish": dict}
_RECIPE = {"method": str, "name": str, "gates": dict, **_QUANTIZE}
_TOP = {"store": str, "defaults": dict, "models": Array(dict)}


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


def _positive(c: Checker, d: dict, path: tuple, *keys: str) -> None:
    for k in keys:
        if k in d and d[k] <= 0 and not (k == "group_size" and d[k] == -1):
            raise c.fail(path + (k,), f"must be positive (got {d[k]}).")


def _gates(c: Checker, d: object, path: tuple) -> dict:
    """A [gates] table: known gates only, each limit a finite number in its gate's range (qtk.verify.gates)."""
    c.table(d, _GATES, path)
    for k, v in d.items():
        if k in GATE_BY_NAME and (why := limit_problem(GATE_BY_NAME[k], v)):
            raise c.fail(path + (k,), why + ".", hint="A gate that is NaN, infinite or negative would pass or "
                         "fail every model: give a finite number >= 0, or leave the gate out.")
    return d


def _verify_options(c: Checker, v: dict, path: tuple) -> dict:
    """A model's verify options; ``tasks_dir`` relative to the manifest, like ``store``."""
    if v.get("num_fewshot", 0) < 0:
        raise c.fail(path + ("num_fewshot",), f"must be >= 0 (got {v['num_fewshot']}).")
    if v.get("tasks_dir"):
        v = {**v, "tasks_dir": str((c.file.parent / Path(v["tasks_dir"]).expanduser()).absolute())}
    return v


def _published_id(c: Checker, org: str, name: str, rname: str, org_path: tuple, rp: tuple) -> str:
    """``org/name-recipe``, by the one owner of repo-id rules (qtk.hub.names): what the mirror can serve."""
    repo_id = f"{org}/{name}-{rname}"
    why = repo_id_problem(repo_id, namespace=True)
    if why:
        blame = org_path if repo_id_problem(f"{org}/x", namespace=True) else rp + ("name",)
        raise c.fail(blame, f"publishes {repo_id!r}, which is not a repo id the Hub or qtk serve accepts: {why}.",
                     hint="Choose an org, model name and recipe name whose joined id is valid: ASCII letters, "
                          "digits, '_', '-', '.', at most 96 characters per part, no '--' or '..', not ending "
                          "in '.git' (qtk/hub/names.py).")
    return repo_id


def _recipe(c: Checker, r: object, rp: tuple, d: dict, model_gates: dict, methods: tuple[str, ...]) -> Recipe:
    from ..quantize.base import QuantizeOptions
    from ..methods import get_method

    c.table(r, _RECIPE, rp, required=("method",))
    if r["method"] not in methods:
        raise c.fail(rp + ("method",), f"unknown method {r['method']!r}.", hint=f"Methods: {', '.join(sorted(methods))}.")
    _gates(c, r.get("gates", {}), rp + ("gates",))
    _positive(c, r, rp, "bits", "group_size", "samples", "seq_len")
    # bits unset: the method's first width (fp8/w8a8: 8), as `qtk quantize` without --bits
    params = {"bits": get_method(r["method"]).bits[0], **d.get("quantize", {}),
              **{k: v for k, v in r.items() if k in _QUANTIZE}}
    # the method's own allowed values (its class: bits, group sizes, calibration minimums), at load
    for option, why in get_method(r["method"]).option_problems(QuantizeOptions(r["method"], **params)).items():
        where = rp + (option,) if option in r else ("defaults", "quantize", option)
        raise c.fail(where, why + ".", hint=f"`qtk quantize --help` lists the options; method {r['method']!r} "
                                            "reads the ones its class supports.")
    gates = {**d.get("gates", {}), **model_gates, **r.get("gates", {})}
    return Recipe(r.get("name") or r["method"], r["method"], params, gates, dotted(rp))


def _model(c: Checker, m: object, mp: tuple, d: dict, methods: tuple[str, ...], artifacts: dict) -> ModelSpec:
    c.table(m, _MODEL, mp, required=("repo",))
    if why := repo_id_problem(m["repo"], namespace=True):
        raise c.fail(mp + ("repo",), f"{m['repo']!r} is not a repo id (namespace/name): {why}.")
    for sub, schema in (("verify", _VERIFY), ("publish", _PUBLISH)):
        c.table(m.get(sub, {}), schema, mp + (sub,))
    _gates(c, m.get("gates", {}), mp + ("gates",))
    _positive(c, m.get("verify", {}), mp + ("verify",), "ctx", "max_tokens", "max_new_tokens", "limit")
    name = m.get("name") or m["repo"].split("/")[1].lower()
    publish = {**d.get("publish", {}), **m.get("publish", {})}
    org_path = mp + ("publish", "org") if "org" in m.get("publish", {}) else ("defaults", "publish", "org")
    if not m.get("recipes"):
        raise c.fail(mp, "no [[models.recipes]]: nothing to quantize.")
    recipes: list[Recipe] = []
    for j, r in enumerate(m["recipes"]):
        rp = mp + ("recipes", j)
        recipe = _recipe(c, r, rp, d, m.get("gates", {}), methods)
        repo_id = _published_id(c, publish.get("org", "qtk"), name, recipe.name, org_path, rp)
        if repo_id in artifacts:
            raise c.fail(rp + ("name",), f"publishes {repo_id}, as {artifacts[repo_id]} does already.",
                         hint="Give one of the recipes a distinct `name` (e.g. \"gptq-g64\").")
        artifacts[repo_id] = dotted(rp)
        recipes.append(recipe)
    return ModelSpec(
        name=name, repo=m["repo"], revision=m.get("revision"),
        include=tuple(m.get("include", d.get("include", DEFAULT_INCLUDE))),
        exclude=tuple(m.get("exclude", d.get("exclude", ()))),
        recipes=tuple(recipes), publish=publish,
        verify=_verify_options(c, {**d.get("verify", {}), **m.get("verify", {})}, mp + ("verify",)),
        where=dotted(mp),
    )


def load_manifest(path: str | Path, *, store: str | Path | None = None) -> Manifest:
    """Read and validate a manifest. ``store`` (or $QTK_STORE) overrides the manifest's store path."""
    from ..methods import method_names

    methods = method_names()  # read when called: methods registered later are known
    raw, c = read_toml(path, what="Manifest", error=ManifestError, hint=_HINT,
                       missing_hint="Pass the path of a TOML manifest, e.g. scripts/provision-example.toml.")
    file = c.file
    c.table(raw, _TOP, ())
    d = c.table(raw.get("defaults", {}), _DEFAULTS, ("defaults",))
    for sub, schema in (("quantize", _QUANTIZE), ("verify", _VERIFY), ("publish", _PUBLISH)):
        c.table(d.get(sub, {}), schema, ("defaults", sub))
    _gates(c, d.get("gates", {}), ("defaults", "gates"))
    _positive(c, d.get("quantize", {}), ("defaults", "quantize"), "bits", "group_size", "samples", "seq_len")
    _positive(c, d.get("verify", {}), ("defaults", "verify"), "ctx", "max_tokens", "max_new_tokens", "limit")
    device = d.get("device", "auto")
    if device not in ("auto", "cuda", "cpu"):
        raise c.fail(("defaults", "device"), f"must be auto, cuda or cpu (got {device!r}).")
    if not raw.get("models"):
        raise c.fail(("models",), "no [[models]] entries: nothing to provision.")
    artifacts: dict[str, str] = {}
    models = tuple(_model(c, m, ("models", i), d, methods, artifacts) for i, m in enumerate(raw["models"]))
    store_path = store or os.environ.get("QTK_STORE") or raw.get("store")
    if not store_path:
        raise c.fail(("store",), "no store: set `store = \"DIR\"` in the manifest, --store, or QTK_STORE.")
    sp = Path(store_path).expanduser()
    if not sp.is_absolute() and not (store or os.environ.get("QTK_STORE")):
        sp = file.parent / sp  # a manifest's relative store path is relative to the manifest
    return Manifest(file.absolute(), sp.absolute(), device, models, raw)
