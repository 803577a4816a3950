"""Long sequences on CPU: one sequence split over 2 context-parallel ranks against one rank
holding it all, and the documents as THD against the explicit mask, side by side in one run.

    python bench/long_context.py [--out bench/results/long_context] [--seq 4096] [key.sub=value ...]

Trains the tiny model (examples/configs/tiny.yaml: 4 layers, hidden 64) with REPR-ALIGN and
per-document attention (an explicit mask) on sequences of --seq tokens, micro-batch 1, 2
micro-batches per step, 4 steps, in each arm: CP1 on one process with 2 threads, CP2 on two
processes with one thread each (both use the machine's 2 cores), and CP1 with the documents
packed as THD (megalign's core attention on CPU; Transformer Engine's fused kernels would run on a
GPU). Reports per arm the median
step time of steps 2-4, tokens per second, and per rank the planned activation bytes
(megalign-plan's count) and the measured peak (the bytes malloc held in use above start-up:
megalign-train's probe). Writes long_context.json and long_context.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from memory import build_corpus

REPO = Path(__file__).resolve().parents[1]
ONE = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]
ARMS = [  # name, processes, threads per process, overrides
    ("CP1: 1 process x 2 threads", 1, 2, ONE),
    ("CP2: 2 processes x 1 thread", 2, 1, [*ONE, "parallel.context_parallel_size=2"]),
    ("CP1, documents as THD: 1 process x 2 threads", 1, 2, [*ONE, "model.document_format=thd"]),
]


def run_arm(out: Path, index: int, nproc: int, threads: int, overrides: list, args) -> dict:
    run_dir = out / "runs" / f"arm{index}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "megalign.cli.train", "--config",
               str(REPO / "examples" / "configs" / "tiny.yaml"), f"data.paths=[{args.data}]",
               f"model.seq_length={args.seq}", "data.micro_batch_size=1",
               "data.global_batch_size=2", "schedule.train_iters=4", "schedule.warmup_iters=1",
               "logging.log_interval=1", "logging.tensorboard=false",
               f"logging.run_dir={run_dir}", *overrides, *args.overrides]
    shutil.rmtree(run_dir, ignore_errors=True)  # a run directory's metrics are appended to
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as handle:
        subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                       check=True)
    steps = [json.loads(line) for line in
             (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    memory = json.loads((run_dir / "memory.json").read_text(encoding="utf-8"))
    planned = {s["stage"]: s for s in memory["planned"]}
    step_time = statistics.median(s["step_time_s"] for s in steps[1:])
    return {"processes": nproc, "threads": threads, "overrides": overrides,
            "step_time_s": step_time, "tokens_per_s": 2 * args.seq / step_time,
            "losses": [s["loss"] for s in steps],
            "ranks": [{"rank": m["rank"], "measured_peak_bytes": m["peak_bytes"],
                       "planned_bytes": planned[m["stage"]]["total_bytes"],
                       "planned_activation_bytes": planned[m["stage"]]["bytes"]["activations"]}
                      for m in memory["measured"]]}


def markdown(arms: dict, seq: int) -> str:
    mib = 2 ** 20
    base = arms[ARMS[0][0]]
    lines = [f"Sequences of {seq} tokens, tiny model (4 layers, hidden 64), REPR-ALIGN, "
             "per-document attention, micro-batch 1, 2 per step; CPU, 2 cores in each arm", "",
             "| arm | step time s | tokens/s | rank | planned activations MiB | planned total MiB "
             "| measured peak MiB | peak / CP1's |", "|---|---|---|---|---|---|---|---|"]
    base_peak = max(r["measured_peak_bytes"] for r in base["ranks"])
    for name, arm in arms.items():
        for rank in arm["ranks"]:
            lines.append(
                f"| {name} | {arm['step_time_s']:.2f} | {arm['tokens_per_s']:.0f} | "
                f"{rank['rank']} | {rank['planned_activation_bytes'] / mib:.1f} | "
                f"{rank['planned_bytes'] / mib:.1f} | {rank['measured_peak_bytes'] / mib:.1f} | "
                f"{rank['measured_peak_bytes'] / base_peak:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/long_context")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    args.data = build_corpus()
    arms = {}
    for index, (name, nproc, threads, overrides) in enumerate(ARMS):
        arms[name] = run_arm(out, index, nproc, threads, overrides, args)
        print(f"> {name}: {arms[name]['step_time_s']:.2f} s per step", flush=True)
    base, split, packed = (arms[name] for name, *_ in ARMS)

    def peak(arm):
        return max(r["measured_peak_bytes"] for r in arm["ranks"])

    ratios = {
        "step_time_thd_over_mask": packed["step_time_s"] / base["step_time_s"],
        "measured_peak_thd_over_mask": peak(packed) / peak(base),
        "step_time_cp2_over_cp1": split["step_time_s"] / base["step_time_s"],
        "planned_activations_cp2_over_cp1": (
            max(r["planned_activation_bytes"] for r in split["ranks"])
            / max(r["planned_activation_bytes"] for r in base["ranks"])),
        "measured_peak_cp2_over_cp1": peak(split) / peak(base),
    }
    ratios["thd_losses_equal_mask"] = packed["losses"] == base["losses"]
    text = markdown(arms, args.seq) + "\n" + "".join(
        f"- {key}: {value if isinstance(value, bool) else f'{value:.3f}'}\n"
        for key, value in ratios.items())
    (out / "long_context.md").write_text(text, encoding="utf-8")
    (out / "long_context.json").write_text(json.dumps(
        {"command": "python bench/long_context.py " + " ".join(
            argv if argv is not None else sys.argv[1:]), "seq": args.seq, "arms": arms,
         "ratios": ratios}, indent=1), encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
