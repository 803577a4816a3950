"""In-training held-out evaluation (evaluation.*) and the convergence benchmark's pipeline."""

import json
import math

import pytest

from conftest import REPO, TINY_CONFIG, run_python, torchrun

from megalign.config import load_config, validate

from megalign.errors import ConfigError
from megalign.data.dataset import check_split

ONE_PROCESS = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]
EVAL = ["evaluation.interval=2", "evaluation.samples=4", "evaluation.t_grid=2",
        "schedule.train_iters=4", "schedule.warmup_iters=1", "logging.log_interval=1"]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


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


def test_empty_split_is_refused_not_a_hang():
    # Megatron's GPTDataset loops forever on a split with weight but no document
    with pytest.raises(ConfigError, match="validation split of data/x .8 documents. holds no document"):
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
    assert scored["diffusion_nelbo_per_token"] == pytest.approx(validation[-1]["val_nelbo"], rel=1e-6)
    # evaluating does not change training (no RNG consumed, train mode restored)
    run_python(["-m", "megalign.cli.train", "--config", TINY_CONFIG, *common, *ONE_PROCESS,
                "evaluation.interval=0", f"logging.run_dir={tmp_path}/b"])
    a, b = read_jsonl(tmp_path / "a" / "metrics.jsonl"), read_jsonl(tmp_path / "b" / "metrics.jsonl")
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
    out = tmp_path / "converge"
    result = run_python([REPO / "bench" / "converge.py", "--quick", "--out", out,
                         "--modes", "full", "block", "anneal"], timeout=900)
    results = json.loads((out / "results.json").read_text())
    assert set(results["settings"]) == {"low"}
    summary = results["settings"]["low"]
    arms = summary["arms"]
    # every seed for λ = 0 and the largest λ under the published freeze, the first seed otherwise;
    # block diffusion and annealing with λ = 0 and the largest λ
    assert [(a["mode"], a["freeze"], a["align_weight"], a["seed"]) for a in arms] == [
        ("full", "embedding", 0, 1234), ("full", "embedding", 10, 1234),
        ("full", "none", 0, 1234), ("full", "none", 10, 1234),
        ("full", "embedding", 0, 1235), ("full", "embedding", 10, 1235),
        ("block", "embedding", 0, 1234), ("block", "embedding", 10, 1234),
        ("anneal", "embedding", 0, 1234), ("anneal", "embedding", 10, 1234)]
    logs = {a["mode"]: (out / a["run_dir"] / "train.log").read_text() for a in arms}
    # one annealing step (steps / 4): its 4 samples open 0, 1/4, 1/2, 3/4 of the future
    assert "attention open: 0.375" in logs["anneal"] and "attention open" not in logs["block"]
    metrics = ("val_nelbo", "val_ood_nelbo", "infill_exact_match", "gen_ppl")
    for arm in arms:
        assert set(arm["ratio"]) == set(metrics)
        for metric in metrics:
            assert [step for step, _ in arm["curves"][metric]] == [0, 2, 4]
            assert all(math.isfinite(value) for _, value in arm["curves"][metric])
        baseline = next(a for a in arms if a["align_weight"] == 0 and (a["mode"], a["freeze"], a["seed"])
                        == (arm["mode"], arm["freeze"], arm["seed"]))
        # same start for the arms of one seed: same AR weights, held-out samples and masks
        assert all(arm["curves"][m][0] == baseline["curves"][m][0] for m in metrics)
        target = baseline["final"]["val_nelbo"]
        reached = [s for s, v in arm["curves"]["val_nelbo"] if v <= target]
        assert arm["steps_to_baseline_final"]["val_nelbo"] == (reached[0] if reached else None)
        if arm["align_weight"]:
            assert len(arm["align_cos"]) == 4 and len(arm["align_cos"][0][1]) == 5
        else:
            assert arm["align_cos"] == [] and arm["ratio"]["val_nelbo"] == 1.0
    spread = {(r["mode"], r["freeze"], r["metric"]): r["ratios"] for r in summary["spread"]}
    assert len(spread[("full", "embedding", "val_nelbo")]) == 2
    assert len(spread[("full", "none", "gen_ppl")]) == 1
    assert len(spread[("block", "embedding", "gen_ppl")]) == 1
    table = (out / "results.md").read_text()
    assert table.count("\n| low | full | embedding |") == 4 + len(metrics)
    assert table.count("\n| low | block | embedding |") == 2 + len(metrics)
    assert (out / "converge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ratio to λ = 0 per seed" in result.stdout
