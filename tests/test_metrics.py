"""What a run reports and when: MetricsLogger's interval policy, its JSON lines (complete after
every write, one schema per file) and the console line, in one process."""

import json

import pytest

from megalign.config import LoggingConfig
from megalign.training.metrics import MetricsLogger

pytestmark = pytest.mark.unit


def record(iteration: int, **extra) -> dict:
    return {"iteration": iteration, "loss": 3.0, "diffusion_loss": 2.0, "align_loss": 1.0,
            "lr": 1e-3, "grad_norm": None, "step_time_s": 0.5, "tokens_per_s": 2048.0, **extra}


def test_logs_every_interval_and_the_last_iteration(tmp_path, capsys):
    logger = MetricsLogger(LoggingConfig(run_dir=str(tmp_path), log_interval=3, tensorboard=False),
                           train_iters=7, enabled=True)
    for iteration in range(1, 8):
        logger.log(record(iteration, align_cos=[0.5, 0.25]))
        # each line is complete as soon as it is written (a killed run leaves valid JSON lines)
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["iteration"] for line in lines] == [
            i for i in range(1, iteration + 1) if i % 3 == 0 or i == 7]
    logger.close()
    console = capsys.readouterr().out.splitlines()
    assert len(console) == 3 and console[0].startswith(" iteration        3/       7")
    assert "grad norm: n/a" in console[0] and "align cos: [0.500 0.250]" in console[0]


def test_validation_goes_to_its_own_file(tmp_path, capsys):
    logger = MetricsLogger(LoggingConfig(run_dir=str(tmp_path), tensorboard=False), 10, True)
    logger.log_validation({"iteration": 0, "val_nelbo": 5.0, "val_nelbo_se": 0.1,
                           "val_ppl_upper_bound": 148.4, "eval_time_s": 1.0, "gen_ppl": 20.0})
    logger.close()
    assert json.loads((tmp_path / "validation.jsonl").read_text())["val_nelbo"] == 5.0
    assert not (tmp_path / "metrics.jsonl").read_text()  # the training records keep one schema
    line = capsys.readouterr().out
    assert "diffusion NELBO per token: 5.000000E+00 (s.e. 1.00E-01)" in line
    assert "generative PPL: 20 |" in line


def test_other_ranks_write_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(LoggingConfig(run_dir=str(run_dir)), 1, enabled=False)
    logger.log(record(1))
    logger.info("hello")
    logger.close()
    assert not run_dir.exists() and capsys.readouterr().out == ""
