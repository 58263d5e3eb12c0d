"""What a provisioning step's output depends on, and why a step re-runs.

    quantize = the selected source files' content ids (LFS sha256 / git blob oids; not the commit,
               so a README-only upstream commit changes nothing) + the options the method reads
               (the method registry's ``reads``) + the calibration set's digest + the toolchain
    toolchain = qtk, the method's backend, transformers and torch versions, and the device class

Every input is kept as a readable dict (:class:`StepInputs`) beside its key, so that a re-run can say
which input changed: ``new``, ``changed input config.json``, ``changed option group_size: 64 -> 128``,
``changed toolchain: torch 2.13.0 -> 2.14.1``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import asdict, dataclass

from .. import __version__

__all__ = ["StepInputs", "toolchain", "device_class", "hub_dataset_digest", "diff_inputs", "key_of", "KEY_VERSION"]

KEY_VERSION = 2  # v1 keys hashed the commit and every option
_KEY_LEN = 24


def key_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:_KEY_LEN]


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_class(device: str) -> str:
    """``cpu``, or ``cuda:sm<major><minor>`` (kernels and numerics follow the compute capability)."""
    if device != "cuda":
        return device
    try:
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        return f"cuda:sm{major}{minor}"
    except Exception:  # noqa: BLE001 - no capability: the class is still "cuda"
        return "cuda"


def toolchain(distribution: str | None, device: str, *, cpu_threads: int | None = None) -> dict:
    """The versions a step's numbers depend on (read from the installed distributions' metadata:
    nothing is imported). ``cpu_threads``: the torch thread count a calibrated CPU build computes with
    (GPTQ's bytes change with it: matrix products split their sums by thread), recorded only for the
    ``cpu`` device class, so one key always names one set of bytes."""
    out = {"qtk": __version__, "torch": _dist_version("torch"), "transformers": _dist_version("transformers"),
           "device": device_class(device)}
    if cpu_threads and out["device"] == "cpu":
        out["cpu_threads"] = cpu_threads
    if distribution and distribution not in out and distribution != "qtk":
        out[distribution] = _dist_version(distribution)
    return out


def hub_dataset_digest(spec: str, text_field: str | None, settings) -> str:
    """The digest of an ``hf://datasets/ns/name[@rev][/path]`` text set from metadata only: the files'
    content ids at the resolved commit (what ``qtk.texts`` would download and read). A dry run stays a
    dry run, and the real run gets the same key."""
    from .. import errors
    from ..hub.download import plan_pull

    rest = spec[len("hf://datasets/"):]
    parts = rest.split("/")
    if len(parts) < 2:
        raise errors.UsageError(f"Bad dataset spec {spec!r}.", hint="Use hf://datasets/ns/name[@rev][/path/in/repo].")
    name, _, rev = parts[1].partition("@")
    path_in_repo = "/".join(parts[2:])
    include = [path_in_repo] if path_in_repo else ["*.txt", "*.jsonl", "*.parquet"]  # as qtk.texts selects
    plan = plan_pull(f"{parts[0]}/{name}", revision=rev or None, include=include, repo_type="dataset",
                     settings=settings)
    files = sorted([f.file.path, f.file.oid] for f in plan.files)
    return hashlib.sha256(json.dumps({"spec": spec.split("@")[0], "text_field": text_field, "files": files},
                                     sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class StepInputs:
    """The quantize step's inputs, readable (what the key hashes)."""

    files: dict  # path -> content id
    options: dict  # only the options the method reads
    calibration_sha256: str | None
    toolchain: dict

    def key(self) -> str:
        return key_of({"v": KEY_VERSION, **asdict(self)})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> StepInputs | None:
        if not isinstance(d, dict) or not all(isinstance(d.get(k), dict) for k in ("files", "options", "toolchain")):
            return None
        cal = d.get("calibration_sha256")
        return cls(d["files"], d["options"], cal if isinstance(cal, str) else None, d["toolchain"])


def _changes(kind: str, old: dict, new: dict) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new), key=str):
        if k not in old:
            out.append(f"added {kind} {k}" if kind == "input" else f"changed {kind}: {k} (new)")
        elif k not in new:
            out.append(f"removed {kind} {k}" if kind == "input" else f"changed {kind}: {k} (dropped)")
        elif old[k] != new[k]:
            out.append(f"changed {kind} {k}" if kind == "input" else f"changed {kind}: {k} {old[k]} -> {new[k]}")
    return out


def diff_inputs(old: StepInputs | None, new: StepInputs) -> list[str]:
    """Why ``new`` does not match what was built last time: ``["new"]`` without a previous build."""
    if old is None:
        return ["new"]
    out = _changes("input", old.files, new.files)
    out += [c.replace("changed option: ", "changed option ") for c in _changes("option", old.options, new.options)]
    if old.calibration_sha256 != new.calibration_sha256:
        out.append("changed calibration set")
    out += _changes("toolchain", old.toolchain, new.toolchain)
    return out or ["key format changed"]
