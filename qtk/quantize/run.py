"""The quantize pipeline shared by every method:

validate (before any heavy work) -> calibration samples -> method.run into a temp dir -> tokenizer
files, chat template, generation config copied from the source -> check the standard
quantization_config -> model card -> sealed: every file fsynced, then qtk_provenance.json written
durably, last (a build is trusted when its provenance exists: after a power loss it is whole or has
none) -> put in place atomically (``--overwrite`` swaps; the old output goes only once the new one is
durably in place). A killed run's leftovers are settled by the next run of the same output
(:mod:`qtk.quantize._output`: only when their owner is provably dead).
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .. import __version__, _fs, _json, errors
from .._stdio import stdout_to_stderr
from ..devices import resolve_device
from ..settings import Settings
from .base import Method, QuantizeOptions, RunContext
from ._output import OutputRun, recover
from .calibration import Samples, build_samples, load_calibration
from ..methods import get_method, method_spec
from .source import SourceModel, file_sha256, resolve_model

__all__ = ["QuantizeResult", "quantize", "resolve_device", "PROVENANCE_FILE"]

PROVENANCE_FILE = "qtk_provenance.json"
Progress = Callable[[str, int, int, "int | None"], None]  # (stage, done, total, peak bytes)
_COPY_FROM_SOURCE = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_CPU_WARN_PARAMS = 1_000_000_000


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    provenance: dict

    def to_dict(self) -> dict:
        return {"output": str(self.out), **self.provenance}


def _peak_rss_bytes() -> int | None:
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def _peak_bytes(device: str) -> int | None:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return _peak_rss_bytes()


@contextlib.contextmanager
def _layer_progress(model: SourceModel, device: str, progress: Progress | None):
    """Report ``layer i/N`` while a method runs, backend-agnostic: a forward pre-hook on every
    module notes each decoder layer (``*DecoderLayer``) the first time it runs; layer-by-layer
    methods (GPTQModel's loop) reach them in order, so the k-th new layer is layer k."""
    if progress is None:
        yield
        return
    import torch

    total = int(model.config.get("num_hidden_layers") or (model.config.get("text_config") or {}).get("num_hidden_layers") or 0)
    seen: set[int] = set()

    def hook(module, _args):
        if id(module) not in seen and type(module).__name__.endswith("DecoderLayer"):
            seen.add(id(module))
            progress("quantize: layers done", min(len(seen) - 1, total), total, _peak_bytes(device))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook) if total else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
    if seen and total:
        progress("quantize: layers done", total, total, _peak_bytes(device))


def _output_exists(out: Path) -> errors.OutputExistsError:
    return errors.OutputExistsError(f"{out} already exists.", hint="Choose another -o, or pass --overwrite.")


def _check_output(out: Path, overwrite: bool, log: Callable[[str], None] = lambda s: None) -> None:
    """Settle what killed runs of ``out`` left (restoring an output a killed ``--overwrite`` had set aside),
    then refuse an existing output unless ``overwrite``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out, note=log)
    if out.exists() and not overwrite:
        raise _output_exists(out)


def _check_resources(model: SourceModel, method: Method, options: QuantizeOptions, device: str, out_parent: Path,
                     warn) -> None:
    """Refusals before anything loads: memory first (a model that cannot be held is refused as such, whatever
    the disk), then the output's disk space; a warning for a big model on the CPU."""
    _check_memory(model, method, options, device)
    _check_disk(model, method, options, out_parent)
    if device == "cpu" and model.num_params > _CPU_WARN_PARAMS:
        scale = options.samples * options.seq_len / (64 * 256) if method.needs_calibration else 1
        est = model.num_params / 1e6 * method_spec(method.name).cpu_seconds_per_mparam * scale
        warn(f"Quantizing {model.num_params / 1e9:.1f}B parameters on the CPU: roughly {est / 3600:.1f} h "
             "(estimated from SmolLM2-135M timings). A CUDA GPU is much faster.")


