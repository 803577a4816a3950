#!/usr/bin/env bash
# The tiny demo (no download, random-init model): set up, build the bundled corpus, then train with
# REPR-ALIGN on TP=2 x PP=2 (4 CPU processes). Extra arguments are config overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${MEGALIGN_SKIP_SETUP:-0}" != 1 ]; then
  bash tools/setup_env.sh
fi
PY=${MEGALIGN_PYTHON:-.venv/bin/python}
if [ ! -f data/build/kjv_text_document.idx ]; then
  "$PY" -m megalign.cli.preprocess --input data/corpus/kjv.jsonl.gz \
    --tokenizer data/tokenizer/kjv_bpe4k.model --output-prefix data/build/kjv --append-eod
fi
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc-per-node 4 \
  -m megalign.cli.train --config examples/configs/tiny_demo.yaml "$@"
