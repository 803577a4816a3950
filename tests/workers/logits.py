"""Causal-model logits of a megalign checkpoint under the launched TP/PP layout (--out .pt)."""

import argparse

import torch

from megalign import distributed
from megalign.checkpoint import load_checkpoint
from megalign.config import load_config
from megalign.model.gpt import build_chunks
from megalign.model.inference import forward_logits

parser = argparse.ArgumentParser()
parser.add_argument("--config", action="append", required=True)
parser.add_argument("--tokens", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
cfg = load_config(args.config, [*args.overrides, "model.document_attention=false"])
distributed.initialize(distributed.launch_env(), cfg.parallel.tensor_model_parallel_size,
                       cfg.parallel.pipeline_model_parallel_size, cfg.seed)
chunks = build_chunks(cfg, cfg.model.padded_vocab_size, causal=True, params_dtype=torch.float32)
load_checkpoint(cfg.model.init_checkpoint, chunks)
tokens = torch.load(args.tokens)
positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
logits = forward_logits(chunks, tokens, positions, None)
if torch.distributed.get_rank() == 0:
    torch.save(logits, args.out)
distributed.shutdown()
