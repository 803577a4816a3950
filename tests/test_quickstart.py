"""The README's main command, reduced to a few iterations, end to end (4 processes, TP2 x PP2)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_env


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    env = run_env()
    env.update(MEGALIGN_SKIP_SETUP="1", MEGALIGN_PYTHON=sys.executable)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        ["bash", "examples/quickstart.sh", "schedule.train_iters=4", "schedule.warmup_iters=1",
         "logging.log_interval=1", f"logging.run_dir={run_dir}",
         f"checkpoint.save={run_dir}/checkpoints"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "TP 2 x PP 2 x DP 1" in result.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    for record in records:
        for key in ("loss", "diffusion_loss", "align_loss", "lr", "grad_norm", "step_time_s",
                    "tokens_per_s"):
            assert math.isfinite(record[key]), (key, record)
        assert len(record["align_cos"]) == 5
        assert record["loss"] == pytest.approx(record["diffusion_loss"] + record["align_loss"])
    logged = [line for line in result.stdout.splitlines() if re.match(r" iteration +\d+/", line)]
    assert len(logged) == 4  # rank 0 only, once per iteration
    assert os.listdir(run_dir / "tensorboard")
    assert (run_dir / "checkpoints" / "iter_0000004" / "metadata.json").is_file()
