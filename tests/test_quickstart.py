"""The README's main command (SmolLM2 -> diffusion LM with REPR-ALIGN, TP1 x PP2, then generation)
and the tiny TP2 x PP2 demo, each reduced to a few iterations, end to end."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, WORKERS, run_env, run_python, torchrun


def run_script(script, env_extra, args, timeout=1500):
    env = run_env()
    env.update(MEGALIGN_SKIP_SETUP="1", MEGALIGN_PYTHON=sys.executable, **env_extra)
    result = subprocess.run(["bash", script, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def check_metrics(run_dir, iterations, layers):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, iterations + 1))
    for record in records:
        for key in ("loss", "diffusion_loss", "align_loss", "lr", "grad_norm", "step_time_s",
                    "tokens_per_s"):
            assert math.isfinite(record[key]), (key, record)
        assert len(record["align_cos"]) == layers + 1
        assert record["loss"] == pytest.approx(record["diffusion_loss"] + record["align_loss"])


@pytest.mark.slow
def test_main_command_smollm2(tmp_path):
    run_dir = tmp_path / "smollm2"
    result = run_script("examples/quickstart.sh",
                        {"MEGALIGN_RUN_DIR": str(run_dir), "GEN_LENGTH": "8"},
                        ["schedule.train_iters=2", "schedule.warmup_iters=1",
                         "logging.log_interval=1", "evaluation.samples=4",
                         "evaluation.generation_samples=2"])
    assert "TP 1 x PP 2 x DP 1" in result.stdout
    check_metrics(run_dir, 2, layers=30)
    # the published recipe: embedding and tied output layer frozen; evaluated at 0 and the end
    validation = [json.loads(line)
                  for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert [v["iteration"] for v in validation] == [0, 2]
    assert all(math.isfinite(v[key]) for v in validation
               for key in ("val_nelbo", "val_ood_nelbo", "gen_ppl", "gen_distinct"))
    assert ("frozen parameters: embedding, output_layer"
            in (run_dir / "hf" / "README.md").read_text())
    assert (run_dir / "checkpoints" / "iter_0000002" / "metadata.json").is_file()
    samples = [json.loads(line) for line in result.stdout.splitlines()
               if line.startswith('{"prompt"')]
    assert [s["prompt"] for s in samples] == ["And God said", "The LORD is my shepherd"]
    assert all(s["completion"].strip() and s["ar_completion"].strip() for s in samples)
    # the exported student samples the same tokens with transformers alone
    from megalign.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(str(run_dir / "ar" / "tokenizer"))
    job = {"model": str(run_dir / "hf"),
           "prompts": [tokenizer.encode(s["prompt"]) for s in samples],
           "options": [{"max_new_tokens": 8}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_python([WORKERS / "hf_diffusion.py", "--job", tmp_path / "job.json", "--out",
                tmp_path / "hf.json"])
    hf = json.loads((tmp_path / "hf.json").read_text())
    assert hf["batched"][0] == [s["completion_ids"] for s in samples]

    # diffusion SFT of that student on the bundled instruction set (examples/sft.sh)
    sft_dir = tmp_path / "sft"
    result = run_script("examples/sft.sh",
                        {"MEGALIGN_RUN_DIR": str(run_dir), "MEGALIGN_SFT_DIR": str(sft_dir),
                         "GEN_LENGTH": "8"},
                        ["schedule.train_iters=2", "schedule.warmup_iters=1",
                         "evaluation.interval=2", "logging.log_interval=1", "evaluation.samples=4",
                         "evaluation.generation_samples=2"])
    check_metrics(sft_dir, 2, layers=30)
    config = (sft_dir / "config.yaml").read_text()
    assert "sft: true" in config and f"student_checkpoint: {run_dir}/checkpoints" in config
    validation = [json.loads(line)
                  for line in (sft_dir / "validation.jsonl").read_text().splitlines()]
    assert [v["iteration"] for v in validation] == [0, 2]
    answers = [json.loads(line) for line in result.stdout.splitlines()
               if line.startswith('{"prompt"')]
    assert len(answers) == 2 and all("<|im_start|>assistant" in a["prompt"] for a in answers)


@pytest.mark.slow
def test_tiny_demo_and_generation_errors(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("examples/tiny.sh", {},
                        ["schedule.train_iters=4", "schedule.warmup_iters=1",
                         "logging.log_interval=1", f"logging.run_dir={run_dir}",
                         f"checkpoint.save={run_dir}/checkpoints",
                         f"debug.dump_first_batch={run_dir}/first_batch.pt"])
    assert "TP 2 x PP 2 x DP 1" in result.stdout
    check_metrics(run_dir, 4, layers=4)
    logged = [line for line in result.stdout.splitlines() if re.match(r" iteration +\d+/", line)]
    assert len(logged) == 4  # rank 0 only, once per iteration
    assert os.listdir(run_dir / "tensorboard")
    import torch

    dump = torch.load(run_dir / "first_batch.pt")
    assert dump["clean_tokens"].shape == dump["input_tokens"].shape == dump["supervised"].shape
    assert dump["t"].shape == dump["clean_tokens"].shape[:1] and len(dump["align_cos"]) == 5
    assert dump["align_loss"] == pytest.approx(
        10 * sum(1 - c for c in dump["align_cos"].values()) / 5)
    visible = dump["input_tokens"] == dump["clean_tokens"]
    assert not (dump["input_tokens"][~visible] != 3).any()  # hidden tokens are the mask token
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000004"

    prompts = tmp_path / "prompts.txt"
    prompts.write_text('In the beginning\n{"prompt": "And Moses said unto the LORD"}\n')
    generate = ["--checkpoint", checkpoints, "--prompt-file", prompts, "--gen-length", "8",
                "--steps", "4", "--temperature", "0.7", "--seed", "5", "--unmasking", "p2"]
    out = run_python(["-m", "megalign.cli.generate", *generate, "--ar"])
    samples = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [s["prompt"] for s in samples] == ["In the beginning", "And Moses said unto the LORD"]
    assert all("completion" in s and "ar_completion" in s for s in samples)
    # the same samples from the checkpoint resharded to TP=2 x PP=2
    sharded = torchrun(4, "-m", ["megalign.cli.generate", *generate,
                                 "parallel.tensor_model_parallel_size=2",
                                 "parallel.pipeline_model_parallel_size=2"])
    assert [json.loads(line) for line in sharded.stdout.strip().splitlines()] == [
        {k: v for k, v in s.items() if k != "ar_completion"} for s in samples]
    evaluate = ["--checkpoint", checkpoints, "--data", REPO / "data/build/kjv_text_document",
                "--samples", "8", "--t-grid", "3"]
    single = json.loads(run_python(["-m", "megalign.cli.evaluate", *evaluate, "--ar",
                                    "--infill-span", "4"]).stdout.splitlines()[-1])
    assert 0 <= single["infill_exact_match"] <= single["infill_token_accuracy"] <= 1
    assert math.isfinite(single["diffusion_nelbo_per_token"]) and single["positions"] == 8 * 128
    assert single["perplexity_upper_bound"] == pytest.approx(
        math.exp(single["diffusion_nelbo_per_token"]))
    assert math.isfinite(single["ar_perplexity"])
    split = torchrun(4, "-m", ["megalign.cli.evaluate", *evaluate,
                               "parallel.tensor_model_parallel_size=2",
                               "parallel.pipeline_model_parallel_size=2"])
    resharded = json.loads(split.stdout.splitlines()[-1])
    assert resharded["diffusion_nelbo_per_token"] == pytest.approx(
        single["diffusion_nelbo_per_token"], rel=1e-5)
    too_long = run_python(["-m", "megalign.cli.generate", "--checkpoint", checkpoints, "--prompt",
                           "word " * 200], check=False)
    assert too_long.returncode == 2 and "exceeds the model's context" in too_long.stderr
    no_mask = run_python(["-m", "megalign.cli.generate", "--checkpoint", checkpoints,
                          "--prompt", "x", "diffusion.mask_token_id=5000"], check=False)
    assert (no_mask.returncode == 2
            and "mask_token_id=5000 lies outside the padded vocabulary" in no_mask.stderr)
    missing = run_python(["-m", "megalign.cli.generate", "--checkpoint", tmp_path / "nope",
                          "--prompt", "x"], check=False)
    assert missing.returncode == 2 and "not a complete megalign checkpoint" in missing.stderr
