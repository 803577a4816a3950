"""Load an AR checkpoint on one process, put a NaN into one parameter and try to save it."""

import json

import torch

from megalign import distributed
from megalign.checkpoint import load_checkpoint, save_weights
from megalign.errors import CheckpointError
from megalign.model.gpt import ModelBuild, build_chunks

from common import arguments, config_and_tokenizer, start_one_process

args = arguments("checkpoint")
cfg, tok = config_and_tokenizer(args, one_process=True)
vocab = start_one_process(cfg, tok)
chunks = build_chunks(ModelBuild.of(cfg, causal=False, params_dtype=torch.float32), vocab.padded)
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
