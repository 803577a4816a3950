"""megalign-harness: lm-evaluation-harness tasks on a megalign diffusion student.

    megalign-harness --checkpoint RUN/checkpoints --tasks my_task --include_path my_tasks/ \\
        [--model_args mc_samples=16,steps=32] [--limit N] [--num_fewshot K] [--output results.json]

The adapter, its estimators and its limits: megalign/harness.py.
"""

# Imports inside functions are deliberate here: a command parses its arguments before importing
# torch, Megatron-Core and lm_eval (fast --help and usage errors).

from __future__ import annotations

import argparse
import sys

from megalign.cli.common import ArgumentParser, print_result, run_command


def main(argv=None) -> int:
    parser = ArgumentParser(prog="megalign-harness", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--include_path", help="directory of task YAML files")
    parser.add_argument("--model_args", default="", help="k=v,... for MegalignLM (mc_samples, "
                        "seed, steps, block_length, unmasking, confidence, max_gen_toks, "
                        "threshold, cache)")
    parser.add_argument("--num_fewshot", type=int)
    parser.add_argument("--limit", type=float)
    parser.add_argument("--output", help="write the results JSON here too")
    args = parser.parse_args(argv)
    return run_command("megalign-harness", lambda: evaluate(args))


def evaluate(args) -> None:
    import importlib

    import lm_eval
    from lm_eval.tasks import TaskManager

    importlib.import_module("megalign.harness")  # registers the "megalign" model with lm_eval

    model_args = (f"checkpoint={args.checkpoint}"
                  + (f",{args.model_args}" if args.model_args else ""))
    results = lm_eval.simple_evaluate(
        model="megalign", model_args=model_args, tasks=args.tasks.split(","),
        num_fewshot=args.num_fewshot, limit=args.limit, bootstrap_iters=0, log_samples=False,
        task_manager=TaskManager(include_path=args.include_path))
    print_result({"results": results["results"]}, args.output)


if __name__ == "__main__":
    sys.exit(main())
