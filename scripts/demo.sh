#!/usr/bin/env bash
# One command for the main job on the embedded default (no internet needed):
# set up .venv, then serve the shipped SmolLM2 model from a local Hub mirror and run the pipeline on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
"${QTK_VENV:-.venv}/bin/python" scripts/demo.py "$@"
