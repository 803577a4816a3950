"""The sampler on vocab-parallel shards (2 processes, gloo): split over TP, and held by one
pipeline stage only, against the full-vocabulary run on one rank. Writes a JSON report to --out."""

import argparse
import itertools
import json

import torch
import torch.distributed as dist

from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.decoding import SamplerConfig
from megalign.diffusion.sampler import sample
from megalign.model.vocab_shard import VocabShard

WIDTH, VOCAB, MASK, PAD = 64, 50, 60, 0
VOCABULARY = Vocabulary(size=VOCAB, padded=WIDTH, mask=MASK, eod=1, pad=PAD)
PROMPTS = [[5, 6], [7, 8, 9]]

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()
dist.init_process_group("gloo")
rank = dist.get_rank()


def scripted(layout):
    """Fixed random logits per call, as one model would give them, cut as ``layout`` holds them."""
    generator = torch.Generator().manual_seed(1)

    def logits_fn(tokens, _mask, _window):
        full = torch.randn(*tokens.shape, WIDTH, generator=generator) * 3
        full[..., 40] = full[..., 7]  # an exact tie across the two halves of the vocabulary
        if layout == "full":
            return full
        if layout == "tp2":
            half = WIDTH // 2
            return VocabShard(full[..., rank * half : (rank + 1) * half], offset=rank * half,
                              tp_group=dist.group.WORLD)
        return VocabShard(full if rank == 1 else None, pp_group=dist.group.WORLD, pp_src=1)

    return logits_fn


report = {"cases": 0, "mismatches": []}
for temperature, top_k, top_p, confidence, rule in itertools.product(
        [0.0, 0.8], [0, 3, 40], [1.0, 0.6], ["prob", "margin", "entropy"],
        ["confidence", "origin", "p2"]):
    cfg = dict(gen_length=8, steps=4, temperature=temperature, top_k=top_k, top_p=top_p,
               confidence=confidence, unmasking=rule, seed=5)
    reference = sample(scripted("full"), PROMPTS, VOCABULARY, SamplerConfig(**cfg))
    for layout in ("tp2", "pp2"):
        got = sample(scripted(layout), PROMPTS, VOCABULARY, SamplerConfig(**cfg))
        if got != reference:
            report["mismatches"].append({"layout": layout, **cfg})
    report["cases"] += 1
if rank == 0:
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle)
dist.destroy_process_group()
