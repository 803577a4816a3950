"""A Dream-format export read by a network megalign did not write: transformers' own Qwen2 layers
(Dream's network is Qwen2's) attending bidirectionally, loaded from the export's config.json and
safetensors; megalign cannot be imported here. Saves the logits of --tokens to --out, and with
--original (a Hugging Face Qwen2 directory) that model's bidirectional logits to --out.original."""

import argparse
import json
import os
import sys

sys.modules["megalign"] = None  # any import of megalign fails

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--export", required=True)
parser.add_argument("--tokens", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--original")
args = parser.parse_args()

with open(os.path.join(args.export, "config.json"), encoding="utf-8") as handle:
    dream = json.load(handle)
# Dream's keys are Qwen2's, but for the model's identity, the mask token and megalign's one key
qwen2 = {k: v for k, v in dream.items()
         if k not in ("architectures", "auto_map", "model_type", "mask_token_id",
                      "sample_vocab_size")}
model = Qwen2ForCausalLM(Qwen2Config(**qwen2)).eval()
missing, unexpected = model.load_state_dict(load_file(os.path.join(args.export,
                                                                   "model.safetensors")),
                                            strict=False)
tied = ["lm_head.weight"] if dream["tie_word_embeddings"] else []
assert missing == tied and not unexpected, (missing, unexpected)
tokens = torch.load(args.tokens)
everything = torch.ones(tokens.shape[0], 1, tokens.shape[1], tokens.shape[1], dtype=torch.bool)
with torch.no_grad():  # a 4-D mask is used as given: nothing blocked, no causal mask
    torch.save(model(tokens, attention_mask=everything).logits, args.out)
    if args.original:
        original = Qwen2ForCausalLM.from_pretrained(args.original).eval()
        torch.save(original(tokens, attention_mask=everything).logits, args.out + ".original")
