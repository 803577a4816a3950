#!/usr/bin/env bash
# bf16 vs FP8, plain masked diffusion vs REPR-ALIGN, and packed documents as a dense mask vs THD,
# on one GPU: step time, tokens/s, MFU and peak memory; then REPR-ALIGN's pay-off at GPU scale
# (about 10 minutes of one H200).
#
#   bash bench/gpu.sh [key.sub=value ...]        # overrides apply to every training run
#
# Four training runs of bench/gpu.yaml (precision bf16|fp8 x align.weight 0|10), one process each;
# then two with per-document attention at LONG_SEQ tokens in bf16 with REPR-ALIGN, the documents as
# an explicit mask (Transformer Engine's arbitrary-mask attention) and as THD (its fused attention;
# FORMATS, default "mask thd"; LONG_ARGS adds overrides to these two only). bench/gpu_report.py
# then takes medians over the iterations after WARMUP from each metrics.jsonl, and each run's peak
# from its memory.json.
# Then the SmolLM2-135M conversion study of bench/converge.py in bf16: lambda 0 vs 10 under the
# published freeze, 300 steps of 64 x 256 tokens on all of KJV, paired held-out evaluation
# (results in $OUT/converge). STUDY=0 skips it; STUDY_ARGS replaces its arguments (the suite
# dry-runs it on CPU with tiny shapes: PRECISIONS="" STUDY_ARGS="--quick ...").
# Environment: PYTHON (default python), PRECISIONS (default "bf16 fp8"), FORMATS (default
# "mask thd"), LONG_SEQ (4096), LONG_ARGS, ITERS (30), WARMUP (10),
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
# train NAME OVERRIDE...: one run of bench/gpu.yaml into $OUT/NAME
train() {
  local run=$OUT/$1
  shift
  rm -rf "$run"
  echo "bench/gpu.sh: $* -> $run" >&2
  "$PY" -m megalign.cli.train --config bench/gpu.yaml "schedule.train_iters=$ITERS" \
    "logging.run_dir=$run" "$@" >"$run.log" 2>&1 \
    || { echo "bench/gpu.sh: the run failed; see $run.log" >&2; tail -n 20 "$run.log" >&2; exit 1; }
  runs+=("$run")
}
for precision in ${PRECISIONS-bf16 fp8}; do  # set but empty: no throughput runs
  for weight in 0 10; do
    train "${precision}_align$weight" "precision=$precision" "align.weight=$weight" "$@"
  done
done
LONG_SEQ=${LONG_SEQ:-4096}
for format in ${FORMATS-mask thd}; do
  # shellcheck disable=SC2086  # LONG_ARGS is a list of overrides
  train "documents_${format}_$LONG_SEQ" precision=bf16 align.weight=10 \
    model.document_attention=true "model.document_format=$format" "model.seq_length=$LONG_SEQ" \
    data.micro_batch_size=2 data.global_batch_size=8 "$@" ${LONG_ARGS:-}
done
if [ ${#runs[@]} -gt 0 ]; then
  "$PY" bench/gpu_report.py --warmup "$WARMUP" "${runs[@]}"
fi
if [ "${STUDY:-1}" = 1 ]; then
  # shellcheck disable=SC2086  # STUDY_ARGS is a list of arguments
  "$PY" bench/converge.py ${STUDY_ARGS:---model smollm2 --sizes 0 --weights 0 10 \
    --freeze embedding --modes full --seeds 1 --steps 300 --eval-interval 50 --jobs 1 \
    --time-steps 20 --out $OUT/converge precision=bf16 model.seq_length=256 \
    data.micro_batch_size=64 data.global_batch_size=64 evaluation.batch_size=64}
fi
