#!/usr/bin/env bash
# Diffusion SFT of the main job's student (run `bash examples/quickstart.sh` first):
#   1. tokenizes the bundled instruction set (chat messages, SmolLM2's chat template) into tokens
#      and a loss-mask stream (megalign-preprocess --sft messages),
#   2. fine-tunes the student on it, only the answers noised and supervised, with REPR-ALIGN to the
#      AR teacher, on TP=1 x PP=2 (examples/configs/smollm2_sft.yaml),
#   3. answers one instruction with the student before and after SFT (chat template, default
#      decoding).
# Extra arguments are training config overrides. MEGALIGN_RUN_DIR (default runs/smollm2) is the
# main job's run; MEGALIGN_SFT_DIR (default runs/smollm2_sft) receives this one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${MEGALIGN_PYTHON:-.venv/bin/python}
RUN=${MEGALIGN_RUN_DIR:-runs/smollm2}
SFT=${MEGALIGN_SFT_DIR:-runs/smollm2_sft}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
if [ ! -f "$RUN/checkpoints/latest" ]; then
  echo "examples/sft.sh: $RUN/checkpoints has no student; run bash examples/quickstart.sh first" >&2
  exit 2
fi
EOD=$("$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['data'].get('eod_token') or '')" \
  "$RUN/ar/megalign.yaml")
if [ ! -f data/build/kjv_instructions_smollm2_sft_document.idx ]; then
  "$PY" -m megalign.cli.preprocess --input data/corpus/kjv_instructions.jsonl.gz \
    --tokenizer "$RUN/ar/tokenizer" --output-prefix data/build/kjv_instructions_smollm2 \
    --sft messages ${EOD:+--eod-token "$EOD"} --workers 2
fi
"$PY" -m torch.distributed.run --standalone --nproc-per-node 2 -m megalign.cli.train \
  --config "$RUN/ar/megalign.yaml" --config examples/configs/smollm2.yaml \
  --config examples/configs/smollm2_sft.yaml model.student_checkpoint="$RUN/checkpoints" \
  logging.run_dir="$SFT" checkpoint.save="$SFT/checkpoints" "$@"
# one held-out instruction (Revelation 22, after the training split), in the chat template
"$PY" - "$RUN/ar/tokenizer" > "$SFT/prompts.jsonl" <<'PROMPT'
import json, sys
from transformers import AutoTokenizer
messages = [{"role": "user", "content": "Continue this passage from the King James Bible:\n"
             "And he shewed me a pure river of water of life, clear as crystal, proceeding out of "
             "the throne of God and of the Lamb."}]
text = AutoTokenizer.from_pretrained(sys.argv[1]).apply_chat_template(
    messages, tokenize=False, add_generation_prompt=True)
print(json.dumps({"prompt": text}))
PROMPT
for student in "$RUN/checkpoints" "$SFT/checkpoints"; do
  echo "> $student"
  "$PY" -m megalign.cli.generate --checkpoint "$student" --gen-length "${GEN_LENGTH:-32}" \
    --prompt-file "$SFT/prompts.jsonl"
done
