"""Fault injection: dead and stalled ranks end the job within the bound, torchrun restarts resume
exactly, failed saves keep the previous checkpoint, data files that change are named, and
crafted pickles are refused."""

import contextlib
import dataclasses
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megalign.distributed import free_port

from conftest import REPO, TINY_CONFIG, finish, launch, metrics, run_env, run_python

pytestmark = pytest.mark.slow

HEARTBEAT, FAILURE_TIMEOUT = 1, 6
BOUND = FAILURE_TIMEOUT + 2 * HEARTBEAT  # documented worst case of the watchdog
SLACK = 10  # process exit and a loaded 2-core machine
TRAIN = ["-m", "megalign.cli.train", "--config", str(TINY_CONFIG), "schedule.warmup_iters=2",
         "data.global_batch_size=4", "logging.log_interval=1",
         "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
         f"resilience.heartbeat_interval_s={HEARTBEAT}",
         f"resilience.failure_timeout_s={FAILURE_TIMEOUT}"]


SINGLE = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]


@pytest.fixture
def tagged_env(tmp_path):
    """The environment for this test's jobs, tagged so that every process they leave behind is
    killed afterwards: a SIGKILLed rank's checkpoint-writer manager process outlives it."""
    env = dict(run_env(), MEGALIGN_TEST_TAG=str(tmp_path))
    yield env
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("MEGALIGN_TEST_TAG") == str(tmp_path):
                process.kill()


def start_ranks(tmp_path, env: dict, world: int, args: list) -> list:
    """One process per rank with no launcher around them (as srun starts them): each rank's
    exit code and stderr are its own."""
    port, processes = free_port(), []
    for rank in range(world):
        env = dict(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(tmp_path / f"rank{rank}.err", "w") as err:
            processes.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env,
                                              stdout=subprocess.DEVNULL, stderr=err))
    return processes


def wait_for_iteration(run_dir, iteration: int, processes) -> None:
    deadline = time.time() + 300
    while iteration not in metrics(run_dir):
        assert time.time() < deadline, "training did not start"
        assert all(p.poll() is None for p in processes), "a rank exited before the fault"
        time.sleep(0.02)


