"""The diffusion student's logits of a megalign checkpoint on given tokens (one process, full
bidirectional attention over each row), saved to --out. Loaded as megalign-generate loads it.
``--dual-window FIRST STOP``: instead, the logits of that window from the dual cache (a refresh
on the tokens, then the window alone with its first token changed), as the sampler computes
them with ``--dual-cache``."""

import argparse

import torch

from megalign import distributed
from megalign.diffusion.decoding import Window
from megalign.evaluation.heldout import full_logits_fn
from megalign.loading import load_student, open_checkpoint
from megalign.model.inference import CachedLogits

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--tokens", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--bf16", action="store_true", help="the student in bfloat16 (as --bf16)")
parser.add_argument("--dual-window", type=int, nargs=2)
args = parser.parse_args()
opened = open_checkpoint(args.checkpoint, [])
tokens = torch.load(args.tokens)
positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
nothing_blocked = torch.zeros(tokens.shape[0], 1, tokens.shape[1], tokens.shape[1],
                              dtype=torch.bool)
student = load_student(opened, torch.bfloat16 if args.bf16 else torch.float32)
if args.dual_window:
    first, stop = args.dual_window
    cached = CachedLogits(student, dual=True)
    cached(tokens, nothing_blocked, Window(first, stop, refresh=True))
    changed = tokens.clone()
    changed[:, first] = tokens[:, first + 1]
    logits = cached(changed, nothing_blocked, Window(first, stop, refresh=False)).logits
else:
    logits = full_logits_fn(student, opened.vocab.size)(tokens, positions, nothing_blocked)
torch.save(logits, args.out)
distributed.shutdown()
