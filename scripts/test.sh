#!/usr/bin/env bash
# One command: set up .venv and run the whole test suite. Exit code 5 (no tests) counts as failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test || exit 1
export HF_HUB_DISABLE_TELEMETRY=1
.venv/bin/python -m pytest -q tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as failure" >&2
  exit 1
fi
exit "$rc"
