"""The cached and threshold sampler on a checkpoint, under the launched TP x PP layout: tokens of
each decoding mode, and (rank 0 of the last stage) checks of the key/value cache. --out JSON."""

import argparse
import json

import torch
import torch.distributed as dist

from megalign import distributed
from megalign.diffusion.decoding import SamplerConfig, Window, prepare
from megalign.diffusion.sampler import sample
from megalign.loading import load_student, open_checkpoint
from megalign.model.inference import CachedLogits, cache_layout, sampler_logits

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
opened = open_checkpoint(args.checkpoint, args.overrides)
chunks = load_student(opened)
vocab = opened.vocab
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
MODES = {
    "plain": {},
    "refresh_every_step": {"cache": True, "cache_refresh": 1},
    "cache": {"cache": True},
    "threshold": {"threshold": 0.02},
    "cache_threshold": {"cache": True, "threshold": 0.02},
    "cache_sampled": {"cache": True, "temperature": 0.8, "seed": 3},
    "dual_refresh_every_step": {"cache": True, "dual_cache": True, "cache_refresh": 1},
    "dual": {"cache": True, "dual_cache": True},
    "dual_threshold": {"cache": True, "dual_cache": True, "threshold": 0.02},
    "no_suffix": {"suffix": False},
    "no_suffix_refresh_every_step": {"suffix": False, "cache": True, "cache_refresh": 1},
    # block-causal decoding (a block-diffusion student's): the cache of the clean blocks is exact
    "block": {"suffix": False, "attention": "block_causal"},
    "block_cache": {"suffix": False, "attention": "block_causal", "cache": True},
    "block_cache_sampled": {"suffix": False, "attention": "block_causal", "cache": True,
                            "temperature": 0.8, "seed": 3},
    "block_sampled": {"suffix": False, "attention": "block_causal", "temperature": 0.8, "seed": 3},
}
report = {"tokens": {}}
for name, options in MODES.items():
    cfg = SamplerConfig(gen_length=16, block_length=8, **options)
    logits_fn = sampler_logits(chunks, cfg.cache, cfg.dual_cache)
    report["tokens"][name] = sample(logits_fn, PROMPTS, vocab, cfg)

# after a refresh, a window run on the same tokens reads the cache for the positions before it:
# its logits equal the full run's; and the cached keys and values equal a fresh full run's
tokens, start, mask = prepare(PROMPTS, SamplerConfig(gen_length=16), vocab.mask, vocab.pad)
cached = CachedLogits(chunks)
full = cached(tokens, mask, Window(0, tokens.shape[1], True)).logits
window = cached(tokens, mask, Window(start - 1, tokens.shape[1], False)).logits
fresh = CachedLogits(chunks)
fresh(tokens, mask, Window(0, tokens.shape[1], True))
if full is not None:
    report["window_max_diff"] = float((window - full[:, start - 1:]).abs().max())
report["kv_equal"] = all(
    torch.equal(cached.context.key_value_memory_dict[layer][kind][: start - 1],
                fresh.context.key_value_memory_dict[layer][kind][: start - 1])
    for layer in fresh.context.key_value_memory_dict for kind in (0, 1))

# the dual cache holds the positions before the window, after it, then the window (its rotary
# angles follow the positions): the refresh's and a window run's logits equal the full run's, and
# each slot's keys and values equal a full run's at the position it holds (up to summation order)
first, stop = start - 1, start + 8
dual = CachedLogits(chunks, dual=True)
refreshed = dual(tokens, mask, Window(first, stop, True))
rerun = dual(tokens, mask, Window(first, stop, False))
if full is not None:
    report["dual_first_position"] = [refreshed.first_position, rerun.first_position]
    report["dual_max_diff"] = max(float((shard.logits - full[:, first:stop]).abs().max())
                                  for shard in (refreshed, rerun))
layout = cache_layout(first, stop, tokens.shape[1])
report["dual_kv_max_diff"] = max(
    float((dual.context.key_value_memory_dict[layer][kind]
           - fresh.context.key_value_memory_dict[layer][kind][layout]).abs().max())
    for layer in fresh.context.key_value_memory_dict for kind in (0, 1))

# the student in bfloat16 (``megalign-generate --bf16``): its logits follow float32's
half = load_student(opened, torch.bfloat16)
report["bf16_weights"] = all(p.dtype == torch.bfloat16 for p in half[0].parameters())
half_logits = CachedLogits(half)(tokens, mask, Window(0, tokens.shape[1], True)).logits
if full is not None:
    report["bf16_max_diff"] = float((half_logits - full).abs().max())
    report["logits_max"] = float(full.abs().max())
reports = [None] * dist.get_world_size()
dist.all_gather_object(reports, report)
if dist.get_rank() == 0:
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(reports, handle)
distributed.shutdown()
