"""Table for bench/gpu.sh: median step time, tokens/s, model TFLOP/s, MFU and peak memory of each
run directory.

    python bench/gpu_report.py [--warmup 10] [--peak-tflops 989] RUN_DIR...

Each RUN_DIR holds the ``config.yaml``, ``metrics.jsonl`` and ``memory.json`` that megalign-train
writes (the peak is the highest rank's: the allocator's peak on a GPU). Model FLOPs
per token are megalign's own count (``megalign/model/flops.py``: matrix products only, the student's
forward and backward, the teacher's forward under REPR-ALIGN). MFU divides by the GPU's dense bf16
peak, for FP8 runs too (so they compare on one scale).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from megalign.config import load_config, padded_vocab_size
from megalign.data.tokenizer import build_tokenizer
from megalign.model.flops import step_flops
from megalign.model.streams import stream_count

DENSE_BF16_TFLOPS = {"A100": 312.0, "H100 80GB HBM3": 989.4, "H200": 989.4}


def flops_per_token(cfg) -> float:
    """A step's FLOPs over the tokens it trains on (the clean sequences' positions)."""
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = padded_vocab_size(cfg.model, tokenizer.vocab_size, tokenizer.mask)
    streams = stream_count(cfg.diffusion.block_length, cfg.model.seq_length)
    flops = step_flops(cfg, vocab, aligned=cfg.align.uses_teacher, streams=streams,
                       teacher_head=cfg.align.kd_weight > 0)
    return flops / (cfg.data.global_batch_size * cfg.model.seq_length)


def peak_tflops(given) -> float:
    if given:
        return given
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    for key, value in DENSE_BF16_TFLOPS.items():
        if key in name:
            return value
    sys.exit(f"gpu_report.py: dense bf16 peak of '{name}' unknown; "
             "pass --peak-tflops (or PEAK_TFLOPS)")


def summarize(run: str, warmup: int) -> dict:
    cfg = load_config(os.path.join(run, "config.yaml"))
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle][warmup:]
    if not records:
        sys.exit(f"gpu_report.py: {run}/metrics.jsonl has no iteration after the {warmup} "
                 "warm-up ones")
    step = statistics.median(r["step_time_s"] for r in records)
    tokens = statistics.median(r["tokens_per_s"] for r in records)
    name = f"{cfg.precision} {'align' if cfg.align.weight > 0 else 'plain'}"
    if cfg.model.document_attention:  # the packed-documents pair: how the documents are given
        name = f"{cfg.model.document_format} {cfg.model.seq_length}"
    with open(os.path.join(run, "memory.json"), encoding="utf-8") as handle:
        peak = max(rank["peak_bytes"] for rank in json.load(handle)["measured"])
    return {"name": name, "step_ms": step * 1e3, "tokens_per_s": tokens,
            "tflops": flops_per_token(cfg) * tokens / 1e12, "iters": len(records),
            "peak_gib": peak / 2**30, "seq_length": cfg.model.seq_length}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float,
                        default=float(os.environ.get("PEAK_TFLOPS", 0)))
    args = parser.parse_args(argv)
    peak = peak_tflops(args.peak_tflops)
    rows = [summarize(run, args.warmup) for run in args.runs]
    print(f"{'run':<12} {'step (ms)':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'peak (GiB)':>11}  iterations")
    for r in rows:
        print(f"{r['name']:<12} {r['step_ms']:>10.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['tflops']:>8.1f} {r['tflops'] / peak:>6.1%} {r['peak_gib']:>11.2f}  "
              f"{r['iters']}")
    by_name = {r["name"]: r for r in rows}
    for objective in ("plain", "align"):
        fast, base = by_name.get(f"fp8 {objective}"), by_name.get(f"bf16 {objective}")
        if fast and base:
            print(f"fp8 / bf16 tokens/s, {objective}: "
                  f"{fast['tokens_per_s'] / base['tokens_per_s']:.2f}")
    for precision in ("fp32", "bf16", "fp8"):
        plain, align = by_name.get(f"{precision} plain"), by_name.get(f"{precision} align")
        if plain and align:
            print(f"align / plain step time, {precision}: "
                  f"{align['step_ms'] / plain['step_ms']:.2f}")
    for length in sorted({r["seq_length"] for r in rows}):
        mask, thd = by_name.get(f"mask {length}"), by_name.get(f"thd {length}")
        if mask and thd:
            print(f"thd / mask at {length} tokens: step time "
                  f"{thd['step_ms'] / mask['step_ms']:.2f}, peak memory "
                  f"{thd['peak_gib'] / mask['peak_gib']:.2f}")
    print(f"(MFU against a dense bf16 peak of {peak:.0f} TFLOP/s)")


if __name__ == "__main__":
    main()
