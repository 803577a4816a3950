"""An exported diffusion model used with transformers alone: megalign cannot be imported here.

Reads a JSON job (--job): the export directory, the dtype to load it in (default float32),
optionally tokens to score, prompts and decoding option sets; writes the logits (.pt) and, per
option set, the tokens diffusion_generate returns for each prompt alone and for all prompts as
one left-padded batch. ``dual_window`` [first, stop]: also that window's logits from the dual
cache (.window.pt), computed as tests/workers/student_logits.py --dual-window computes them."""

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
if job.get("dual_window"):
    exported = sys.modules[type(model).__module__]  # the modeling file and its decoding rules
    first, stop = job["dual_window"]
    tokens = torch.load(job["window_tokens"])
    nothing_blocked = torch.zeros(tokens.shape[0], 1, tokens.shape[1], tokens.shape[1],
                                  dtype=torch.bool)
    source = model._logits_source(exported.SamplerConfig(cache=True, dual_cache=True))
    with torch.no_grad():
        source(tokens, nothing_blocked, exported.Window(first, stop, refresh=True))
        changed = tokens.clone()
        changed[:, first] = tokens[:, first + 1]
        window = source(changed, nothing_blocked, exported.Window(first, stop, refresh=False))
    torch.save(window.logits.float(), args.out + ".window.pt")
report = {"module": type(model).__module__, "alone": [], "batched": []}
pad = model.config.pad_token_id
for options in job["options"]:
    new = options.pop("max_new_tokens")
    def generate(ids, **extra):  # a Dream export returns an output holding the sequences
        result = model.diffusion_generate(ids, max_new_tokens=new, **options, **extra)
        return getattr(result, "sequences", result)

    alone = [generate(torch.tensor([p]))[0, len(p):].tolist() for p in job["prompts"]]
    longest = max(len(p) for p in job["prompts"])
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in job["prompts"]])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in job["prompts"]])
    batched = generate(ids, attention_mask=mask)
    report["alone"].append(alone)
    report["batched"].append(batched[:, longest:].tolist())
with open(args.out, "w", encoding="utf-8") as handle:
    json.dump(report, handle)
