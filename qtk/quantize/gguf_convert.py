"""HF checkpoint -> BF16 GGUF with llama.cpp's own converter, carried by qtk (qtk/_vendor/llama_cpp/).

Why a vendored copy run in a subprocess: ``convert_hf_to_gguf.py``, its ``conversion/`` package and the
``gguf-py`` it is written against ship only in llama-cpp-python's sdist (``vendor/llama.cpp/``), in no
wheel; PyPI's ``gguf`` lags the converter (``LazyChunkedTensor`` missing) and is the ``gguf`` that
transformers imports, so the vendored ``gguf-py`` must never replace it in qtk's own process. The
subprocess puts the vendored tree and its ``gguf-py`` first on ``sys.path`` and runs the converter
unmodified; the pinned commit and a digest of the tree go into provenance (``VENDORED.json``,
written by scripts/vendor_llama_cpp.py). The same subprocess records the converter's own tensor-name
mapping (every HF name -> GGUF name it asked gguf-py's ``TensorNameMap`` for), which keys the
importance matrix by the names the quantizer will look up.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .. import _digest, errors

__all__ = ["VENDOR_DIR", "VENDOR_FILE", "tree_digest", "converter_info", "supported_architectures",
           "Conversion", "convert_to_gguf"]

VENDOR_DIR = Path(__file__).resolve().parent.parent / "_vendor" / "llama_cpp"
VENDOR_FILE = "VENDORED.json"

# Runs in the child: the vendored converter first on sys.path, gguf-py's name lookups recorded.
_BOOT = r"""
import json, runpy, sys
vendor, out_json = sys.argv[1], sys.argv[2]
sys.path[:0] = [vendor, vendor + "/gguf-py"]
import gguf
if not gguf.__file__.startswith(vendor):
    sys.exit(f"qtk: imported gguf from {gguf.__file__}, not the vendored copy")
seen = {}
_get = gguf.TensorNameMap.get_name
def get_name(self, key, try_suffixes=()):
    new = _get(self, key, try_suffixes)
    if new is not None:
        seen.setdefault(key, [])
        if new not in seen[key]:
            seen[key].append(new)
    return new
gguf.TensorNameMap.get_name = get_name
sys.argv = [vendor + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
with open(out_json, "w") as fh:
    json.dump({"tensor_map": seen}, fh)
"""


def tree_digest(root: Path) -> str:
    """The vendored tree's digest (:func:`qtk._digest.tree_digest`: bytecode and the record itself left out)."""
    return _digest.tree_digest(root, exclude={VENDOR_FILE})


@lru_cache(maxsize=1)
def converter_info() -> dict:
    """The vendored converter's record (llama.cpp commit, source sdist, tree digest), checked against
    the files: a tree that differs from what was pinned is refused."""
    record_path = VENDOR_DIR / VENDOR_FILE
    if not record_path.is_file():
        raise errors.BackendUnavailableError(
            f"qtk's copy of llama.cpp's converter is missing ({record_path}).",
            hint="Reinstall qtk; in a checkout run scripts/vendor_llama_cpp.py.")
    record = json.loads(record_path.read_text())
    digest = tree_digest(VENDOR_DIR)
    if digest != record.get("tree_sha256"):
        raise errors.BackendUnavailableError(
            f"The vendored converter in {VENDOR_DIR} differs from the pinned copy (tree sha256 {digest[:16]}..., "
            f"pinned {str(record.get('tree_sha256'))[:16]}...).",
            hint="Reinstall qtk, or re-vendor it with scripts/vendor_llama_cpp.py.")
    return record


@lru_cache(maxsize=1)
def supported_architectures() -> frozenset[str]:
    """HF ``architectures`` the vendored converter registers (its ``@ModelBase.register(...)`` lines)."""
    names: set[str] = set()
    for src in (VENDOR_DIR / "conversion").glob("*.py"):
        for args in re.findall(r"@ModelBase\.register\(([^)]*)\)", src.read_text(encoding="utf-8")):
            names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return frozenset(names)


@dataclass(frozen=True)
class Conversion:
    path: Path
    tensor_map: dict[str, list[str]]  # HF tensor name -> GGUF tensor name(s) the converter made of it
    seconds: float
    cpu_seconds: float


def _pump(stream, tail: collections.deque) -> None:
    """Forward the child's output to our stderr (the run's log) and keep its last lines for errors."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace")
        tail.append(line.rstrip())
        sys.stderr.write(line)
    stream.close()


def convert_to_gguf(model_dir: Path, out_file: Path, *, expected_bytes: int,
                    progress: Callable[[int, int], None] = lambda done, total: None) -> Conversion:
    """Convert the checkpoint in ``model_dir`` to a BF16 GGUF at ``out_file``. ``progress(bytes written,
    expected_bytes)`` while the converter writes (the file size, polled)."""
    converter_info()
    map_file = out_file.with_name(out_file.name + ".tensor-map.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, "-c", _BOOT, str(VENDOR_DIR), str(map_file), str(model_dir), "--outfile", str(out_file),
           "--outtype", "bf16"]
    t0, c0 = time.monotonic(), _children_cpu()
    tail: collections.deque = collections.deque(maxlen=20)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    pump = threading.Thread(target=_pump, args=(proc.stdout, tail), daemon=True)
    pump.start()
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if out_file.exists():
                progress(min(out_file.stat().st_size, expected_bytes), expected_bytes)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        pump.join(timeout=10)
    if proc.returncode != 0 or not map_file.is_file():
        out_file.unlink(missing_ok=True)
        last = "\n  ".join(line for line in tail if line)
        raise errors.QuantizeError(f"llama.cpp's converter failed (exit {proc.returncode}) on {model_dir}:\n  {last}",
                                   hint="The backend output has the converter's full log.")
    progress(expected_bytes, expected_bytes)
    tensor_map = json.loads(map_file.read_text())["tensor_map"]
    map_file.unlink()
    return Conversion(out_file, tensor_map, time.monotonic() - t0, _children_cpu() - c0)


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system
