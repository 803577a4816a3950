#!/usr/bin/env bash
# The README's test command (and what .ci/run calls): set up .venv, then run the unit tier (in
# this process only, about a minute) and, if it passes, everything else. Extra arguments go to
# both pytest runs (a tier they leave empty is skipped); if neither collects a test, that is a
# failure: the suite is missing or the filter matched nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh || exit 1

echo "tests/run.sh: the unit tier (-m unit)"
.venv/bin/python -m pytest -ra -m unit "$@"
unit=$?
if [ "$unit" -ne 0 ] && [ "$unit" -ne 5 ]; then
  exit "$unit"
fi
echo "tests/run.sh: the rest of the suite (-m \"not unit\")"
.venv/bin/python -m pytest -ra -m "not unit" "$@"
rest=$?
if [ "$rest" -eq 5 ]; then
  if [ "$unit" -eq 5 ]; then
    echo "tests/run.sh: pytest collected no tests; the suite is missing or the filter matched" \
         "nothing" >&2
    exit 1
  fi
  exit 0
fi
exit "$rest"
