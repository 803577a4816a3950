"""megalign-generate: sample from a trained diffusion student (and, with --ar, its AR teacher).

    megalign-generate --checkpoint RUN/checkpoints --prompt "In the beginning" [--gen-length 32]
    torchrun --nproc-per-node 2 -m megalign.cli.generate --checkpoint ... \\
        --prompt-file prompts.txt parallel.pipeline_model_parallel_size=2

Decoding defaults to what diffusion LMs are decoded with in practice: semi-autoregressive blocks
of 8 tokens, one token committed per step (``--steps`` = ``--gen-length``), greedy. The
checkpoint (a root with ``latest``, an ``iter_`` directory, or a model converted by
megalign-convert: the step-0 student) records its config, tokenizer included; it is resharded
into the layout this command is launched with (one process: TP=1, PP=1; under torchrun any
TP/PP, via trailing ``parallel.*=N`` overrides). Prompts come from ``--prompt`` (repeatable) or
``--prompt-file`` (one per line, or JSONL with a "prompt" key); all are decoded as one batch.
Output: one JSON line per prompt on stdout, or ``--output FILE``. Each line holds the prompt,
the completion (cut at EOS) and ``completion_ids``, the generated token ids as decoded
(EOS-filled after a stop). ``--ar`` also decodes each prompt with the AR model the run started
from (greedy, or sampled with ``--temperature``), side by side.
"""

# Imports inside functions are deliberate here: a command parses its arguments before importing
# torch and Megatron-Core (fast --help and usage errors).

from __future__ import annotations

import argparse
import json
import sys

from megalign.cli.common import ArgumentParser, run_command


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    try:
                        line = json.loads(line)["prompt"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{args.prompt_file}:{number}: "
                                         f"expected {{\"prompt\": ...}}") from None
                prompts.append(line)
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompt-file FILE")
    return prompts


def build_parser() -> argparse.ArgumentParser:
    from megalign.diffusion.decoding import CONFIDENCES, DEFAULT_BLOCK_LENGTH, RULES, SamplerConfig

    parser = ArgumentParser(prog="megalign-generate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", action="append")
    parser.add_argument("--prompt-file")
    parser.add_argument("--output", help="write JSON lines here instead of stdout")
    parser.add_argument("--gen-length", type=int, default=SamplerConfig.gen_length)
    parser.add_argument("--steps", type=int,
                        help="denoising steps in all (default: --gen-length, one token per step)")
    parser.add_argument("--block-length", type=int,
                        help=f"semi-autoregressive block size (default: {DEFAULT_BLOCK_LENGTH} "
                             "when it divides --gen-length, else the whole length)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--confidence", choices=CONFIDENCES, default=SamplerConfig.confidence)
    parser.add_argument("--unmasking", choices=RULES, default=SamplerConfig.unmasking)
    parser.add_argument("--no-eos-stop", action="store_true", help="do not stop at the EOD token")
    parser.add_argument("--threshold", type=float,
                        help="commit every masked position of the block whose confidence reaches "
                             "this, at least one per step (parallel decoding; --steps unused)")
    parser.add_argument("--cache", action="store_true",
                        help="keep the keys and values of the prompt and finished blocks")
    parser.add_argument("--dual-cache", action="store_true",
                        help="--cache, and also keep the masked positions after the current block "
                             "(Fast-dLLM's dual cache): a step computes the block only")
    parser.add_argument("--cache-refresh", type=int, default=0, metavar="N",
                        help="with --cache, also recompute them every N steps (1: exact)")
    parser.add_argument("--no-suffix", action="store_true",
                        help="leave the masked positions after the current block out of the input "
                             "(as block-diffusion students decode; with --cache: the block alone)")
    parser.add_argument("--bf16", action="store_true",
                        help="run the student in bfloat16 "
                             "(each step reads half the weights' bytes)")
    parser.add_argument("--ar", action="store_true", help="also decode with the AR teacher")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.*=N")
    return parser


def sampler_config(args, eos_id):
    """The sampler settings of parsed arguments (unset ones take the sampler's defaults)."""
    from megalign.diffusion.decoding import SamplerConfig

    return SamplerConfig(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        confidence=args.confidence, unmasking=args.unmasking,
        eos_id=None if args.no_eos_stop else eos_id, seed=args.seed, threshold=args.threshold,
        cache=args.cache or args.dual_cache, cache_refresh=args.cache_refresh,
        suffix=not args.no_suffix, dual_cache=args.dual_cache)


def generate(args) -> None:
    import torch

    from megalign import distributed
    from megalign.diffusion.decoding import until_eos
    from megalign.diffusion.sampler import for_model, sample
    from megalign.errors import ConfigError
    from megalign.loading import load_ar_model, load_student, open_checkpoint
    from megalign.model.inference import ar_decode, sampler_logits

    prompts = read_prompts(args)
    opened = open_checkpoint(args.checkpoint, args.overrides)
    cfg, tokenizer = opened.cfg, opened.tokenizer
    encoded = [tokenizer.encode(p) for p in prompts]
    longest = max(len(ids) for ids in encoded)
    if longest + args.gen_length > cfg.model.seq_length:
        raise ConfigError(
            f"the longest prompt ({longest} tokens) + --gen-length {args.gen_length} exceeds "
            f"the model's context of {cfg.model.seq_length} tokens"
        )
    sampler = for_model(cfg, sampler_config(args, tokenizer.eod))
    sampler.check()
    chunks = load_student(opened, torch.bfloat16 if args.bf16 else torch.float32)
    logits_fn = sampler_logits(chunks, sampler.cache, sampler.dual_cache)
    outputs = sample(logits_fn, encoded, opened.vocab, sampler)
    records = [{"prompt": p, "completion": tokenizer.decode(until_eos(o, sampler.eos_id)),
                "completion_ids": o} for p, o in zip(prompts, outputs)]
    if args.ar:
        causal = load_ar_model(cfg, opened.meta, opened.path, opened.vocab.padded)
        for record, ids in zip(records, encoded):
            ar = ar_decode(causal, ids, args.gen_length, tokenizer.vocab_size, args.temperature,
                           args.seed)
            record["ar_completion"] = tokenizer.decode(until_eos(ar, sampler.eos_id))
    if distributed.launch_env().rank == 0:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                handle.write(lines)
        else:
            sys.stdout.write(lines)
            sys.stdout.flush()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("megalign-generate", lambda: generate(args))


if __name__ == "__main__":
    sys.exit(main())
