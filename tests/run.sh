#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): set up .venv, then run the whole suite.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh || exit 1
.venv/bin/python -m pytest -ra "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests; the suite is missing or the filter matched nothing" >&2
  exit 1
fi
exit "$status"
