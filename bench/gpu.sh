#!/usr/bin/env bash
# bf16 vs FP8, plain masked diffusion vs REPR-ALIGN, on one GPU: step time, tokens/s and MFU.
#
#   bash bench/gpu.sh [key.sub=value ...]        # overrides apply to all runs (bench/gpu.yaml)
#
# Four training runs of bench/gpu.yaml (precision bf16|fp8 x align.weight 0|10), one process each;
# bench/gpu_report.py then takes medians over the iterations after WARMUP from each metrics.jsonl.
# Environment: PYTHON (default python), PRECISIONS (default "bf16 fp8"), ITERS (30), WARMUP (10),
# PEAK_TFLOPS (the GPU's dense bf16 peak; A100, H100 SXM and H200 are known), OUT (runs/bench_gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-runs/bench_gpu}
ITERS=${ITERS:-30}
WARMUP=${WARMUP:-10}
if [ ! -f data/build/kjv_text_document.idx ]; then
  "$PY" -m megalign.cli.preprocess --input data/corpus/kjv.jsonl.gz \
    --tokenizer data/tokenizer/kjv_bpe4k.model --output-prefix data/build/kjv --append-eod
fi
mkdir -p "$OUT"
runs=()
for precision in ${PRECISIONS:-bf16 fp8}; do
  for weight in 0 10; do
    run=$OUT/${precision}_align$weight
    rm -rf "$run"
    echo "bench/gpu.sh: precision=$precision align.weight=$weight -> $run" >&2
    "$PY" -m megalign.cli.train --config bench/gpu.yaml "precision=$precision" "align.weight=$weight" \
      "schedule.train_iters=$ITERS" "logging.run_dir=$run" "$@" >"$run.log" 2>&1 \
      || { echo "bench/gpu.sh: the run failed; see $run.log" >&2; tail -n 20 "$run.log" >&2; exit 1; }
    runs+=("$run")
  done
done
"$PY" bench/gpu_report.py --warmup "$WARMUP" "${runs[@]}"
