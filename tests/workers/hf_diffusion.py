"""An exported diffusion model used with transformers alone: megalign cannot be imported here.

Reads a JSON job (--job): the export directory, the dtype to load it in (default float32),
optionally tokens to score, prompts and decoding option sets; writes the logits (.pt) and, per
option set, the tokens diffusion_generate returns for each prompt alone and for all prompts as
one left-padded batch."""

import argparse
import json
import sys

sys.modules["megalign"] = None  # any import of megalign fails: the export must stand alone

import torch  # noqa: E402
from transformers import AutoModel  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--job", required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()
with open(args.job, encoding="utf-8") as handle:
    job = json.load(handle)
dtype = getattr(torch, job.get("dtype", "float32"))
model = AutoModel.from_pretrained(job["model"], trust_remote_code=True, dtype=dtype).eval()
assert all(p.dtype == dtype for p in model.parameters())
if job.get("tokens"):
    with torch.no_grad():
        logits = model(torch.load(job["tokens"])).logits.float()
    torch.save(logits, args.out + ".logits.pt")
report = {"module": type(model).__module__, "alone": [], "batched": []}
pad = model.config.pad_token_id
for options in job["options"]:
    new = options.pop("max_new_tokens")
    alone = [model.diffusion_generate(torch.tensor([p]), max_new_tokens=new, **options)[0, len(p):]
             .tolist() for p in job["prompts"]]
    longest = max(len(p) for p in job["prompts"])
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in job["prompts"]])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in job["prompts"]])
    batched = model.diffusion_generate(ids, attention_mask=mask, max_new_tokens=new, **options)
    report["alone"].append(alone)
    report["batched"].append(batched[:, longest:].tolist())
with open(args.out, "w", encoding="utf-8") as handle:
    json.dump(report, handle)
