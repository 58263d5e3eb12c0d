#!/usr/bin/env bash
# The provisioning pipeline end to end on this machine, offline: stage the shipped SmolLM2 in a local
# Hub mirror (the upstream), run scripts/provision.sh with scripts/provision-example.toml against it,
# then serve the store and load a published artifact from it like a cluster node would.
#   bash scripts/provision-example.sh        # sets up .venv first (idempotent); re-runs skip finished steps
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/qtk ] || bash scripts/setup.sh test
exec .venv/bin/python scripts/provision_example.py "$@"
