"""The lm-eval adapter on a checkpoint, in one process: two full harness runs through the CLI, one
loglikelihood recomputed from the ELBO formula, and generate_until's stop strings. --out JSON."""

import argparse
import json
import zlib

import torch
from lm_eval.api.instance import Instance

from megalign import distributed
from megalign.cli.harness import main as harness_main
from megalign.diffusion.masking import masks_at
from megalign.harness import MegalignLM
from megalign.model.attention import attention_mask, document_ids

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--tasks", required=True)
parser.add_argument("--include_path", required=True)
parser.add_argument("--out", required=True)
args = parser.parse_args()
report = {"runs": []}
for run in range(2):
    path = f"{args.out}.run{run}.json"
    assert harness_main(["--checkpoint", args.checkpoint, "--tasks", args.tasks, "--include_path",
                         args.include_path, "--model_args", "mc_samples=4,steps=4",
                         "--output", path]) == 0
    with open(path, encoding="utf-8") as handle:
        report["runs"].append(json.load(handle)["results"])

samples = 4
lm = MegalignLM(checkpoint=args.checkpoint, mc_samples=samples, seed=3)
context, continuation = "And God said, Let there be light", " and there was light"
[(score, _greedy)] = lm.loglikelihood(
    [Instance("loglikelihood", {}, (context, continuation), 0)])
ctx_ids, cont_ids = lm._encode_pair(context, continuation)
# the documented estimator, written out: mask continuation tokens at t_k, CE/t_k of each masked
# token read (AR shift) from the position before it, averaged over the K levels
index = torch.tensor([zlib.crc32(json.dumps([ctx_ids, cont_ids]).encode())])
clean = torch.tensor(ctx_ids + cont_ids)
nelbo = 0.0
for k in range(samples):
    t = (k + 0.5) / samples
    hidden = masks_at(index, len(cont_ids), 3, t, k)[0]
    noisy = clean.clone()
    noisy[len(ctx_ids):][hidden] = lm.opened.vocab.mask
    blocked = attention_mask(document_ids(clean.unsqueeze(0), lm.tokenizer.eod), causal=False)
    logp = lm.logits(noisy.unsqueeze(0), blocked)[0].log_softmax(-1)
    for j in hidden.nonzero().flatten().tolist():
        position = len(ctx_ids) + j
        nelbo += -float(logp[position - 1, clean[position]]) / t / samples
report["loglikelihood"] = score
# a request's masks depend on its tokens only, not on its place in the list
report["loglikelihood_second_in_list"] = lm.loglikelihood(
    [Instance("loglikelihood", {}, ("The LORD is my", " shepherd"), 0),
     Instance("loglikelihood", {}, (context, continuation), 1)])[1][0]
report["formula"] = -nelbo
report["masked_fraction"] = float(torch.cat([masks_at(index, len(cont_ids), 3,
                                                      (k + 0.5) / samples, k)
                                             for k in range(samples)]).float().mean())

prompt = "In the beginning"
free = lm.generate_until([Instance("generate_until", {},
                                   (prompt, {"until": [], "max_gen_toks": 16}), 0)])[0]
stop = free[len(free) // 2 : len(free) // 2 + 2]
stopped = lm.generate_until([Instance("generate_until", {},
                                      (prompt, {"until": [stop], "max_gen_toks": 16}), 0)])[0]
report.update(free=free, stop=stop, stopped=stopped)
# the adapter decodes with the sampler's defaults unless model_args set steps / block_length
sampler, _ = lm._sampler({"max_gen_toks": 32})
report["default_decoding"] = [sampler.gen_length, sampler.steps, sampler.block_length]
fast = MegalignLM(checkpoint=args.checkpoint, threshold="0.5", dual_cache="true")
sampler, _ = fast._sampler({"max_gen_toks": 16})
report["fast_decoding"] = [sampler.threshold, sampler.cache, sampler.dual_cache]
report["fast_free"] = fast.generate_until(
    [Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 16}), 0)])[0]
try:
    lm.loglikelihood([Instance("loglikelihood", {}, ("", " light"), 0)])
except ValueError as err:
    report["empty_context_error"] = str(err)
distributed.shutdown()
with open(args.out, "w", encoding="utf-8") as handle:
    json.dump(report, handle)