def _check_memory(model: SourceModel, method: Method, options: QuantizeOptions, device: str) -> None:
    """The planner's estimate (the same formula qtk plan and provision --dry-run use), before loading anything."""
    from ..plan import check_fits, quantize_memory, shape_from_config

    with contextlib.suppress(errors.ModelFormatError):  # a config the planner cannot read: no estimate
        shape = shape_from_config(model.config)
        mem = quantize_memory(shape, method.name, device=device, group_size=options.group_size,
                              samples=options.samples, seq_len=options.seq_len)
        what = f"Quantizing {model.repo_id or model.path.name} with {method.name}" + (
            " (it holds the whole model in memory)" if mem.get("holds") == "whole model" else "")
        if device == "cuda":
            check_fits(mem["device_bytes"], "cuda", what,
                       hint="Lower --samples/--seq-len (activations scale with both), or use a bigger GPU.")
        else:  # on a GPU node GPTQModel may offload layers to disk, so RAM is checked on the CPU path only
            check_fits(mem["host_bytes"], "cpu", what,
                       hint="Use a GPU (--device cuda), lower --samples/--seq-len, or a machine with more memory.")


def _check_disk(model: SourceModel, method: Method, options: QuantizeOptions, out_parent: Path) -> None:
    need = model.weight_bytes // 3  # 4-bit weights + scales are ~1/4 of BF16; keep a margin
    with contextlib.suppress(errors.ModelFormatError):  # the planner's size of the output, where it reads the config
        from ..plan import quantized_format, shape_from_config, weight_bytes

        # 8-bit methods (fp8, w8a8) write ~0.6 of the BF16 bytes; 16-bit embeddings make 4-bit ones > 1/3 on
        # small models
        fmt = quantized_format(method.name, options.group_size)
        need = max(need, weight_bytes(shape_from_config(model.config), fmt))
    free = shutil.disk_usage(out_parent).free
    if need > free:
        raise errors.DiskSpaceError(
            f"The output needs roughly {need / 1e9:.2f} GB in {out_parent}; {free / 1e9:.2f} GB are free.",
            hint="Free space or choose another -o.",
        )


def _standard_keys(cfg: dict, method: Method, options: dict) -> dict:
    return {k: cfg.get(k) for k in method.expected_config(QuantizeOptions(**options))}


def _model_card(model: SourceModel, method: Method, prov: dict) -> str:
    o = prov["options"]
    cal = prov.get("calibration")
    src = model.repo_id + f" @ {model.commit}" if model.repo_id else str(model.path)
    lines = [
        "---",
        f"base_model: {model.repo_id or model.path.name}",
        "tags: [qtk, quantized, " + method.name + "]",
        "---",
        f"# {model.repo_id or model.path.name} — {method.name.upper()} {o['bits']}-bit",
        "",
        f"Quantized with qtk {__version__} ({method.distribution} {prov['versions'].get(method.distribution, '?')}) "
        f"on {prov['device']} in {prov['wall_s']:.0f} s.",
        "",
        f"- source: {src}",
        f"- method: {method.name} — {method.description}",
        f"- quantization_config: `{json.dumps(_standard_keys(prov['quantization_config'], method, o))}`",
    ]
    if cal:
        lines.append(f"- calibration: {cal['name']} (sha256 {cal['sha256'][:16]}…), {cal['samples']} samples x "
                     f"{cal['seq_len']} tokens, seed {cal['seed']}, chat template {'on' if cal['chat_template'] else 'off'}")
    else:
        lines.append("- calibration: none (data-free method)")
    lines += ["", "Load it with `AutoModelForCausalLM.from_pretrained(path)` or in vLLM. Full record: "
              f"`{PROVENANCE_FILE}`.", ""]
    return "\n".join(lines)


# Keys of a backend's saved config that name a path of the machine that built it (GPTQModel 7.6 writes
# its offload directory, a temporary or the resume checkpoint's, into quantization_config.meta): they
# mean nothing where the checkpoint is loaded, leak the builder's paths, and make two identical builds
# differ in config.json. Loaders default them (None: a fresh temporary when quantizing again).
_BUILD_PATH_KEYS = ("offload_to_disk_path",)


