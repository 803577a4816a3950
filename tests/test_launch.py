"""Rank discovery from torchrun's and Slurm's variables."""

import os

import pytest

from megalign.distributed import launch_env

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def restored_environment():
    """launch_env sets torchrun's variables itself (not through monkeypatch): each test leaves
    os.environ as it found it, so no later in-process command sees a world of 8."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launch = launch_env()
    assert (launch.rank, launch.world_size, launch.local_rank) == (3, 8, 1)


def test_slurm_one_task_per_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    launch = launch_env()
    assert (launch.rank, launch.world_size, launch.local_rank) == (5, 8, 1)
    assert os.environ["RANK"] == "5" and os.environ["WORLD_SIZE"] == "8"
    assert os.environ["MASTER_PORT"] == str(20000 + 4242)


def test_slurm_without_master_address_is_a_clear_error(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        launch_env()
