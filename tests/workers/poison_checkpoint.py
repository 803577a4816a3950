"""Load an AR checkpoint on one process, put a NaN into one parameter and try to save it."""

import argparse
import json

import torch

from megalign import distributed
from megalign.checkpoint import load_checkpoint, save_weights
from megalign.errors import CheckpointError
from megalign.config import load_config, padded_vocab_size
from megalign.data.tokenizer import build_tokenizer
from megalign.model.gpt import build_chunks

parser = argparse.ArgumentParser()
parser.add_argument("--config", required=True)
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args()
cfg = load_config(args.config, [*args.overrides, "parallel.tensor_model_parallel_size=1",
                                "parallel.pipeline_model_parallel_size=1"])
tok = build_tokenizer(cfg.data.tokenizer)
distributed.initialize(distributed.launch_env(), 1, 1, cfg.seed)
chunks = build_chunks(cfg, padded_vocab_size(cfg, tok.vocab_size, tok.mask), False, torch.float32)
load_checkpoint(args.checkpoint, chunks)
with torch.no_grad():
    next(chunks[0].parameters())[0, 0] = float("nan")
try:
    save_weights(args.out + "/ckpt/iter_0000001", chunks)
    outcome = "written"
except CheckpointError as err:
    outcome = str(err)
with open(args.out + "/result.json", "w") as handle:
    json.dump({"outcome": outcome}, handle)
distributed.shutdown()
