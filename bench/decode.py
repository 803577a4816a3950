"""Fast diffusion decoding, measured side by side: plain, threshold, caches, bfloat16.

    python bench/decode.py [--checkpoint runs/smollm2/checkpoints] [--gen-length 64]
                           [--threshold 0.9] [--prompts 8] [--threads 2] [--modes ...]

Decodes the same prompts (one at a time, greedy, blocks of 8) with the plain sampler (one token per
step), the confidence-threshold rule, the key/value cache of the prompt and finished blocks, the
dual cache (also the masked positions after the block), the dual cache with the threshold, the
cache without the masked positions after the block (``--no-suffix``), and the plain sampler and the
dual cache with the student's weights in bfloat16, on one process, and prints for each: tokens per
second (and the speed-up over the plain sampler in float32 and in the same precision), model
forward passes and positions computed per generated token, generative perplexity of the
continuations under the AR model the run started from (float32, with the share of distinct tokens),
and agreement with the plain sampler's tokens (with ``--modes``: the first mode's). Then the
transformers export of the same checkpoint (``--export``, default the main job's ``hf`` directory;
exported to a temporary directory when absent) decodes the same prompts with ``diffusion_generate``
in five of the modes, side by side with megalign-generate's: its speed relative to megalign's same
mode and the share of its tokens equal to megalign's. The checkpoint defaults to the main job's
(``bash examples/quickstart.sh`` makes it). Writes ``bench/results/decode/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "In the beginning God created", "And the LORD said unto Moses,", "The LORD is my shepherd;",
    "Blessed are the poor in spirit:", "And it came to pass, when the king", "For God so loved",
    "Then Jesus said unto his disciples,", "Hear, O Israel: The LORD our God",
    "And the children of Israel went", "Thus saith the LORD of hosts,", "Let there be light",
    "And David said to Saul,",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/smollm2/checkpoints")
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--export", help="the checkpoint's transformers export (default: the "
                                         "directory 'hf' beside the checkpoints)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="decode only these (speed-ups need 'plain' and 'plain, bf16')")
    parser.add_argument("--out", default="bench/results/decode")
    return parser.parse_args(argv)


def fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


class Counted:
    """A logits source that counts its calls and the positions it computes."""

    def __init__(self, source):
        self.source, self.calls, self.positions = source, 0, 0

    def __call__(self, tokens, mask, window):
        shard = self.source(tokens, mask, window)
        self.calls += 1
        computed = tokens.shape[1] if window.refresh else shard.logits.shape[1]
        self.positions += tokens.shape[0] * computed
        return shard


MODES = ("plain", "threshold", "cache", "dual cache", "dual cache+threshold", "cache, no suffix",
         "plain, bf16", "dual cache, bf16", "dual cache+threshold, bf16")
EXPORT_MODES = ("plain", "dual cache", "dual cache+threshold", "plain, bf16", "dual cache, bf16")


def export_modes(args, modes: dict, prompts: list, results: dict, outputs_of: dict) -> dict:
    """``EXPORT_MODES`` decoded by the transformers export, one prompt at a time."""
    import tempfile

    import torch
    from transformers import AutoModel

    from megalign.convert.checkpoints import megalign_to_hf

    path = args.export or os.path.join(os.path.dirname(os.path.normpath(args.checkpoint)), "hf")
    temporary = None
    if not os.path.isfile(os.path.join(path, "modeling_megalign.py")):
        temporary = tempfile.TemporaryDirectory()
        path = megalign_to_hf(args.checkpoint, os.path.join(temporary.name, "hf"))
    models = {precision: AutoModel.from_pretrained(path, trust_remote_code=True,
                                                   dtype=dtype).eval()
              for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    exported = {}
    for name in (name for name in EXPORT_MODES if name in modes):
        precision, options = modes[name]
        keywords = {key: options[key] for key in ("cache", "dual_cache", "threshold", "suffix")
                    if key in options}
        outputs, seconds = [], 0.0
        for prompt in prompts:
            start = time.perf_counter()
            ids = models[precision].diffusion_generate(
                torch.tensor([prompt]), max_new_tokens=args.gen_length, eos_token_id=None,
                **keywords)
            seconds += time.perf_counter() - start
            outputs.append(ids[0, len(prompt):].tolist())
        generated = len(prompts) * args.gen_length
        same = sum(a == b for x, y in zip(outputs, outputs_of[name]) for a, b in zip(x, y))
        rate = generated / seconds
        exported[name] = {"precision": precision, "tokens_per_s": rate, "seconds": seconds,
                          "speed_vs_megalign": rate / results[name]["tokens_per_s"],
                          "agreement_with_megalign": same / generated}
    if temporary is not None:
        temporary.cleanup()
    return exported


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(REPO)
    if not os.path.isdir(args.checkpoint):
        sys.exit(f"bench/decode.py: {args.checkpoint} does not exist; run "
                 "`bash examples/quickstart.sh` first (or give --checkpoint)")
    import torch

    from megalign import distributed
    from megalign.diffusion.decoding import SamplerConfig, until_eos
    from megalign.diffusion.sampler import sample
    from megalign.evaluation.generation import continuation_nll, text_statistics
    from megalign.evaluation.heldout import full_logits_fn
    from megalign.loading import load_ar_model, load_student, open_checkpoint
    from megalign.model.inference import sampler_logits

    torch.set_num_threads(args.threads)
    opened = open_checkpoint(args.checkpoint, [])
    students = {"fp32": load_student(opened), "bf16": load_student(opened, torch.bfloat16)}
    vocab, tokenizer = opened.vocab, opened.tokenizer
    ar = full_logits_fn(load_ar_model(opened.cfg, opened.meta, opened.path, vocab.padded),
                        vocab.size)
    prompts = [tokenizer.encode(text) for text in PROMPTS[: args.prompts]]
    dual = {"cache": True, "dual_cache": True}
    modes = {"plain": ("fp32", {}), "threshold": ("fp32", {"threshold": args.threshold}),
             "cache": ("fp32", {"cache": True}), "dual cache": ("fp32", dual),
             "dual cache+threshold": ("fp32", {**dual, "threshold": args.threshold}),
             "cache, no suffix": ("fp32", {"cache": True, "suffix": False}),
             "plain, bf16": ("bf16", {}), "dual cache, bf16": ("bf16", dual),
             "dual cache+threshold, bf16": ("bf16", {**dual, "threshold": args.threshold})}
    modes = {name: modes[name] for name in MODES if name in args.modes}
    results, reference, outputs_of = {}, None, {}
    for name, (precision, options) in modes.items():
        cfg = SamplerConfig(gen_length=args.gen_length, eos_id=None,
                            shift=opened.cfg.diffusion.shift, **options)
        outputs, calls, positions, seconds = [], 0, 0, 0.0
        for prompt in prompts:  # batch 1: the latency a user sees
            logits_fn = Counted(sampler_logits(students[precision], cfg.cache, cfg.dual_cache))
            start = time.perf_counter()
            outputs += sample(logits_fn, [prompt], vocab, cfg)
            seconds += time.perf_counter() - start
            calls, positions = calls + logits_fn.calls, positions + logits_fn.positions
        generated = len(prompts) * args.gen_length
        continuations = [until_eos(ids, vocab.eod) for ids in outputs]
        scored = continuation_nll(ar, prompts, continuations)
        reference = reference or outputs
        outputs_of[name] = outputs
        same = sum(a == b for x, y in zip(outputs, reference) for a, b in zip(x, y))
        results[name] = {
            "precision": precision, "tokens_per_s": generated / seconds, "seconds": seconds,
            "forwards_per_token": calls / generated, "positions_per_token": positions / generated,
            "gen_ppl": math.exp(scored.value) if sum(scored.counts) else None,
            **text_statistics(continuations, lambda token: tokenizer.decode([token])),
            "agreement_with_plain": same / generated,
            "sample": tokenizer.decode(continuations[0]),
        }
    exported = export_modes(args, modes, prompts, results, outputs_of)
    plain = results.get("plain", {})
    plains = {"fp32": plain, "bf16": results.get("plain, bf16", {})}

    def ratio(value, base):
        return value / base if value and base else None

    for result in results.values():
        result["speedup"] = ratio(result["tokens_per_s"], plain.get("tokens_per_s"))
        result["speedup_same_precision"] = ratio(
            result["tokens_per_s"], plains[result["precision"]].get("tokens_per_s"))
        result["gen_ppl_ratio"] = ratio(result["gen_ppl"], plain.get("gen_ppl"))
    print(f"{len(prompts)} prompts x {args.gen_length} tokens, blocks of 8, greedy, one process "
          f"({args.threads} threads), checkpoint {opened.path}")
    print("| decoding | tokens/s | speed-up | same precision | forwards/token | positions/token "
          "| gen. PPL (ratio) | distinct | agreement with plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ppl = "–" if r["gen_ppl"] is None else f"{r['gen_ppl']:.2f} ({fmt(r['gen_ppl_ratio'])})"
        print(f"| {name} | {r['tokens_per_s']:.2f} | {fmt(r['speedup'])}x | "
              f"{fmt(r['speedup_same_precision'])}x | "
              f"{r['forwards_per_token']:.2f} | {r['positions_per_token']:.1f} | {ppl} | "
              f"{r['gen_distinct']:.2f} | {r['agreement_with_plain']:.2f} |")
    print("\nthe transformers export (diffusion_generate), same prompts and options:")
    print("| decoding | tokens/s | speed vs megalign-generate "
          "| tokens equal to megalign-generate's |")
    print("|---|---|---|---|")
    for name, r in exported.items():
        print(f"| {name} | {r['tokens_per_s']:.2f} | {r['speed_vs_megalign']:.2f}x | "
              f"{r['agreement_with_megalign']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"command": "python bench/decode.py "
                    + " ".join(argv if argv is not None else sys.argv[1:]),
         "checkpoint": opened.path, "gen_length": args.gen_length, "threshold": args.threshold,
         "prompts": PROMPTS[: args.prompts], "threads": args.threads, "modes": results,
         "export": exported},
        indent=1) + "\n", encoding="utf-8")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
