#!/usr/bin/env bash
# One command, exactly what CI runs: test the installed product, not the checkout.
#  1. build the wheel (pip wheel --no-deps .)
#  2. install it, not editable, into fresh venvs under $QTK_TEST_WORK (default .qtk-test/):
#     - Python 3.11 with every backend (torch CPU build pinned in the same pip install): the whole suite
#     - Python 3.10 and 3.13 (the oldest qtk supports, the newest its dependencies support) without
#       torch: the torch-free part (hub, auth, pull, serve, plan, provision manifests, install); these
#       run in parallel with the 3.11 install
#  3. run pytest from outside the checkout against the installed qtk (a test asserts qtk comes from
#     site-packages). Exit code 5 (no tests collected) counts as a failure.
# Extra arguments go to the 3.11 pytest (e.g. -k pull); paths may be given relative to the checkout.
# Environment: QTK_TEST_WORK, QTK_TEST_PYTHONS (default "3.10 3.13"; "" runs 3.11 only), PYTHON (the 3.11).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
work="${QTK_TEST_WORK:-$root/.qtk-test}"
extra_pythons="${QTK_TEST_PYTHONS-3.10 3.13}"
export HF_HUB_DISABLE_TELEMETRY=1 PYTHONSAFEPATH=1
t0=$(date +%s)
say() { echo "test.sh [$(( $(date +%s) - t0 ))s] $*" >&2; }

find_python() {  # 3.10 -> an interpreter of that version (PATH first, then pyenv's newest patch release)
  local v=$1 p
  for p in "python$v" $(command -v pyenv >/dev/null && ls -d "$(pyenv root)/versions/$v".* 2>/dev/null | sort -V -r | sed "s|$|/bin/python$v|"); do
    if "$p" -c "import sys; assert sys.version_info[:2] == tuple(map(int, '$v'.split('.')))" 2>/dev/null; then
      command -v "$p" || echo "$p"
      return 0
    fi
  done
  return 1
}

# pytest from a directory that is not the checkout, so neither it nor `python -m` subprocesses see ./qtk
run_pytest() {  # VENV LOG PROFILE ARGS...
  local venv=$1 log=$2 profile=$3
  shift 3
  local args=() a
  for a in "$@"; do
    if [ -e "$root/$a" ]; then args+=("$root/$a"); else args+=("$a"); fi
  done
  [ ${#args[@]} -gt 0 ] || args=("$root/tests")
  (cd "$work" && QTK_TEST_INSTALLED=1 QTK_TEST_PROFILE=$profile QTK_WHEEL="$wheel" \
     "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" -c "$root/pyproject.toml" "${args[@]}") \
     > "$log" 2>&1
  local rc=$?
  [ "$rc" -ne 5 ] || { echo "pytest collected no tests: treating as failure" >> "$log"; rc=1; }
  return "$rc"
}

rm -rf "$work"
mkdir -p "$work/dist"
say "building the wheel"
rm -rf "$root/build"  # setuptools' scratch: files moved out of qtk/ would otherwise ship from a stale build/lib
"${PYTHON:-python3}" -m pip wheel -q --no-deps -w "$work/dist" "$root" > "$work/wheel.log" 2>&1 \
  || { cat "$work/wheel.log" >&2; exit 1; }
wheel=$(ls "$work"/dist/qtk-*.whl)

# the torch-free runs on the other Pythons, in the background
pids=() names=()
for v in $extra_pythons; do
  py=$(find_python "$v") || { say "Python $v not found (PATH or pyenv): set QTK_TEST_PYTHONS to skip it"; exit 1; }
  (
    QTK_VENV="$work/venv-$v" PYTHON="$py" QTK_WHEEL="$wheel" bash "$root/scripts/setup.sh" test-base 2> "$work/setup-$v.log" \
      || { cat "$work/setup-$v.log" > "$work/pytest-$v.log"; exit 1; }
    run_pytest "$work/venv-$v" "$work/pytest-$v.log" base "$root/tests"
  ) &
  pids+=($!) names+=("$v")
done

say "installing the wheel with every backend (Python 3.11, torch CPU build)"
QTK_VENV="$work/venv-full" QTK_WHEEL="$wheel" bash "$root/scripts/setup.sh" test || exit 1
say "running the whole suite on $("$work/venv-full/bin/python" -V) against the installed wheel"
run_pytest "$work/venv-full" "$work/pytest-full.log" full "$@"
rc=$?
cat "$work/pytest-full.log"
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  r=$?
  say "Python ${names[$i]} (torch-free part, installed wheel): $(tail -n 1 "$work/pytest-${names[$i]}.log") (exit $r)"
  if [ "$r" -ne 0 ]; then
    cat "$work/pytest-${names[$i]}.log"
    rc=1
  fi
done
say "done, exit $rc"
exit "$rc"
