"""REPR-ALIGN overhead vs plain masked-diffusion training, measured side by side in one run.

    python bench/align_overhead.py [--iters 20] [--config FILE ...] [key.sub=value ...]
    python bench/align_overhead.py --precisions fp32 bf16 [...]   # one launch each, then ratios

Starts 4 processes (TP=2 x PP=2 on CPU by default), builds one student (and its frozen teacher),
then alternates plain diffusion steps (no teacher) and REPR-ALIGN steps on the same model, so both
see the same machine state. Prints median step times, their ratio, and the p2p bytes per
micro-batch of each (counted on every rank, summed). With ``--precisions`` it does so once per
precision, one launch after the other, and prints each precision's step time over the first's
(written to bench/results/precision_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
            "align.weight=10", "logging.tensorboard=false", "logging.run_dir=runs/bench_align",
            "schedule.train_iters=200"]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from megalign.config import load_config
    from megalign.data.tokenizer import build_tokenizer
    from megalign.telemetry.p2p import count_p2p
    from megalign.training.step import DiffusionStep
    from megalign.training.trainer import setup

    cfg = load_config(args.config, [*DEFAULTS, *args.overrides])
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    trainer = setup(cfg, tokenizer, log=lambda message: None)
    s = trainer.step
    plain = DiffusionStep(cfg, trainer.students, None, s.layer_weights, s.vocab)
    steps = {"plain": plain, "align": s}
    iterators = {name: trainer.data_iterator() for name in steps}
    times = {name: [] for name in steps}
    bytes_per_mb = {}
    for i in range(args.warmup + args.iters):
        for name, step in steps.items():
            dist.barrier()
            start = time.perf_counter()
            trainer.forward_backward(iterators[name], step=step)
            trainer.optimizer_step()
            dist.barrier()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    for name, step in steps.items():
        with count_p2p() as counts:
            trainer.forward_backward(iterators[name], step=step)
        total = torch.tensor([counts.forward_bytes + counts.backward_bytes], dtype=torch.float64)
        dist.all_reduce(total)
        bytes_per_mb[name] = float(total) / trainer.num_microbatches
    if dist.get_rank() == 0:
        median = {name: statistics.median(values) for name, values in times.items()}
        print(f"layout: TP {cfg.parallel.tensor_model_parallel_size} x PP "
              f"{cfg.parallel.pipeline_model_parallel_size}, hidden {cfg.model.hidden_size}, "
              f"layers {cfg.model.num_layers}, seq {cfg.model.seq_length}, micro-batch "
              f"{cfg.data.micro_batch_size}, {trainer.num_microbatches} micro-batches/step "
              f"(teacher: {min(s.teacher_group, trainer.num_microbatches)} per forward), "
              f"{args.iters} timed steps each (after {args.warmup} warm-up)")
        for name in steps:
            print(f"{name:>6}: median step {median[name] * 1000:8.1f} ms | "
                  f"p2p bytes per micro-batch {bytes_per_mb[name]:12.0f}")
        print(f"step-time ratio (REPR-ALIGN / plain): {median['align'] / median['plain']:.3f}")
        if args.result:
            Path(args.result).write_text(json.dumps({"median_step_s": median}))
        if bytes_per_mb["plain"]:
            ratio = bytes_per_mb["align"] / bytes_per_mb["plain"]
            print(f"p2p bytes ratio (REPR-ALIGN / plain): {ratio:.3f}")
    dist.barrier()


BUNDLED = "data/build/kjv_text_document"  # examples/configs/tiny*.yaml read this


def ensure_data(args):
    """Build the bundled corpus's dataset when the config reads it and it is missing (as
    examples/tiny.sh does); returns what else is missing, in one line, or None."""
    from megalign.config import load_config, parse_blend

    cfg = load_config(args.config, args.overrides)
    for prefix in parse_blend(cfg.data.paths)[0]:
        if os.path.isfile(REPO / f"{prefix}.idx") or os.path.isfile(f"{prefix}.idx"):
            continue
        if prefix != BUNDLED:
            return (f"the dataset {prefix}.idx does not exist; make it with megalign-preprocess "
                    "(README, Data) or pass data.paths=[PREFIX]")
        from megalign.data.preprocess import preprocess

        preprocess([str(REPO / "data/corpus/kjv.jsonl.gz")], str(REPO / cfg.data.tokenizer),
                   str(REPO / "data/build/kjv"), "text", True)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append",
                        help="YAML file(s), merged in order (default examples/configs/tiny.yaml)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"),
                        help="measure each precision in turn and compare with the first")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.config = args.config or [str(REPO / "examples/configs/tiny.yaml")]
    if args.worker:
        worker(args)
        return 0
    missing = ensure_data(args)
    if missing:
        print(f"bench/align_overhead.py: {missing}", file=sys.stderr)
        return 2
    if not args.precisions:
        return launch(args, args.overrides)
    medians = {}
    for precision in args.precisions:
        result = REPO / "runs" / f"bench_align_{precision}.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        print(f"--- precision={precision}", flush=True)
        code = launch(args, [*args.overrides, f"precision={precision}"], result)
        if code:
            return code
        medians[precision] = json.loads(result.read_text())["median_step_s"]
    first = args.precisions[0]
    ratios = {p: {kind: medians[p][kind] / medians[first][kind] for kind in medians[p]}
              for p in args.precisions}
    for precision in args.precisions[1:]:
        print(f"step-time ratio ({precision} / {first}): plain {ratios[precision]['plain']:.3f}, "
              f"REPR-ALIGN {ratios[precision]['align']:.3f}")
    out = REPO / "bench" / "results" / "precision_cpu.json"
    out.write_text(json.dumps({"overrides": args.overrides, "nproc": args.nproc,
                               "iters": args.iters, "median_step_s": medians,
                               f"ratio_to_{first}": ratios}, indent=1) + "\n")
    return 0


def launch(args, overrides: list[str], result: Path | None = None) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", __file__, "--worker",
           *[arg for path in args.config for arg in ("--config", path)],
           "--iters", str(args.iters), "--warmup", str(args.warmup),
           *(["--result", str(result)] if result else []), *overrides]
    return subprocess.call(cmd, cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main())
