"""Peak memory per rank, planned (megalign-plan) and measured (megalign-train), side by side.

    python bench/memory.py [--out bench/results/memory] [--hidden 768] [key.sub=value ...]
    python bench/memory.py --smollm2 [--ar runs/smollm2/ar]    # the main job's model instead

Trains a Llama-style student of 8 layers with REPR-ALIGN for 3 steps in each arm below (the
bundled corpus, examples/configs/tiny.yaml otherwise) and reads each run's memory.json: the plan
the run logged and every rank's peak (CPU: the bytes malloc held in use above start-up,
megalign-train's probe). The arms pair what a memory-saving
option changes: the teacher sharing the frozen embedding or holding its own copy, the optimizer
states sharded over data parallelism or not, full recomputation or none, bf16 or fp32, and a
TP2 x PP2 and an interleaved layout. With ``--smollm2`` the arms are the main job's conversion
of SmolLM2-135M (``--ar``: the converted model, made by examples/quickstart.sh's first step): its
TP1 x PP2 recipe, and the same on one process without alignment. Writes memory.json and
memory.md under --out (``--smollm2``: smollm2.json and smollm2.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ONE = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]
FROZEN = ["optimizer.freeze=[embedding, output_layer]"]
ARMS = [  # name, processes, overrides
    ("fp32", 1, ONE),
    ("fp32, embedding frozen, teacher shares it", 1, [*ONE, *FROZEN]),
    ("fp32, embedding frozen, teacher copies it", 1, [*ONE, *FROZEN, "align.share_frozen=false"]),
    ("fp32, full recomputation", 1, [*ONE, "recompute.granularity=full"]),
    ("bf16", 1, [*ONE, "precision=bf16"]),
    ("DP2, plain optimizer", 2, ONE),
    ("DP2, distributed optimizer", 2, [*ONE, "optimizer.distributed=true"]),
    ("TP2 x PP2", 4, []),
    ("PP2 x VPP2 x DP2, bf16, distributed optimizer, recomputation", 4,
     ["parallel.tensor_model_parallel_size=1", "parallel.virtual_pipeline_model_parallel_size=2",
      "precision=bf16", "optimizer.distributed=true", "recompute.granularity=full", *FROZEN]),
]


SMOLLM2_ARMS = [
    ("SmolLM2-135M, the main job's recipe (TP1 x PP2, REPR-ALIGN)", 2, []),
    ("SmolLM2-135M, TP1 x PP1, no alignment", 1,
     ["parallel.pipeline_model_parallel_size=1", "align.weight=0"]),
]


def smollm2_corpus(ar: Path) -> str:
    """The main job's KJV files in SmolLM2's tokenizer (built as examples/quickstart.sh does)."""
    import yaml

    prefix = REPO / "data" / "build" / "kjv_smollm2"
    if not Path(f"{prefix}_text_document.idx").exists():
        eod = yaml.safe_load((ar / "megalign.yaml").read_text())["data"].get("eod_token")
        subprocess.run([sys.executable, "-m", "megalign.cli.preprocess", "--input",
                        str(REPO / "data" / "corpus" / "kjv.jsonl.gz"), "--tokenizer",
                        str(ar / "tokenizer"), "--output-prefix", str(prefix), "--append-eod",
                        *(["--eod-token", eod] if eod else []), "--no-progress"],
                       check=True, cwd=REPO)
    return f"{prefix}_text_document"


def build_corpus() -> str:
    prefix = REPO / "data" / "build" / "kjv"
    if not Path(f"{prefix}_text_document.idx").exists():
        subprocess.run([sys.executable, "-m", "megalign.cli.preprocess", "--input",
                        str(REPO / "data" / "corpus" / "kjv.jsonl.gz"), "--tokenizer",
                        str(REPO / "data" / "tokenizer" / "kjv_bpe4k.model"), "--output-prefix",
                        str(prefix), "--append-eod", "--no-progress"], check=True, cwd=REPO)
    return f"{prefix}_text_document"


def run_arm(out: Path, index: int, nproc: int, overrides: list, args) -> dict:
    run_dir = out / "runs" / f"{'smollm2_' if args.smollm2 else ''}arm{index}"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    if args.smollm2:
        model = ["--config", str(args.ar / "megalign.yaml"),
                 "--config", str(REPO / "examples" / "configs" / "smollm2.yaml"),
                 "evaluation.interval=0"]
    else:
        model = ["--config", str(REPO / "examples" / "configs" / "tiny.yaml"),
                 "model.num_layers=8", "model.num_attention_heads=8",
                 f"model.hidden_size={args.hidden}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "megalign.cli.train", *model,
               f"data.paths=[{args.data}]", "schedule.train_iters=3",
               "schedule.warmup_iters=1", "logging.tensorboard=false",
               f"logging.run_dir={run_dir}", *overrides, *args.overrides]
    log = run_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as handle:
        subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                       check=True)
    return json.loads((run_dir / "memory.json").read_text(encoding="utf-8"))


def summarize(name: str, nproc: int, record: dict) -> dict:
    planned = {s["stage"]: s for s in record["planned"]}
    stages = []
    for stage, plan in sorted(planned.items()):
        peaks = [m["peak_bytes"] for m in record["measured"] if m["stage"] == stage]
        stages.append({"stage": stage, "planned_bytes": plan["total_bytes"],
                       "items": plan["bytes"], "measured_peak_bytes": max(peaks),
                       "ratio": max(peaks) / plan["total_bytes"]})
    return {"arm": name, "processes": nproc, "stages": stages}


def markdown(rows: list[dict], args) -> str:
    mib = 2 ** 20
    model = ("SmolLM2-135M as the main job trains it: sequence 256, micro-batch 1, 4 "
             "micro-batches per step" if args.smollm2 else
             f"hidden {args.hidden}, 8 layers, REPR-ALIGN λ = 10, sequence 128, micro-batch 2, "
             "4 micro-batches per step")
    lines = [f"Peak memory per rank, planned vs measured ({model}; CPU peak RSS above "
             "start-up)", "",
             "| arm | stage | planned MiB | measured MiB | measured / planned |",
             "|---|---|---|---|---|"]
    for row in rows:
        for stage in row["stages"]:
            lines.append(f"| {row['arm']} | {stage['stage']} | "
                         f"{stage['planned_bytes'] / mib:.1f} | "
                         f"{stage['measured_peak_bytes'] / mib:.1f} | {stage['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/memory")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--smollm2", action="store_true",
                        help="the main job's SmolLM2-135M arms instead (needs --ar)")
    parser.add_argument("--ar", type=Path, default=REPO / "runs" / "smollm2" / "ar",
                        help="--smollm2: the converted model (examples/quickstart.sh makes it)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    out = REPO / args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.smollm2 and not (args.ar / "megalign.yaml").is_file():
        parser.error(f"--ar {args.ar}: no converted model (run examples/quickstart.sh's "
                     "conversion first)")
    args.data = smollm2_corpus(args.ar) if args.smollm2 else build_corpus()
    rows, name = [], "smollm2" if args.smollm2 else "memory"
    for index, (name_of_arm, nproc, overrides) in enumerate(SMOLLM2_ARMS if args.smollm2
                                                             else ARMS):
        start = time.perf_counter()
        rows.append(summarize(name_of_arm, nproc, run_arm(out, index, nproc, overrides, args)))
        worst = max(rows[-1]["stages"], key=lambda s: abs(s["ratio"] - 1))
        print(f"> {name_of_arm}: measured / planned {worst['ratio']:.3f} (stage {worst['stage']}; "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
    text = markdown(rows, args)
    (out / f"{name}.md").write_text(text, encoding="utf-8")
    (out / f"{name}.json").write_text(json.dumps({"command": "python bench/memory.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "hidden": args.hidden, "arms": rows},
        indent=1), encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
