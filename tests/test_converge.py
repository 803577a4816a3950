"""In-training held-out evaluation (evaluation.*) and the convergence benchmark's pipeline."""

import json
import math
import re
import subprocess
import sys

import pytest

from megalign.config import load_config, validate
from megalign.data.dataset import check_split
from megalign.errors import ConfigError

from conftest import REPO, TINY_CONFIG, run_env, run_python, torchrun

ONE_PROCESS = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]
EVAL = ["evaluation.interval=2", "evaluation.samples=4", "evaluation.t_grid=2",
        "schedule.train_iters=4", "schedule.warmup_iters=1", "logging.log_interval=1"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.unit
def test_evaluation_config_errors():
    def check(*overrides):
        validate(load_config([str(TINY_CONFIG)], list(overrides)), 4)

    check("evaluation.interval=5")
    with pytest.raises(ConfigError, match="evaluation.interval > 0 needs one model chunk"):
        check("evaluation.interval=5", "parallel.virtual_pipeline_model_parallel_size=2",
              "data.global_batch_size=16")
    with pytest.raises(ConfigError, match="evaluation.samples=1 is fewer than one batch"):
        check("evaluation.interval=5", "evaluation.samples=1")
    with pytest.raises(ConfigError, match="evaluation.t_grid=0 must be at least 1"):
        check("evaluation.t_grid=0")


@pytest.mark.unit
def test_empty_split_is_refused_not_a_hang():
    # Megatron's GPTDataset loops forever on a split with weight but no document
    with pytest.raises(ConfigError,
                       match="validation split of data/x .8 documents. holds no document"):
        check_split("data/x", 8, "98,2,0")
    check_split("data/x", 8, "100,0,0")
    check_split("data/x", 50, "98,2,0")


@pytest.mark.slow
def test_validation_is_megalign_eval_and_leaves_training_unchanged(tmp_path, data_overrides):
    common = [*data_overrides, *EVAL, "align.weight=10"]
    run_python(["-m", "megalign.cli.train", "--config", TINY_CONFIG, *common, *ONE_PROCESS,
                f"logging.run_dir={tmp_path}/a", f"checkpoint.save={tmp_path}/a/ckpt"])
    validation = read_jsonl(tmp_path / "a" / "validation.jsonl")
    assert [v["iteration"] for v in validation] == [0, 2, 4]
    assert all(math.isfinite(v["val_nelbo"]) and v["val_positions"] == 4 * 128 for v in validation)
    # the last value is what megalign-eval reports for the saved checkpoint
    result = run_python(["-m", "megalign.cli.evaluate", "--checkpoint", tmp_path / "a" / "ckpt",
                         "--samples", 4, "--batch-size", 2, "--t-grid", 2])
    scored = json.loads(result.stdout.strip().splitlines()[-1])
    assert scored["diffusion_nelbo_per_token"] == pytest.approx(validation[-1]["val_nelbo"],
                                                                rel=1e-6)
    # evaluating does not change training (no RNG consumed, train mode restored)
    run_python(["-m", "megalign.cli.train", "--config", TINY_CONFIG, *common, *ONE_PROCESS,
                "evaluation.interval=0", f"logging.run_dir={tmp_path}/b"])
    a, b = (read_jsonl(tmp_path / "a" / "metrics.jsonl"),
            read_jsonl(tmp_path / "b" / "metrics.jsonl"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # the same under TP1 x PP2, from the same initial weights
    init = f"model.init_checkpoint={tmp_path}/a/ckpt/ar_init"
    run_python(["-m", "megalign.cli.train", "--config", TINY_CONFIG, *common, *ONE_PROCESS, init,
                f"logging.run_dir={tmp_path}/c"])
    torchrun(2, "-m", ["megalign.cli.train", "--config", TINY_CONFIG, *common, init,
                       "parallel.tensor_model_parallel_size=1",
                       "parallel.pipeline_model_parallel_size=2", f"logging.run_dir={tmp_path}/d"])
    one, two = (read_jsonl(tmp_path / run / "validation.jsonl") for run in ("c", "d"))
    assert [v["val_nelbo"] for v in two] == pytest.approx([v["val_nelbo"] for v in one], rel=1e-5)


@pytest.mark.slow
def test_converge_quick(tmp_path):
    """The study end to end on tiny shapes: megalign pretrains the AR model (objective=ar),
    converts it on two data sizes with every arm kind, and compares the arms paired."""
    out = tmp_path / "converge"
    result = run_python([REPO / "bench" / "converge.py", "--quick", "--out", out,
                         "--modes", "full", "block", "anneal"], timeout=1200)
    results = json.loads((out / "results.json").read_text())
    pretraining = (out / "runs" / "pretrain" / "train.log").read_text()
    assert "next-token NLL" in pretraining and "diffusion NELBO" not in pretraining
    assert [step for step, _, _ in results["pretraining"]["curve"]] == [0, 1, 2, 3, 4]
    assert set(results["settings"]) == {"docs4", "docs8"}
    arms = [a for s in results["settings"].values() for a in s["arms"]]
    # λ = 0 and the largest λ under the published freeze with every seed on every size, the
    # other modes and freeze settings on the smallest size with the first seed
    assert sorted((a["setting"], a["mode"], a["freeze"], a["align_weight"], a["seed"])
                  for a in arms) == sorted(
        [(size, "full", "embedding", w, seed) for size in ("docs4", "docs8") for w in (0, 10)
         for seed in (1, 2)] +
        [("docs4", mode, "embedding", w, 1) for mode in ("block", "anneal") for w in (0, 10)] +
        [("docs4", "full", "none", w, 1) for w in (0, 10)])
    assert all(a["recipe"] == ("repr-align" if a["align_weight"] else "plain") for a in arms)
    logs = {a["mode"]: (out / a["run_dir"] / "train.log").read_text() for a in arms}
    # one annealing step (steps / 4): its 2 samples open 0 and 1/2 of the future
    assert "attention open: 0.250" in logs["anneal"] and "attention open" not in logs["block"]
    for mode in ("full", "block", "anneal"):
        # paired evaluation: at step 0 every arm of a mode scores the same, whatever its seed,
        # λ, freeze setting or data size (same AR weights, held-out text, masks and prompts)
        starts = {json.dumps({m: a["curves"][m][0] for m in ("val_nelbo", "val_ood_nelbo",
                                                             "gen_ppl")})
                  for a in arms if a["mode"] == mode}
        assert len(starts) == 1, (mode, starts)
    for arm in arms:
        for metric in ("val_nelbo", "val_ood_nelbo", "gen_ppl"):
            assert [step for step, _ in arm["curves"][metric]] == [0, 2, 4]
            assert all(math.isfinite(value) for _, value in arm["curves"][metric])
            assert all(math.isfinite(se) and se > 0 for _, se in arm["se"][metric])
        assert len(arm["final_samples"]["val_nelbo"]) == 4  # evaluation.samples
        if arm["align_weight"]:
            assert len(arm["align_cos"]) == 4 and len(arm["align_cos"][0][1]) == 5
            assert set(arm["final_status"]) == {"val_nelbo", "val_ood_nelbo", "gen_ppl"}
            assert set(arm["strict_status"]) == set(arm["final_status"])
            assert all(k in (2, 4) for k, _ in arm["acceleration"]["val_nelbo"])
            low, high = arm["paired_final"]["val_nelbo"][1:]
            assert low <= arm["paired_final"]["val_nelbo"][0] <= high
        else:
            assert arm["align_cos"] == [] and arm["acceleration"] == {}
    rows = {(r["setting"], r["mode"], r["freeze"], r["metric"]): r for r in results["summary"]}
    assert rows[("docs8", "full", "embedding", "val_nelbo")]["seeds"] == [1, 2]
    assert rows[("docs4", "block", "embedding", "gen_ppl")]["seeds"] == [1]
    assert not any(r["target_met"] or r["target_met_strict"]  # fewer than 3 seeds
                   for r in results["summary"])
    for mode, cost in results["costs"].items():
        assert cost["flops_ratio"] > 1 and cost["time_ratio"] > 0, mode
    assert results["costs"]["block"]["flops_per_step"]["0"] > results["costs"]["full"][
        "flops_per_step"]["0"]
    table = (out / "results.md").read_text()
    # a summary row per metric, and a curves row per seed
    assert table.count("\n| docs4 | full | embedding | repr-align | 10 |") == 3 + 2
    for picture in ("curves.png", "acceleration.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "> wrote" in result.stdout
    # --summarize recomputes the same comparisons from results.json alone
    again = run_python([REPO / "bench" / "converge.py", "--summarize", "--out", out])
    assert again.stdout == table.split("\n\n", 1)[1]


@pytest.mark.slow
def test_gpu_bench_dry_runs_on_cpu(tmp_path):
    """bench/gpu.sh wired as on a GPU, with tiny shapes on CPU: the packed-documents pair (dense
    mask and THD, which train the same numbers) and the conversion study (no precision runs:
    PRECISIONS is empty), here with every recipe end to end."""
    out = tmp_path / "converge"
    tiny = ("precision=fp32 model.num_layers=2 model.hidden_size=64 model.num_attention_heads=4 "
            "model.num_query_groups=2 data.micro_batch_size=2 data.global_batch_size=4 "
            "schedule.warmup_iters=1")
    env = {**run_env(), "PRECISIONS": "", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "LONG_SEQ": "256", "LONG_ARGS": tiny, "ITERS": "3", "WARMUP": "1",
           "PEAK_TFLOPS": "1", "STUDY_ARGS": f"--quick --modes full --freeze embedding "
                                             f"--seeds 1 --sizes 4 --terms path hybrid-ar logit-kd "
                                             f"--out {out}"}
    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^thd / mask at 256 tokens: step time [\d.]+, peak memory [\d.]+$",
                     result.stdout, re.M), result.stdout
    losses = {name: [json.loads(line)["loss"] for line in
                     (tmp_path / f"documents_{name}_256" / "metrics.jsonl").open()]
              for name in ("mask", "thd")}
    assert len(losses["mask"]) == 3 and losses["thd"] == pytest.approx(losses["mask"], rel=1e-5)
    results = json.loads((out / "results.json").read_text())
    arms = results["settings"]["docs4"]["arms"]
    assert [a["recipe"] for a in arms] == ["plain", "repr-align", "path", "repr-align+path",
                                           "hybrid-ar", "repr-align+hybrid-ar", "logit-kd",
                                           "repr-align+logit-kd"]
    assert all(a["seed"] == 1 for a in arms)
    hybrid = (out / arms[4]["run_dir"] / "train.log").read_text()
    assert "ar term: " in hybrid and "ar term: " not in (out / arms[2]["run_dir"] / "train.log"
                                                         ).read_text()
    assert {r["recipe"] for r in results["summary"]} == {a["recipe"] for a in arms[1:]}
    costs = results["costs"]["full"]
    assert costs["flops_ratio"] > 1
    by_recipe = costs["flops_ratio_by_recipe"]
    assert by_recipe["plain"] == by_recipe["path"] == 1.0  # the path term weighs the same CE
    assert by_recipe["repr-align+path"] == by_recipe["repr-align"] == costs["flops_ratio"]
    assert by_recipe["hybrid-ar"] > 2  # two streams: twice the positions, attention over both
    # the teacher's LM head: the same with and without alignment (cosines are not counted)
    assert by_recipe["repr-align+logit-kd"] == by_recipe["logit-kd"] > by_recipe["repr-align"] > 1
