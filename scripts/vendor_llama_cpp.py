#!/usr/bin/env python3
"""Refresh qtk's pinned copy of llama.cpp's HF -> GGUF converter (qtk/_vendor/llama_cpp/).

llama.cpp's ``convert_hf_to_gguf.py``, its ``conversion/`` package and the ``gguf-py`` it is written
against ship only in llama-cpp-python's source distribution (``vendor/llama.cpp/``), not in any wheel;
PyPI's ``gguf`` is older than the converter needs (``LazyChunkedTensor`` missing). qtk carries the
three (plus the chat templates some converters read and llama.cpp's MIT licence) as package data and
runs them in a subprocess whose ``sys.path`` puts the vendored ``gguf-py`` first
(:mod:`qtk.quantize.gguf_convert`).

    python scripts/vendor_llama_cpp.py                 # downloads the pinned sdist with pip
    python scripts/vendor_llama_cpp.py --sdist FILE    # from a downloaded sdist

Bumping: change VERSION, SDIST_SHA256 and LLAMA_CPP_COMMIT (llama-cpp-python's CHANGELOG names the
llama.cpp commit of each release), run this, run tests/test_gguf*.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_COMMIT = "0c1e57098"  # llama-cpp-python 0.3.36's CHANGELOG: "update llama.cpp to ggml-org/llama.cpp@0c1e57098"
# what the converter needs, relative to the sdist's vendor/llama.cpp/
KEEP = ("convert_hf_to_gguf.py", "conversion", "gguf-py/gguf", "models/templates", "LICENSE")
DROP = ("gguf-py/gguf/scripts",)  # gguf-dump & co.: not imported by the converter

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / "qtk" / "_vendor" / "llama_cpp"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sdist", type=Path, help="llama_cpp_python-VERSION.tar.gz (default: pip download it)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from qtk._digest import file_sha256
    from qtk.quantize.gguf_convert import VENDOR_FILE, tree_digest

    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", tmp], check=True)
            sdist = Path(tmp) / f"llama_cpp_python-{VERSION}.tar.gz"
        got = file_sha256(sdist)
        if got != SDIST_SHA256:
            print(f"{sdist}: sha256 {got}, expected {SDIST_SHA256}", file=sys.stderr)
            return 1
        with tarfile.open(sdist) as tar:
            prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                       and any(m.name[len(prefix):] == k or m.name[len(prefix):].startswith(k + "/") for k in KEEP)
                       and not any(m.name[len(prefix):].startswith(d + "/") for d in DROP)]
            tar.extractall(tmp, members=members, filter="data")
        src = Path(tmp) / prefix
        shutil.rmtree(DEST, ignore_errors=True)
        for k in KEEP:
            (DEST / k).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (src / k).is_dir() else shutil.copyfile)(src / k, DEST / k)
    record = {
        "what": "llama.cpp's HF -> GGUF converter (convert_hf_to_gguf.py, conversion/, gguf-py/gguf, models/templates)",
        "source": f"llama-cpp-python {VERSION} sdist from PyPI, vendor/llama.cpp/",
        "sdist_sha256": SDIST_SHA256,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "llama_cpp_repo": "https://github.com/ggml-org/llama.cpp",
        "license": "MIT (LICENSE)",
        "dropped": list(DROP),
        "tree_sha256": tree_digest(DEST),
    }
    (DEST / VENDOR_FILE).write_text(json.dumps(record, indent=2) + "\n")
    n = sum(1 for p in DEST.rglob("*") if p.is_file())
    print(f"vendored {n} files into {DEST} (tree sha256 {record['tree_sha256'][:16]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
