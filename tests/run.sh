#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): set up .venv (Python 3.11, megatron-core
# 0.16.x), run the unit tier (in this process only, about a minute) and, if it passes, everything
# else; then the compatibility tier: a Python 3.12 environment (.venv-py312, megatron-core 0.19.x)
# running the unit tier, the fast tier and the tests marked `compat`. Extra arguments go to every
# pytest run (a tier they leave empty is skipped); if no run collects a test, that is a failure:
# the suite is missing or the filter matched nothing. MEGALIGN_COMPAT=0 leaves the compatibility
# tier out; PYTHON312 names its interpreter (found on the PATH or under pyenv otherwise).
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh || exit 1
# llama.cpp, which reads megalign's Dream exports in tests/test_hf_export.py (built once per machine)
bash tools/setup_llama_cpp.sh || exit 1

# the compatibility tier's environment is set up while the first tiers run (it is mostly waiting
# on the disk, and setting it up after them added its minutes to the suite's)
compat_setup=
if [ "${MEGALIGN_COMPAT:-1}" != 0 ]; then
  python312=${PYTHON312:-}
  if [ -z "$python312" ]; then
    for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
      if "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
        python312=$candidate
        break
      fi
    done
  fi
  if [ -z "$python312" ]; then
    echo "tests/run.sh: the compatibility tier needs Python 3.12 (megatron-core 0.19): install" \
         "it, name it with PYTHON312=..., or leave the tier out with MEGALIGN_COMPAT=0" >&2
    exit 1
  fi
  compat_log=$(mktemp)
  # in a process group of its own, so that a tier that fails (which ends this script) ends the
  # set-up and its pip too
  PYTHON=$python312 VENV=.venv-py312 setsid -w bash tools/setup_env.sh >"$compat_log" 2>&1 &
  compat_setup=$!
  trap '[ -n "$compat_setup" ] && kill -- -"$compat_setup" 2>/dev/null; rm -f "$compat_log"' EXIT
fi

collected=0
# tier NAME PYTHON PYTEST-ARGS...: one pytest run; stops the script on a failure
tier() {
  local name=$1 python=$2
  shift 2
  echo "tests/run.sh: $name"
  "$python" -m pytest -ra "$@"
  local code=$?
  case "$code" in
    0) collected=1 ;;
    5) ;;
    *) exit "$code" ;;
  esac
}

tier "the unit tier (-m unit)" .venv/bin/python -m unit "$@"
tier "the rest of the suite (-m \"not unit\")" .venv/bin/python -m "not unit" "$@"

if [ -n "$compat_setup" ]; then
  if ! wait "$compat_setup"; then
    cat "$compat_log" >&2
    echo "tests/run.sh: setting up .venv-py312 for the compatibility tier failed (above)" >&2
    exit 1
  fi
  rm -f "$compat_log"
  compat_setup=
  py312=.venv-py312/bin/python
  "$py312" -c 'import megalign, megatron.core as m; print("tests/run.sh: the compatibility" \
    " tier: megatron-core", m.__version__, "on Python", __import__("platform").python_version())'
  tier "compatibility: the unit tier" "$py312" -m unit "$@"
  tier "compatibility: the fast tier and the compat tests" "$py312" \
    -m "not unit and (not slow or compat)" "$@"
fi

if [ "$collected" = 0 ]; then
  echo "tests/run.sh: pytest collected no tests; the suite is missing or the filter matched" \
       "nothing" >&2
  exit 1
fi