def seconds_until_exit(processes, limit: float) -> float:
    start = time.monotonic()
    for process in processes:
        try:
            process.wait(timeout=max(limit - (time.monotonic() - start), 0.1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"ranks still running {limit:.0f} s after the fault")
    return time.monotonic() - start


@pytest.mark.parametrize("victim, fault", [(1, signal.SIGKILL), (0, signal.SIGKILL),
                                           (1, signal.SIGSTOP)])
def test_a_dead_or_stalled_rank_ends_every_rank_within_the_bound(tmp_path, tagged_env,
                                                                 data_overrides, victim, fault):
    run = tmp_path / "run"
    processes = start_ranks(tmp_path, tagged_env, 2, [*TRAIN, *data_overrides,
                                                      f"logging.run_dir={run}",
                                                      "schedule.train_iters=100000"])
    try:
        wait_for_iteration(run, 3, processes)
        processes[victim].send_signal(fault)
        survivor = 1 - victim
        elapsed = seconds_until_exit([processes[survivor]], BOUND + SLACK)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    err = (tmp_path / f"rank{survivor}.err").read_text()
    print(f"victim rank {victim}, {signal.Signals(fault).name}: survivor exited after "
          f"{elapsed:.1f} s (bound {BOUND} s)")
    assert processes[survivor].returncode != 0
    assert f"megalign-train: error on rank {survivor}:" in err, err[-3000:]
    if victim == 0:  # rank 0's process hosted the rendezvous store
        assert "lost contact with the rendezvous store" in err, err[-3000:]
    else:
        assert f"rank {victim} stopped responding" in err, err[-3000:]
        assert "Traceback" not in err, err[-3000:]


RESTARTED = ["schedule.train_iters=40", "checkpoint.save_interval=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_overrides) -> dict:
    """metrics.jsonl of the run that the restarted runs must reproduce exactly."""
    full = tmp_path_factory.mktemp("uninterrupted")
    code, _, err = finish(launch(2, [*TRAIN, *data_overrides, *RESTARTED,
                                     f"logging.run_dir={full}", f"checkpoint.save={full}/ckpt"]))
    assert code == 0, err[-3000:]
    return metrics(full)


def assert_same_run(got: dict, expected: dict) -> None:
    assert sorted(got) == list(range(1, 41))
    for iteration in range(1, 41):
        for key in ("loss", "diffusion_loss", "align_loss", "lr"):
            assert got[iteration][key] == expected[iteration][key], (iteration, key)


def test_torchrun_restart_resumes_from_latest_and_matches_an_uninterrupted_run(
        tmp_path, tagged_env, data_overrides, uninterrupted):
    common = [*TRAIN, *data_overrides, *RESTARTED]
    run, log = tmp_path / "restarted", tmp_path / "restarted.log"
    # output to a file: the killed rank's orphaned helper would hold a pipe open
    with open(log, "w") as output:
        process = launch(2, [*common, f"logging.run_dir={run}", f"checkpoint.save={run}/ckpt"],
                         launcher=["--max-restarts=1"], stdout=output, stderr=subprocess.STDOUT,
                         env=dict(tagged_env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    wait_for_iteration(run, 12, [process])
    # torchrun's own children only: a worker's checkpoint helpers carry its environment too
    rank1 = next(p for p in psutil.Process(process.pid).children()
                 if p.environ().get("RANK") == "1")
    rank1.kill()
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert out.count("> resumed from") == 1, out[-3000:]  # found 'latest' by itself
    assert_same_run(metrics(run), uninterrupted)


def test_multi_node_rendezvous_restart_matches_an_uninterrupted_run(
        tmp_path, tagged_env, data_overrides, uninterrupted):
    """Two torchrun agents ("nodes", one worker each) meet through a c10d rendezvous; killing
    node 1's worker restarts the workers of both nodes, which resume from the latest checkpoint."""
    run, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    env = dict(tagged_env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    agents = []
    for node in range(2):
        with open(tmp_path / f"node{node}.log", "w") as output:
            agents.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                 "--nproc-per-node=1", "--max-restarts=1", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={endpoint}", "--rdzv-id=megalign-test",
                 f"--rdzv-conf=is_host={str(node == 0).lower()}", *TRAIN, *data_overrides,
                 *RESTARTED, "resilience.failure_timeout_s=30",  # no false alarm under load
                 f"logging.run_dir={run}", f"checkpoint.save={run}/ckpt"],
                cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True))
    wait_for_iteration(run, 12, agents)
    next(iter(psutil.Process(agents[1].pid).children())).kill()
    for node, agent in enumerate(agents):
        assert agent.wait(timeout=600) == 0, (tmp_path / f"node{node}.log").read_text()[-3000:]
    logs = "".join((tmp_path / f"node{node}.log").read_text() for node in range(2))
    assert logs.count("> resumed from") == 1, logs[-3000:]
    assert_same_run(metrics(run), uninterrupted)


@pytest.mark.compat  # NVRx's release differs by Megatron-Core release
def test_inprocess_restart_after_an_exception_matches_an_uninterrupted_run(
        tmp_path, tagged_env, data_overrides, uninterrupted):
    """nvidia-resiliency-ext's in-process restart: rank 1 raises in iteration 12, rank 0 is
    blocked in a collective with it; both restart in the same processes and resume."""
    run = tmp_path / "run"
    code, out, err = finish(launch(2, [
        str(REPO / "tests/workers/raise_once.py"), "--rank", "1", "--iteration", "12",
        "--marker", str(tmp_path / "raised"), *TRAIN[2:], *data_overrides, *RESTARTED,
        "resilience.inprocess_restart=true", "resilience.failure_timeout_s=30",
        f"logging.run_dir={run}", f"checkpoint.save={run}/ckpt"],
        env=dict(tagged_env, TORCH_CPP_LOG_LEVEL="error")))
    assert code == 0, err[-3000:]
    assert (tmp_path / "raised").exists()
    assert "rank 1: in-process restart 1 of at most 3" in err, err[-3000:]
    assert "RuntimeError: injected fault at iteration 12" in err, err[-3000:]
    assert out.count("> resumed from") == 1, out[-3000:]
    assert_same_run(metrics(run), uninterrupted)


@pytest.mark.compat  # NVRx's release differs by Megatron-Core release
def test_inprocess_restart_does_not_retry_an_error_the_user_must_fix(tmp_path, tagged_env,
                                                                     data_overrides):
    run = tmp_path / "run"
    start = time.monotonic()
    code, _, err = finish(launch(2, [
        str(REPO / "tests/workers/raise_once.py"), "--unrecoverable", "--rank", "1",
        "--iteration", "3", "--marker", str(tmp_path / "raised"), *TRAIN[2:], *data_overrides,
        "resilience.inprocess_restart=true", "resilience.failure_timeout_s=30",
        f"logging.run_dir={run}", "schedule.train_iters=10"],
        env=dict(tagged_env, TORCH_CPP_LOG_LEVEL="error")))
    elapsed = time.monotonic() - start
    assert code != 0
    assert "megalign-train: error on rank 1: injected fault at iteration 3" in err, err[-3000:]
    assert "in-process restart 1" not in err, err[-3000:]
    assert "error on rank 0: in-process restart gave up: a rank stopped for good" in err, \
        err[-3000:]
    assert elapsed < 120, f"{elapsed:.0f} s: the stop waited for a timeout"


@pytest.mark.compat  # NVRx's release differs by Megatron-Core release
def test_ft_launcher_restarts_a_hung_rank_and_the_run_matches(
        tmp_path, tagged_env, data_overrides, uninterrupted):
    """nvidia-resiliency-ext's in-job restart: megalign's own watchdog is off, rank 1 is stopped
    (SIGSTOP) in iteration 12; ft_launcher sees its heartbeats stop, restarts the worker group,
    and the run resumes from the latest checkpoint."""
    run, log = tmp_path / "run", tmp_path / "run.log"
    ft_launcher = ["-m", "nvidia_resiliency_ext.fault_tolerance.launcher", "--standalone",
                   "--nproc-per-node=2", "--max-restarts=1", "--ft-rank-heartbeat-timeout=10",
                   "--ft-initial-rank-heartbeat-timeout=300", "--ft-workload-check-interval=1"]
    args = [*TRAIN, *data_overrides, *RESTARTED, "resilience.failure_timeout_s=0",
            f"logging.run_dir={run}", f"checkpoint.save={run}/ckpt"]
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, *ft_launcher, *args], cwd=REPO,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(tagged_env, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    wait_for_iteration(run, 12, [process])
    rank1 = next(p for p in psutil.Process(process.pid).children(recursive=True)
                 if p.environ().get("RANK") == "1" and "megalign.cli.train" in p.cmdline())
    rank1.send_signal(signal.SIGSTOP)
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert "> ft_launcher: one heartbeat per iteration" in out, out[-3000:]
    assert "will restart worker group" in out, out[-3000:]
    assert out.count("> resumed from") == 1, out[-3000:]
    assert_same_run(metrics(run), uninterrupted)


@pytest.mark.compat  # NVRx's release differs by Megatron-Core release
def test_a_killed_rank_leaves_no_checkpoint_helper_behind(tmp_path, tagged_env, data_overrides):
    """Megatron's checkpoint writer serves its results queue from a spawned manager process;
    megalign makes it die with the rank, or a SIGKILLed rank would leave it running."""
    run = tmp_path / "run"
    rank = subprocess.Popen([sys.executable, *TRAIN, *data_overrides, *SINGLE,
                             "schedule.train_iters=100000", "checkpoint.save_interval=1",
                             f"logging.run_dir={run}", f"checkpoint.save={run}/ckpt"],
                            cwd=REPO, env=tagged_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_iteration(run, 2, [rank])
    helpers = psutil.Process(rank.pid).children(recursive=True)
    assert any("spawn_main" in " ".join(p.cmdline()) for p in helpers), helpers
    rank.kill()
    rank.wait()
    gone, alive = psutil.wait_procs(helpers, timeout=10)
    assert not alive, [p.cmdline() for p in alive]


@contextlib.contextmanager
def small_filesystem(path, megabytes: int, read_only: bool = False):
    """A tmpfs of the given size: a disk that fills up (or refuses writes) for real."""
    path.mkdir()
    options = f"size={megabytes}m" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, data_overrides, policy):
    # one checkpoint of this model (weights + Adam moments) is ~5.6 MB: the second one won't fit
    with small_filesystem(tmp_path / "disk", 10) as disk:
        run, root = tmp_path / "run", disk / "ckpt"
        code, out, err = finish(launch(2, [*TRAIN, *data_overrides, f"logging.run_dir={run}",
                                           "align.weight=0", "schedule.train_iters=6",
                                           f"checkpoint.save={root}", "checkpoint.save_interval=2",
                                           f"checkpoint.on_save_failure={policy}"]))
        assert code != 0
        assert f"could not write checkpoint '{root}/iter_0000004'" in err or (
            policy == "continue" and f"could not write checkpoint '{root}/iter_0000006'" in err
        ), err[-3000:]
        assert "previous checkpoint and 'latest' are unchanged" in err
        assert (root / "latest").read_text().strip() == "iter_0000002"
        assert sorted(os.listdir(root)) == ["iter_0000002", "latest"]  # no partial directory
        assert max(metrics(run)) == (4 if policy == "stop" else 6)
        if policy == "continue":
            assert "training continues (checkpoint.on_save_failure=continue)" in out
        resumed = run_python([*TRAIN, *data_overrides, "align.weight=0",
                              "parallel.pipeline_model_parallel_size=1", "schedule.train_iters=3",
                              f"logging.run_dir={tmp_path}/resumed", f"checkpoint.load={root}"])
        assert "resumed from" in resumed.stdout


def test_a_read_only_checkpoint_directory_is_a_clear_error(tmp_path, data_overrides):
    with small_filesystem(tmp_path / "ro", 1, read_only=True) as disk:
        result = run_python([*TRAIN, *data_overrides, "align.weight=0", "schedule.train_iters=3",
                             "parallel.pipeline_model_parallel_size=1",
                             f"logging.run_dir={tmp_path}/run", f"checkpoint.save={disk}/ckpt"],
                            check=False)
    assert result.returncode == 1
    assert "could not write checkpoint" in result.stderr and "Read-only file system" in \
        result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_data_file_that_changes_mid_run_is_named(tmp_path, tagged_env, corpus_prefix,
                                                   data_overrides, damage):
    prefix = tmp_path / "data" / "kjv"
    prefix.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus_prefix + suffix, str(prefix) + suffix)
    overrides = [o for o in data_overrides if not o.startswith("data.paths")]
    run = tmp_path / "run"
    processes = start_ranks(tmp_path, tagged_env, 1, [*TRAIN, *overrides, f"data.paths=[{prefix}]",
                                          "parallel.pipeline_model_parallel_size=1",
                                          f"logging.run_dir={run}", "schedule.train_iters=100000"])
    bin_file = tmp_path / "data" / "kjv.bin"
    try:
        wait_for_iteration(run, 3, processes)
        if damage == "delete":
            bin_file.unlink()
        else:  # by one byte: the mapped pages stay readable, only the guard can notice
            os.truncate(bin_file, bin_file.stat().st_size - 1)
        seconds_until_exit(processes, 60)
    finally:
        processes[0].kill()
        processes[0].wait()
    err = (tmp_path / "rank0.err").read_text()
    assert processes[0].returncode == 1
    expected = "disappeared during training" if damage == "delete" else "changed during training"
    assert f"dataset file '{bin_file}' {expected}" in err, err[-3000:]


class _RunsCode:
    """What an attacker pickles: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _craft_a_pickled_object(checkpoint, payload: bytes) -> None:
    """Points the first pickled object of the ``.distcp`` files (a random state, or Megatron-Core
    0.19's common state) at ``payload``, appended to its file, as an attacker would."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    index, where = next((index, where) for index, where in metadata.storage_data.items()
                        if isinstance(metadata.state_dict_metadata[index.fqn],
                                      BytesStorageMetadata))
    shard = checkpoint / where.relative_path
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + payload)
    metadata.storage_data[index] = dataclasses.replace(where, offset=offset, length=len(payload))
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))


@pytest.mark.compat
@pytest.mark.parametrize("part", [".metadata", "common.pt", ".distcp"])
def test_a_checkpoint_crafted_to_run_code_is_refused(tmp_path, ar_checkpoint, part):
    """Neither megalign nor torch.distributed.checkpoint (which unpickles the objects of the
    .distcp files with weights_only=False) runs code a crafted checkpoint holds."""
    from megalign.checkpoint import resolve
    from megalign.errors import CheckpointError

    crafted, marker = tmp_path / "crafted", tmp_path / "pwned"
    shutil.copytree(ar_checkpoint, crafted)
    if part == ".distcp":
        _craft_a_pickled_object(crafted, pickle.dumps(_RunsCode(marker)))
    else:
        (crafted / part).write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match="refusing to load checkpoint"):
        resolve(str(crafted))
    result = run_python(["-m", "megalign.cli.generate", "--checkpoint", crafted, "--prompt", "In"],
                        check=False)
    assert result.returncode != 0 and "refusing to load checkpoint" in result.stderr, \
        result.stderr[-3000:]
    assert not marker.exists()
    resolve(ar_checkpoint)  # the genuine checkpoint passes the same check
