"""The diffusion student's logits of a megalign checkpoint on given tokens (one process, full
bidirectional attention over each row), saved to --out. Loaded as megalign-generate loads it."""

import argparse

import torch

from megalign import distributed
from megalign.evaluation.heldout import full_logits_fn
from megalign.loading import load_student, open_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--tokens", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--bf16", action="store_true", help="the student in bfloat16 (as --bf16)")
args = parser.parse_args()
opened = open_checkpoint(args.checkpoint, [])
tokens = torch.load(args.tokens)
positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
nothing_blocked = torch.zeros(tokens.shape[0], 1, tokens.shape[1], tokens.shape[1],
                              dtype=torch.bool)
student = load_student(opened, torch.bfloat16 if args.bf16 else torch.float32)
logits = full_logits_fn(student, opened.vocab.size)(tokens, positions, nothing_blocked)
torch.save(logits, args.out)
distributed.shutdown()
