"""Checkpoints: exact resume after kill -9, resharding, atomic saves, clear errors, no NaN."""

import json
import os
import re
import shutil
import signal
import time

import psutil
import pytest

from conftest import TINY_CONFIG, WORKERS, finish, kill_group, launch, metrics, torchrun

ITERS = 30
TRAIN = ["-m", "megalign.cli.train", "--config", str(TINY_CONFIG), f"schedule.train_iters={ITERS}",
         "schedule.warmup_iters=2", "data.global_batch_size=4", "logging.log_interval=1",
         "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_overrides):
    run = tmp_path_factory.mktemp("full")
    code, out, err = finish(launch(2, [*TRAIN, *data_overrides, f"logging.run_dir={run}",
                                       f"checkpoint.save={run}/ckpt",
                                       "checkpoint.save_interval=3"]))
    assert code == 0, err[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("saving", ["sync", pytest.param("async", marks=pytest.mark.compat)])
def test_kill_9_then_resume_gives_identical_losses(tmp_path, data_overrides, uninterrupted, saving):
    """Killed mid-run (async: interval saves written in the background, perhaps mid-write), the
    run resumes from its 'latest' with exactly the losses of a run never interrupted."""
    run = tmp_path / "killed"
    common = [*TRAIN, *data_overrides, f"checkpoint.save={run}/ckpt",
              "checkpoint.save_interval=3", f"checkpoint.async_save={saving == 'async'}"]
    process = launch(2, [*common, f"logging.run_dir={run}"])
    deadline = time.time() + 300
    while 10 not in metrics(run):
        assert time.time() < deadline and process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.01)
    kill_group(process)
    latest = (run / "ckpt" / "latest").read_text().strip()
    # a background save is published at a later iteration: the one before may still be latest
    assert int(latest[5:]) in ((6, 9, 12, 15) if saving == "async" else (9, 12, 15)), latest
    resumed = tmp_path / "resumed"
    code, out, err = finish(launch(2, [*common, f"logging.run_dir={resumed}",
                                       f"checkpoint.load={run}/ckpt"]))
    assert code == 0, err[-3000:]
    assert "> resumed from" in out
    full, after = metrics(uninterrupted), metrics(resumed)
    assert sorted(after) == list(range(int(latest[5:]) + 1, ITERS + 1)), (latest, sorted(after))
    for iteration, record in after.items():
        for key in ("loss", "diffusion_loss", "align_loss", "lr"):
            assert record[key] == full[iteration][key], (iteration, key)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp, nproc", [(2, 2, 4), (1, 1, 1)])
def test_resume_into_another_layout(tmp_path, data_overrides, uninterrupted, tp, pp, nproc):
    """Model and optimizer state reshard: the next step's loss matches the original layout's."""
    run = tmp_path / "resharded"
    torchrun(nproc, "-m", [*TRAIN[1:], *data_overrides, f"logging.run_dir={run}",
                           f"parallel.tensor_model_parallel_size={tp}",
                           f"parallel.pipeline_model_parallel_size={pp}",
                           f"checkpoint.load={uninterrupted}/ckpt/iter_{ITERS - 3:07d}"])
    full, after = metrics(uninterrupted), metrics(run)
    assert sorted(after) == [ITERS - 2, ITERS - 1, ITERS]
    for iteration in after:
        assert after[iteration]["loss"] == pytest.approx(full[iteration]["loss"], rel=1e-5)


@pytest.mark.slow
def test_distributed_optimizer_resumes_exactly_also_at_another_dp_size(tmp_path, data_overrides):
    """Megatron's distributed optimizer at DP2 (its states sharded over the two DP ranks): resumed
    at DP2 the losses are bit-identical, at DP1 equal to float rounding; resuming its checkpoint
    with the plain optimizer is refused in one line."""
    common = [*TRAIN, *data_overrides, "optimizer.distributed=true", "schedule.train_iters=6",
              "checkpoint.save_interval=3"]
    full, ckpt = tmp_path / "full", tmp_path / "full" / "ckpt"
    torchrun(4, "-m", [*common[1:], f"logging.run_dir={full}", f"checkpoint.save={ckpt}"])
    resumed = {}
    for nproc in (4, 2):
        run = tmp_path / f"resumed{nproc}"
        torchrun(nproc, "-m", [*common[1:], f"logging.run_dir={run}",
                               f"checkpoint.load={ckpt}/iter_0000003"])
        resumed[nproc] = metrics(run)
    reference = metrics(full)
    assert sorted(resumed[4]) == sorted(resumed[2]) == [4, 5, 6]
    for iteration in (4, 5, 6):
        assert resumed[4][iteration]["loss"] == reference[iteration]["loss"], iteration
        assert resumed[2][iteration]["loss"] == pytest.approx(reference[iteration]["loss"],
                                                              rel=1e-5)
    code, out, err = finish(launch(2, [*common, "optimizer.distributed=false",
                                       f"logging.run_dir={tmp_path}/plain",
                                       f"checkpoint.load={ckpt}/iter_0000003"]))
    assert code != 0
    assert "holds distributed optimizer states; resume it with optimizer.distributed=true" in err
    assert "]: Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("saving", ["sync", pytest.param("async", marks=pytest.mark.compat)])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, data_overrides, saving):
    """kill -9 of every rank (and a background save's writers) while a checkpoint is written:
    'latest' still names a complete checkpoint, and the run resumes from it."""
    run = tmp_path / "saving"
    root = run / "ckpt"
    process = launch(2, [*TRAIN, *data_overrides, f"logging.run_dir={run}",
                         f"checkpoint.save={root}", "checkpoint.save_interval=1",
                         "schedule.train_iters=200", f"checkpoint.async_save={saving == 'async'}"])
    deadline = time.time() + 300
    while not (root / "latest").exists() or not any(p.endswith(".tmp") for p in os.listdir(root)):
        assert time.time() < deadline and process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.002)
    kill_group(process)  # in the middle of writing a checkpoint
    latest = (root / "latest").read_text().strip()
    assert (root / latest / "metadata.json").is_file()
    code, out, err = finish(launch(2, [*TRAIN, *data_overrides, f"logging.run_dir={run}/2",
                                       f"checkpoint.load={root}", "schedule.warmup_iters=0",
                                       f"schedule.train_iters={int(latest[5:]) + 1}"]))
    assert code == 0, err[-3000:]
    assert f"resumed from {root}" in out


