"""megalign-generate: sample from a trained diffusion student.

    megalign-generate --checkpoint RUN/checkpoints --prompt "In the beginning" [--gen-length 32]
    torchrun --nproc-per-node 2 -m megalign.generate --checkpoint ... parallel.pipeline_model_parallel_size=2

The checkpoint (a root with ``latest`` or an ``iter_`` directory) records its config, tokenizer
included; it is loaded into the layout this command is launched with (one process: TP=1, PP=1,
resharded by dist_checkpointing). Trailing ``key=value`` arguments override the stored config.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    from megalign import distributed
    from megalign.checkpoint import CheckpointError, load_checkpoint, read_meta, resolve
    from megalign.config import ConfigError, config_from_dict, mask_token_id, padded_vocab_size
    from megalign.config import parse_override
    from megalign.data.tokenizer import build_tokenizer
    from megalign.diffusion.sampler import SamplerConfig, generate
    from megalign.model.gpt import build_chunks

    parser = argparse.ArgumentParser(prog="megalign-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        path = resolve(args.checkpoint)
        tree = read_meta(path).get("config")
        if tree is None:
            raise CheckpointError(f"checkpoint '{path}' records no config")
        tree.setdefault("parallel", {}).update(
            tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
            virtual_pipeline_model_parallel_size=None, sequence_parallel=False)
        tree["model"]["document_attention"] = False  # one sequence: plain bidirectional
        for text in args.overrides:
            key, value = parse_override(text)
            node = tree
            for part in key.split(".")[:-1]:
                node = node.setdefault(part, {})
            node[key.split(".")[-1]] = value
        cfg = config_from_dict(tree)
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        launch = distributed.launch_env()
        distributed.initialize(launch, cfg.parallel.tensor_model_parallel_size,
                               cfg.parallel.pipeline_model_parallel_size, cfg.seed)
        vocab = padded_vocab_size(cfg, tokenizer.vocab_size, tokenizer.mask)
        mask = mask_token_id(cfg, tokenizer.vocab_size, tokenizer.mask)
        chunks = build_chunks(cfg, vocab, causal=False, params_dtype=torch.float32)
        load_checkpoint(path, chunks)
        sampler = SamplerConfig(args.gen_length, args.steps, args.temperature, args.seed)
        for prompt in args.prompt:
            ids = tokenizer.encode(prompt)
            if len(ids) + args.gen_length > cfg.model.seq_length:
                raise ConfigError(
                    f"prompt ({len(ids)} tokens) + --gen-length {args.gen_length} exceeds the "
                    f"model's context of {cfg.model.seq_length} tokens"
                )
            out = generate(chunks, ids, mask, tokenizer.vocab_size, cfg.diffusion.shift, sampler)
            if launch.rank == 0:
                print(json.dumps({"prompt": prompt, "completion": tokenizer.decode(out)}), flush=True)
    except (CheckpointError, ConfigError, ValueError, OSError) as err:
        print(f"megalign-generate: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