def _drop_build_paths(out: Path) -> None:
    """Null the builder's paths in ``config.json``'s quantization_config (and its ``meta``) and in
    ``quantize_config.json``, rewriting a file only where one was found."""
    for name, where in (("config.json", ("quantization_config",)), ("quantize_config.json", ())):
        path = out / name
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        node = doc
        for key in where:
            node = node.get(key) if isinstance(node, dict) else None
        changed = False
        for holder in (node, node.get("meta") if isinstance(node, dict) else None):
            if isinstance(holder, dict):
                for key in _BUILD_PATH_KEYS:
                    if holder.get(key) is not None:
                        holder[key] = None
                        changed = True
        if changed:  # not durable here: the whole output is fsynced before its provenance is written
            _fs.write_atomic(path, json.dumps(doc, indent=2, sort_keys=False) + "\n", durable=False)


def _check_quantization_config(out: Path, method: Method, options: QuantizeOptions) -> dict:
    cfg = json.loads((out / "config.json").read_text()).get("quantization_config")
    if not cfg:
        raise errors.QuantizeError(f"{method.name} wrote no quantization_config into config.json.")
    wrong = {k: (cfg.get(k), v) for k, v in method.expected_config(options).items()
             if str(cfg.get(k)).lower() != str(v).lower()}
    if wrong:
        raise errors.QuantizeError(
            f"{method.name} wrote a non-standard quantization_config: "
            + ", ".join(f"{k}={got!r} (expected {want!r})" for k, (got, want) in wrong.items()),
            hint="This breaks loading in transformers/vLLM; please report it with the backend version.",
        )
    return cfg


def quantize(
    model_spec: str,
    out: str | Path,
    options: QuantizeOptions,
    *,
    revision: str | None = None,
    overwrite: bool = False,
    settings: Settings | None = None,
    log: Callable[[str], None] = lambda s: None,
    warn: Callable[[str], None] = lambda s: None,
    progress: Progress | None = None,
    origin: dict | None = None,
) -> QuantizeResult:
    """Quantize ``model_spec`` (a directory, or a Hub repo id resolved in the HF cache) into ``out``.

    ``origin``: where a local directory's files came from (a provisioner's view of a snapshot):
    ``repo_id`` and ``commit`` name the model in the card and provenance instead of the directory; every
    key of it is recorded in the provenance's ``source`` (e.g. ``path`` of the snapshot, ``files``)."""
    t0 = time.monotonic()
    method = get_method(options.method)
    out = Path(out).absolute()
    # -- everything that can be refused is refused before heavy work
    method.check_available()
    device = resolve_device(options.device)
    _check_output(out, overwrite, log)
    model = resolve_model(model_spec, revision=revision, settings=settings)
    if origin is not None:
        model = replace(model, repo_id=origin["repo_id"], commit=origin["commit"])
    options = replace(options, sym=method.sym(options))
    method.validate(model, options, device)
    samples = _samples(method, model, options, settings, warn)
    _check_resources(model, method, options, device, out.parent, warn)  # after the cheap checks, before any load
    log(f"Quantizing {model.repo_id or model.path} ({model.num_params / 1e6:.0f}M params, {model.dtype}) with "
        f"{method.name} {method.label(options)} on {device}")

    run = OutputRun.start(out)  # owner record, then the temporary: see qtk.quantize._output
    tmp = run.tmp
    work = out.parent / f".{out.name}.qtk-work"  # a method's resume checkpoint: kept until success
    try:
        import torch

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_run = time.monotonic()
        ctx = RunContext(model, options, samples, device, tmp, work_dir=work, progress=progress)
        details = _run_method(method, ctx, progress)
        run_s = time.monotonic() - t_run
        qcfg = _complete_output(tmp, method, model, options)
        prov = _provenance(model, method, options, samples, qcfg, device, details, origin=origin,
                           run_s=run_s, wall_s=time.monotonic() - t0)
        (tmp / "README.md").write_text(method.model_card(model, prov) or _model_card(model, method, prov))
        _fs.seal(tmp, PROVENANCE_FILE, _json.dumps(prov, indent=2) + "\n")  # last, durably
        try:
            run.install(overwrite=overwrite)  # --overwrite: swapped, `out` is never half of either, nor missing
        except FileExistsError:  # made by another run meanwhile
            raise _output_exists(out) from None
        shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        run.abandon()
        raise
    return QuantizeResult(out, prov)