@pytest.mark.slow
def test_corrupt_or_incomplete_checkpoint_is_a_clear_error(tmp_path, data_overrides, uninterrupted):
    broken = tmp_path / "broken"
    shutil.copytree(uninterrupted / "ckpt" / "iter_0000003", broken)
    shard = next(p for p in sorted(broken.iterdir()) if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    incomplete = tmp_path / "incomplete"
    shutil.copytree(uninterrupted / "ckpt" / "iter_0000003", incomplete)
    (incomplete / "metadata.json").unlink()
    for path, message in ((broken, "truncated or corrupt"), (incomplete, "not a complete")):
        code, out, err = finish(launch(2, [*TRAIN, *data_overrides,
                                           f"logging.run_dir={tmp_path}/run",
                                           f"checkpoint.load={path}"]))
        assert code != 0
        assert message in err and str(path) in err, err[-3000:]
        assert "megalign-train: error on rank" in err
        assert "]: Traceback" not in err  # no worker traceback (torchrun adds its own summary)


def test_nan_is_never_checkpointed(tmp_path, data_overrides, ar_checkpoint):
    torchrun(1, WORKERS / "poison_checkpoint.py", ["--config", TINY_CONFIG, "--checkpoint",
                                                   ar_checkpoint, "--out", tmp_path,
                                                   *data_overrides])
    outcome = json.loads((tmp_path / "result.json").read_text())["outcome"]
    assert "NaN/inf parameters" in outcome
    assert not (tmp_path / "ckpt" / "iter_0000001").exists()
    assert not (tmp_path / "ckpt" / "latest").exists()
    # a diverging run stops with the iteration named, before writing anything for it
    run = tmp_path / "diverge"
    code, out, err = finish(launch(2, [*TRAIN, *data_overrides, f"logging.run_dir={run}",
                                       f"checkpoint.save={run}/ckpt", "checkpoint.save_interval=1",
                                       "optimizer.lr=1e30", "optimizer.min_lr=1e30",
                                       "optimizer.clip_grad=0", "schedule.warmup_iters=0"]))
    assert code != 0
    assert "loss is nan" in err or "loss is inf" in err or "NaN/inf parameters" in err, err[-2000:]
    failed_at = (int(re.search(r"iteration (\d+): loss is", err).group(1)) if "loss is" in err
                 else None)
    saved = sorted(p for p in os.listdir(run / "ckpt") if re.fullmatch(r"iter_\d{7}", p))
    assert all((run / "ckpt" / p / "metadata.json").is_file() for p in saved)
    if failed_at is not None:  # nothing at or after the iteration whose loss was not finite
        assert all(int(p[5:]) < failed_at for p in saved), (failed_at, saved)


@pytest.mark.slow
def test_sigusr1_saves_and_stops(tmp_path, data_overrides):
    """Slurm's --signal: a signal to any one rank makes every rank save the same iteration."""
    run = tmp_path / "signalled"
    process = launch(2, [*TRAIN, *data_overrides, f"logging.run_dir={run}",
                         f"checkpoint.save={run}/ckpt", "schedule.train_iters=500"])
    deadline = time.time() + 300
    while 3 not in metrics(run):
        assert time.time() < deadline and process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.02)
    workers = [p for p in psutil.Process(process.pid).children()
               if "megalign.cli.train" in " ".join(p.cmdline())]
    workers[-1].send_signal(signal.SIGUSR1)  # one rank only
    code, out, err = finish(process)
    assert code == 0, err[-3000:]
    assert "stopping after iteration" in out
    stopped = max(metrics(run))
    assert stopped < 500
    assert (run / "ckpt" / "latest").read_text().strip() == f"iter_{stopped:07d}"


@pytest.mark.unit
def test_async_saves_take_the_writer_megatron_core_prefers():
    """Megatron-Core's own queue on 0.16; NVRx's from 0.19, which deprecates Megatron-Core's."""
    from megalign.checkpoint import async_save_queue
    from megalign.platform.releases import megatron_core_at_least

    expected = "nvidia_resiliency_ext." if megatron_core_at_least("0.19.0") else "megatron.core."
    assert type(async_save_queue()).__module__.startswith(expected)


@pytest.mark.unit
def test_async_saves_without_nvrx_on_megatron_core_019_are_refused_in_one_line(monkeypatch):
    from megalign import checkpoint
    from megalign.errors import CheckpointError

    monkeypatch.setattr(checkpoint, "megatron_core_at_least", lambda release: True)
    monkeypatch.setattr(checkpoint.torch_strategy, "HAVE_NVRX", False, raising=False)
    with pytest.raises(CheckpointError, match=r"nvidia-resiliency-ext>=0\.6.*async_save=false"):
        checkpoint.async_save_queue()
