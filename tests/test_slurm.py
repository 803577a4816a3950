"""examples/slurm/*.sbatch on a real single-node Slurm (tools/slurm_local.sh: munged, slurmctld,
slurmd on localhost), both launch modes, and preemption: SIGUSR1 -> checkpoint -> requeue -> resume.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import CORPUS, REPO, TINY_CONFIG, TOKENIZER, run_env

SLURM_LOCAL = REPO / "tools" / "slurm_local.sh"
CONVERT = REPO / "examples" / "slurm" / "convert.sbatch"
PREPROCESS = REPO / "examples" / "slurm" / "preprocess.sbatch"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    """Environment for sbatch/scontrol against a cluster of our own; daemons stopped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd, munged as the munge user, apt-get install)")
    state = tempfile.mkdtemp(prefix="megalign-slurm.", dir="/tmp")  # munge must traverse it
    try:
        started = subprocess.run(["bash", str(SLURM_LOCAL), "start", state], capture_output=True,
                                 text=True, timeout=600)
        if started.returncode == 3:
            pytest.skip(f"Slurm is not installed and cannot be: {started.stderr.strip()[-500:]}")
        assert started.returncode == 0, f"tools/slurm_local.sh start failed:\n{started.stderr}"
        env = run_env()
        env.update(SLURM_CONF=started.stdout.strip().splitlines()[-1], PYTHON=sys.executable)
        yield env
    finally:
        subprocess.run(["bash", str(SLURM_LOCAL), "stop", state], timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def sbatch(env, *args, **extra_env) -> str:
    result = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=REPO,
                            env={**env, **extra_env}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"sbatch {args} failed:\n{result.stderr}"
    return result.stdout.strip().split(";")[0]


def job(env, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(env, job_id: str, done, log: Path, timeout: float = 240) -> dict:
    """Poll ``scontrol show job`` until ``done(info)``; on timeout or a failed job, show its log."""
    deadline = time.monotonic() + timeout
    while True:
        info = job(env, job_id)
        if done(info):
            return info
        if info["JobState"] in FINAL_STATES or time.monotonic() > deadline:
            text = log.read_text() if log.exists() else "(no log file)"
            daemons = Path(env["SLURM_CONF"]).parent
            for name in ("slurmctld.log", "slurmd.log"):  # the daemons' view of the job
                if (daemons / name).exists():
                    text += f"\n--- {name}\n" + (daemons / name).read_text()[-3000:]
            pytest.fail(f"job {job_id} is {info['JobState']} ({info.get('Reason')}):\n"
                        f"{text[-12000:]}")
        time.sleep(0.5)


def completed(info: dict) -> bool:
    return info["JobState"] == "COMPLETED"


def train_args(data_prefix, tmp_path, iters: int) -> list:
    return ["--config", TINY_CONFIG, f"data.paths=[{data_prefix}]", f"data.tokenizer={TOKENIZER}",
            f"data.cache_dir={tmp_path}/cache", "parallel.tensor_model_parallel_size=1",
            f"schedule.train_iters={iters}", "schedule.warmup_iters=1",
            f"logging.run_dir={tmp_path}/run", "logging.log_interval=1",
            "logging.tensorboard=false"]


def test_preprocess_then_convert_one_task_per_process(slurm, tmp_path):
    """Preprocessing job, then a dependent 2-task conversion job (TP1 x PP2, REPR-ALIGN)."""
    logs = tmp_path / "%x-%j.log"
    prep = sbatch(slurm, f"--output={logs}", "--cpus-per-task=2", PREPROCESS,
                  "--input", CORPUS, "--tokenizer", TOKENIZER, "--output-prefix", tmp_path / "kjv",
                  "--append-eod")
    ckpt = tmp_path / "ckpt"
    conv = sbatch(slurm, f"--output={logs}", f"--dependency=afterok:{prep}", "--ntasks-per-node=2",
                  CONVERT, *train_args(tmp_path / "kjv_text_document", tmp_path, 4),
                  CHECKPOINT_DIR=str(ckpt))
    log = tmp_path / f"megalign-convert-{conv}.log"
    info = wait_until(slurm, conv, completed, log)
    assert job(slurm, prep)["JobState"] == "COMPLETED"
    assert info["ExitCode"] == "0:0"
    text = log.read_text()
    assert "2 task(s)" in text and "world 2 = TP 1 x PP 2 x DP 1" in text, text
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert (ckpt / "iter_0000004" / "metadata.json").is_file()


def test_torchrun_per_node_preempted_requeued_resumed(slurm, corpus_prefix, tmp_path):
    """One task running torchrun (2 ranks); SIGUSR1 to the batch script (what --signal=B:USR1
    sends) makes every rank save and stop, the job requeues itself and resumes to the end."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "run" / "metrics.jsonl"
    conv = sbatch(slurm, f"--output={tmp_path}/%x-%j.log", "--cpus-per-task=2", CONVERT,
                  *train_args(corpus_prefix, tmp_path, 30), CHECKPOINT_DIR=str(ckpt),
                  NPROC_PER_NODE="2")
    log = tmp_path / f"megalign-convert-{conv}.log"
    wait_until(slurm, conv,
               lambda _: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", conv], env=slurm, check=True, timeout=60)
    # a requeued job waits out the revoked credential of its last run (cred_expire: 10 s here);
    # starting it earlier makes slurmd refuse it ("Job credential revoked")
    wait_until(slurm, conv, lambda i: i["Restarts"] == "1" and i["JobState"] == "PENDING", log)
    wait_until(slurm, conv, completed, log)

    text = log.read_text()
    assert "1 task(s)" in text and "world 2 = TP 1 x PP 2 x DP 1" in text, text
    stopped = [line for line in text.splitlines() if "SIGUSR1: stopping after iteration" in line]
    assert len(stopped) == 1, text
    saved_at = int(stopped[0].rsplit(" ", 1)[1])
    assert saved_at < 30 and f"resumed from {ckpt}" in text, text
    assert (ckpt / f"iter_{saved_at:07d}").is_dir() and (ckpt / "iter_0000030").is_dir()
    assert (ckpt / "latest").read_text().strip() == "iter_0000030"
    logged = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, 31))  # nothing lost or repeated across the requeue