def _samples(method, model, options: QuantizeOptions, settings, warn) -> Samples | None:
    """The calibration samples, when this run reads any (``method.calibrates``)."""
    if not method.calibrates(options):
        return None
    from transformers import AutoTokenizer

    cal = load_calibration(options.calibration, text_field=options.text_field, settings=settings)
    tok = AutoTokenizer.from_pretrained(model.path)
    chat_template = options.chat_template
    if chat_template is None:
        chat_template = cal.kind == "chat" and bool(getattr(tok, "chat_template", None))
    samples = build_samples(cal, tok, samples=options.samples, seq_len=options.seq_len, seed=options.seed,
                            chat_template=chat_template, allow_fewer=options.allow_fewer)
    if len(samples.input_ids) < options.samples:
        warn(f"Only {len(samples.input_ids)} calibration samples (asked for {options.samples}): --allow-fewer.")
    return samples


def _run_method(method, ctx: RunContext, progress: Progress | None) -> dict | None:
    """``method.run`` with its output in the log and qtk's layer progress; out-of-memory as ResourceError."""
    import torch

    try:
        layers = contextlib.nullcontext() if method.reports_progress else _layer_progress(ctx.model, ctx.device,
                                                                                            progress)
        with stdout_to_stderr(), layers:
            return method.run(ctx)
    except torch.cuda.OutOfMemoryError as exc:
        raise errors.ResourceError(
            f"CUDA out of memory while quantizing with {method.name}: {str(exc).splitlines()[0]}",
            hint="Lower --samples or --seq-len (activations scale with both), or use a GPU with more memory.",
        ) from exc
    except MemoryError as exc:
        raise errors.ResourceError("Out of CPU memory while quantizing.",
                                   hint="Lower --samples/--seq-len, or use a bigger machine.") from exc


def _complete_output(tmp: Path, method, model, options: QuantizeOptions) -> dict:
    """A checkpoint gets the source's side files, loses the build machine's paths and has its
    quantization_config checked; files of a method's own format (GGUF) were checked by its run."""
    if not method.writes_checkpoint:
        return method.expected_config(options)
    for name in _COPY_FROM_SOURCE:
        if (model.path / name).is_file():
            shutil.copyfile(model.path / name, tmp / name)
    _drop_build_paths(tmp)
    return _check_quantization_config(tmp, method, options)


def _provenance(model, method, options: QuantizeOptions, samples: Samples | None, qcfg: dict, device: str,
                details: dict | None, *, origin: dict | None, run_s: float, wall_s: float) -> dict:
    import torch

    return {
        "qtk_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            **model.to_dict(),
            "weights_sha256": {f.name: file_sha256(f) for f in model.weight_files},
            **(origin or {}),
        },
        "method": method.name,
        "options": options.to_dict(),
        "quantization_config": qcfg,
        "calibration": samples.to_dict() if samples else None,
        "versions": {**method.versions(), "qtk": __version__, "python": platform.python_version()},
        "device": device if device == "cpu" else f"cuda:{torch.cuda.get_device_name(0)}",
        "torch_threads": torch.get_num_threads(),  # the CPU's share of the bytes depends on it (GPTQ)
        "method_details": details or {},
        "quantize_s": round(run_s, 2),
        "wall_s": round(wall_s, 2),
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_vram_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }
