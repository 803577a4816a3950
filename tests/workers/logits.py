"""Causal-model logits of a megalign checkpoint under the launched TP/PP layout (--out .pt);
``--greedy N``: also the greedy continuation of the first row's first 8 tokens (megalign's AR
decoding), saved as {"logits", "greedy"}."""


import torch

from megalign import distributed
from megalign.checkpoint import load_checkpoint
from megalign.model.gpt import ModelBuild, build_chunks
from megalign.model.inference import ar_decode, forward_logits

from common import arguments, config_and_tokenizer

args = arguments("tokens", greedy=0)
cfg, _ = config_and_tokenizer(args, extra=["model.document_attention=false"], tokenizer=False)
distributed.initialize(distributed.launch_env(), cfg.parallel.tensor_model_parallel_size,
                       cfg.parallel.pipeline_model_parallel_size, cfg.seed,
                       expert_parallel=cfg.parallel.expert_model_parallel_size)
chunks = build_chunks(ModelBuild.of(cfg, causal=True, params_dtype=torch.float32),
                      cfg.model.padded_vocab_size)
load_checkpoint(cfg.model.init_checkpoint, chunks)
tokens = torch.load(args.tokens)
positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
logits = forward_logits(chunks, tokens, positions, None)
if args.greedy:
    greedy = ar_decode(chunks, tokens[0, :8].tolist(), args.greedy, cfg.model.padded_vocab_size,
                       temperature=0.0, seed=0)
    logits = {"logits": logits, "greedy": greedy}
if torch.distributed.get_rank() == 0:
    torch.save(logits, args.out)
distributed.shutdown()
