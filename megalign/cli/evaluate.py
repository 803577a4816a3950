"""megalign-eval: held-out likelihood bounds for a diffusion student and its AR teacher.

    megalign-eval --checkpoint RUN/checkpoints --data PREFIX [--samples 32] [--t-grid 8] [--ar]

Diffusion: the negative ELBO per token, ``E_t[(1/t) sum_{masked} CE] / positions``, estimated on a
fixed midpoint grid of ``--t-grid`` noise levels (t_k = (k + 1/2) / K) with masks drawn from
(seed, sample index, k): deterministic, the same for any layout, and per level exactly the
training loss with ``diffusion.loss_weighting=inv_t`` on that mask. ``exp(NELBO)`` bounds the
perplexity from above. ``--infill-span M`` masks the middle M tokens of each sample and reports
how often the sampler restores them exactly (and per token) from the prefix and suffix. With
``--ar``, the AR model the run started from is scored with ordinary next-token perplexity on the
same samples. ``--generate N`` continues the first ``--prompt-length`` tokens of N held-out
samples with the sampler's default decoding and reports generative perplexity under that AR model
with the share of distinct and of punctuation tokens (megalign/evaluation/generation.py). Samples
come from the validation split of ``--data`` (or of the checkpoint's ``data.paths``) under the
checkpoint's ``data.split``.
"""

# Imports inside functions are deliberate here: a command parses its arguments before importing
# torch and Megatron-Core (fast --help and usage errors).

from __future__ import annotations

import argparse
import math
import sys

from megalign.cli.common import ArgumentParser, print_result, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="megalign-eval", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", nargs="+", help="dataset prefix(es); default: data.paths")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--t-grid", type=int, default=8)
    parser.add_argument("--infill-span", type=int, default=0,
                        help="also measure infilling of this many middle tokens (0: off)")
    parser.add_argument("--infill-steps", type=int, default=0, help="default: the span")
    parser.add_argument("--ar", action="store_true", help="also score the AR teacher")
    parser.add_argument("--generate", type=int, default=0, metavar="N",
                        help="also continue N held-out prompts with the sampler's defaults and "
                             "report generative perplexity under the AR teacher (0: off)")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--threshold", type=float, help="--generate with parallel decoding")
    parser.add_argument("--cache", action="store_true", help="--generate with the block cache")
    parser.add_argument("--dual-cache", action="store_true",
                        help="--generate with the block cache of the prompt, finished blocks and "
                             "the masked positions after the block")
    parser.add_argument("--no-suffix", action="store_true",
                        help="--generate without the masked positions after the current block")
    parser.add_argument("--output", help="write the JSON result here too")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.*=N")
    return parser


def evaluate(args) -> None:
    from megalign import distributed
    from megalign.diffusion.decoding import SamplerConfig
    from megalign.diffusion.objective import MaskedDiffusion
    from megalign.diffusion.sampler import for_model
    from megalign.evaluation.generation import student_generation_quality
    from megalign.evaluation.heldout import (
        ar_nll,
        diffusion_nelbo,
        full_logits_fn,
        heldout_batches,
        infilling,
    )
    from megalign.loading import load_ar_model, load_student, open_checkpoint

    opened = open_checkpoint(args.checkpoint, args.overrides)
    path, cfg, tokenizer, vocab = opened.path, opened.cfg, opened.tokenizer, opened.vocab
    student = load_student(opened)
    objective = MaskedDiffusion.of(cfg)
    batches = heldout_batches(args.data or cfg.data.paths, cfg.data.split, tokenizer,
                              cfg.model.seq_length, cfg.evaluation.seed, args.samples,
                              args.batch_size, f"{path}.eval_cache", cfg.model.document_attention,
                              loss_mask=cfg.data.sft and not args.data)
    student_fn = full_logits_fn(student, vocab.size)
    nelbo = diffusion_nelbo(student_fn, batches, objective, vocab, args.t_grid,
                            cfg.evaluation.seed)
    result = {"checkpoint": path, "samples": len(batches) * args.batch_size,
              "t_grid": args.t_grid, "diffusion_nelbo_per_token": nelbo.value,
              "diffusion_nelbo_se": nelbo.se,
              "perplexity_upper_bound": math.exp(min(nelbo.value, 700)),
              "positions": int(sum(nelbo.counts))}
    if args.infill_span:
        exact, accuracy = infilling(student_fn, batches, objective, vocab, args.infill_span,
                                    args.infill_steps or args.infill_span)
        result.update(infill_span=args.infill_span, infill_exact_match=exact.value,
                      infill_token_accuracy=accuracy.value)
    if args.ar or args.generate:
        ar_fn = full_logits_fn(load_ar_model(cfg, opened.meta, path, vocab.padded), vocab.size)
    if args.ar:
        nll, _ = ar_nll(ar_fn, batches)
        result.update(ar_nll_per_token=nll, ar_perplexity=math.exp(min(nll, 700)))
    if args.generate:
        sampler = for_model(cfg, SamplerConfig(
            gen_length=args.gen_length, eos_id=vocab.eod, threshold=args.threshold,
            cache=args.cache or args.dual_cache, dual_cache=args.dual_cache,
            suffix=not args.no_suffix))
        sampler.check()
        result.update(student_generation_quality(
            student, ar_fn, batches, args.generate, args.prompt_length, sampler, vocab,
            tokenizer))
    if distributed.launch_env().rank == 0:
        print_result(result, args.output)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("megalign-eval", lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
