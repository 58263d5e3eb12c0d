#!/usr/bin/env bash
# Unattended provisioning entry point for cron, CI jobs and Kubernetes Jobs.
#
# Configured by the environment (nothing is asked on stdin):
#   QTK_MANIFEST     manifest path                       (default: scripts/provision-example.toml)
#   QTK_STORE        model store directory               (default: the manifest's `store`)
#   QTK_KEEP_GOING   1: go on with other models after a failure (default 1)
#   QTK_LOCK_TIMEOUT seconds to wait for another run's lock, then exit 22 (default: wait)
#   QTK_SUMMARY      also write the JSON summary to this file (default: none; events are always in
#                    <store>/.qtk-provision/events/, one file per run and writer)
#   QTK_ONLY         space-separated model names to provision (default: all)
#   QTK              the qtk command                      (default: .venv/bin/qtk if present, else qtk)
#   QTK_EXECUTOR     local (default) or ray: each (model, recipe) a Ray task (cluster: RAY_ADDRESS)
#   QTK_SHARD        I/N: provision only shard I (0-based) of N (default: from the job array below)
#   QTK_SHARD_COUNT  N for a Kubernetes Indexed Job (its `completions`): the index is JOB_COMPLETION_INDEX
#   SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT   a Slurm job array (set by sbatch
#                    --array): shard ID-MIN of COUNT (QTK_SHARD_COUNT overrides COUNT)
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
# For N workers: an Indexed Job (completionMode: Indexed, completions: N, QTK_SHARD_COUNT=N) or
# `sbatch --array=0-(N-1)`; every worker mounts the same store and HF cache (NFS is the common case).
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
[ -n "${QTK_EXECUTOR:-}" ] && args+=(--executor "$QTK_EXECUTOR")

shard="${QTK_SHARD:-}"
if [ -z "$shard" ] && [ -n "${JOB_COMPLETION_INDEX:-}" ]; then
  if [ -z "${QTK_SHARD_COUNT:-}" ]; then
    echo "provision.sh: JOB_COMPLETION_INDEX is set (Kubernetes Indexed Job) but QTK_SHARD_COUNT is not:" \
         "set it to the Job's completions." >&2
    exit 2
  fi
  shard="$JOB_COMPLETION_INDEX/$QTK_SHARD_COUNT"
elif [ -z "$shard" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  count="${QTK_SHARD_COUNT:-${SLURM_ARRAY_TASK_COUNT:-}}"
  if [ -z "$count" ]; then
    echo "provision.sh: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor QTK_SHARD_COUNT." >&2
    exit 2
  fi
  case "$SLURM_ARRAY_TASK_ID${SLURM_ARRAY_TASK_MIN:-0}" in
    *[!0-9]*) echo "provision.sh: SLURM_ARRAY_TASK_ID / _MIN must be integers." >&2; exit 2 ;;
  esac
  shard="$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))/$count"
fi
[ -n "$shard" ] && args+=(--shard "$shard")

# progress, summary table and errors on stderr; the store path on stdout
"$qtk_cmd" "${args[@]}" </dev/null
code=$?
echo "qtk provision finished with exit code $code" >&2
exit "$code"
