#!/usr/bin/env bash
# Unattended provisioning entry point for cron, CI jobs and Kubernetes Jobs.
#
# Configured by the environment (nothing is asked on stdin):
#   QTK_MANIFEST     manifest path                       (default: scripts/provision-example.toml)
#   QTK_STORE        model store directory               (default: the manifest's `store`)
#   QTK_KEEP_GOING   1: go on with other models after a failure (default 1)
#   QTK_LOCK_TIMEOUT seconds to wait for another run's lock, then exit 22 (default: wait)
#   QTK_SUMMARY      also write the JSON summary to this file (default: none; events are always in
#                    <store>/.qtk-provision/events.jsonl)
#   QTK_ONLY         space-separated model names to provision (default: all)
#   QTK              the qtk command                      (default: .venv/bin/qtk if present, else qtk)
#   HF_ENDPOINT, HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE  as for every qtk / huggingface_hub tool
#
# Exit codes (also `qtk exit-codes`):
#   0   every artifact verified, gated and published (or already was)
#   3   some artifacts failed their quality gate (they were not published; the rest were)
#   60  --keep-going: some models failed with errors (the summary names each error and its code)
#   2   manifest invalid (file:line and field in the message)     40  not enough disk for the plan
#   10-17 auth / not found (as qtk pull)   22  lock timeout   30  endpoint unreachable   50-55 quantize
#
# A Kubernetes Job runs it as is: mount the store and HF_HOME on volumes, set HF_TOKEN from a secret.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"  # relative paths in the environment stay relative to the caller
manifest="${QTK_MANIFEST:-$repo/scripts/provision-example.toml}"
qtk_cmd="${QTK:-}"
if [ -z "$qtk_cmd" ]; then
  if [ -x "$repo/.venv/bin/qtk" ]; then qtk_cmd="$repo/.venv/bin/qtk"; else qtk_cmd=qtk; fi
fi
args=(provision run "$manifest")
[ "${QTK_KEEP_GOING:-1}" = "1" ] && args+=(--keep-going)
[ -n "${QTK_STORE:-}" ] && args+=(--store "$QTK_STORE")
[ -n "${QTK_LOCK_TIMEOUT:-}" ] && args+=(--lock-timeout "$QTK_LOCK_TIMEOUT")
[ -n "${QTK_SUMMARY:-}" ] && args+=(--summary-json "$QTK_SUMMARY")
for m in ${QTK_ONLY:-}; do args+=(--only "$m"); done

# progress, summary table and errors on stderr; the store path on stdout
"$qtk_cmd" "${args[@]}" </dev/null
code=$?
echo "qtk provision finished with exit code $code" >&2
exit "$code"
