"""In-process restart with NVIDIA's resiliency extension (``resilience.inprocess_restart``).

Why: most faults of a long run leave the processes alive: an exception on one rank, a collective
that errors because a peer failed, a rank whose main thread stops making progress. Restarting
the job for them costs new processes, imports, rendezvous and data-index loading on every node.
nvidia-resiliency-ext's ``inprocess.Wrapper`` instead aborts the process groups on every rank,
lets us tear down Megatron's parallel state, and calls the training function again in the same
processes. Each attempt rebuilds its process groups in a fresh namespace (``attempt_<n>/``) of a
TCP store that outlives the attempts (the launcher's store on MASTER_PORT under torchrun and
ft_launcher, else one rank 0 hosts there; the wrapper's own store is on a port rank 0 finds free
and shares through it, never a guess such as MASTER_PORT+1 that another process may hold) and
resumes from the latest checkpoint like any restart (``checkpoint.auto_resume``).

Detection is the wrapper's, so megalign's own watchdog is off in this mode: a monitor process
per rank declares a rank dead after ``resilience.failure_timeout_s`` without heartbeats, and a
rank whose main thread runs no Python code for that long (stuck in a collective) is interrupted
(soft timeout) or, ``failure_timeout_s`` later, terminated (hard timeout). Without spare ranks a
dead rank cannot be replaced in-process: the wrapper then stops every rank, and the launcher's
restart (torchrun ``--max-restarts``, ``ft_launcher``, Slurm requeue) starts a new job, which
resumes the same way. Errors that a restart cannot fix (configuration, data, checkpoint, a
non-finite loss) stop at once instead of being retried.
"""

# Imports inside functions are deliberate here: nvidia-resiliency-ext is optional
# (resilience.inprocess_restart).

import contextlib
import datetime
import gc
import os
import sys
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from megalign.config import Config


class Unrecoverable(BaseException):
    """Raised inside an attempt for an error a restart cannot fix; a ``BaseException`` so the
    wrapper ends instead of restarting. ``error`` is the original exception."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class RestartsExhausted(RuntimeError):
    """The wrapper gave up: too many restarts, or fewer ranks than the layout needs."""


def release_gloo_groups(err: Exception) -> None:
    """Close this rank's gloo connections now. gloo cannot abort an operation in flight (NCCL
    can, and the wrapper does): a peer blocked in a collective with this rank is released only
    when this rank's sockets close, i.e. when the last reference to its groups goes, and the
    failed attempt's frames (model, optimizer, Megatron's state) hold them until collected."""
    from megalign import distributed

    seen = set()
    while err is not None and id(err) not in seen:  # the whole chain: causes hold frames too
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__
    distributed.shutdown()
    gc.collect()


@contextlib.contextmanager
def _gpu_health_checks_only_with_a_gpu(gpu: bool):
    """From NVRx 0.7 the wrapper adds GPU, NVLink and NIC health checks of ``LOCAL_RANK``'s
    device to the restart whenever ``LOCAL_RANK`` is set; without a GPU (no NVML) the GPU check
    fails and ends every restart, so there it is built with ``LOCAL_RANK`` out of view."""
    local_rank = None if gpu else os.environ.pop("LOCAL_RANK", None)
    try:
        yield
    finally:
        if local_rank is not None:
            os.environ["LOCAL_RANK"] = local_rank


def restartable(cfg: Config, attempt: Callable[[dist.Store], None]) -> Callable[[], None]:
    """``attempt(store)`` trains once, creating its process groups on ``store``; the returned
    function runs it under the wrapper, again after each fault, until it finishes."""
    from nvidia_resiliency_ext import inprocess
    from nvidia_resiliency_ext.inprocess.exception import RestartAbort

    from megalign import distributed
    from megalign.errors import first_line

    r = cfg.resilience
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    collective_timeout = datetime.timedelta(minutes=r.collective_timeout_minutes)
    launcher_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    attempts_store = dist.TCPStore(address, port, world, is_master=rank == 0 and not launcher_store,
                                   timeout=collective_timeout,
                                   wait_for_workers=not launcher_store)
    # one namespace per launch: a launcher's restart of the whole job reuses its store
    namespace = f"megalign/inprocess/launch_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    if rank == 0:
        attempts_store.set(namespace + "wrapper_port", str(distributed.free_port()))
    wrapper_port = int(attempts_store.get(namespace + "wrapper_port"))
    failures: list[str] = []

    class TearDown(inprocess.finalize.Finalize):
        """After the wrapper destroyed the process groups: forget Megatron's parallel state."""

        def __call__(self, state):
            distributed.shutdown()
            return state

    gpu = torch.cuda.is_available()
    abort = (inprocess.Compose(inprocess.abort.AbortTransformerEngine(),
                               inprocess.abort.AbortTorchDistributed())
             if gpu else inprocess.abort.AbortTorchDistributed())
    timeout = datetime.timedelta(seconds=r.failure_timeout_s)
    with _gpu_health_checks_only_with_a_gpu(gpu):
        wrapper = inprocess.Wrapper(
            store_kwargs={"host_name": address, "port": wrapper_port,
                          "timeout": collective_timeout},
            initialize=inprocess.initialize.RetryController(
                max_iterations=r.inprocess_max_restarts + 1, min_world_size=world,
                min_active_world_size=world),
            abort=abort,
            finalize=TearDown(),
            health_check=(inprocess.health_check.CudaHealthCheck(
                timeout=datetime.timedelta(seconds=10)) if gpu else None),
            heartbeat_interval=datetime.timedelta(seconds=r.heartbeat_interval_s),
            heartbeat_timeout=timeout,
            soft_timeout=timeout,
            hard_timeout=2 * timeout,
            barrier_timeout=collective_timeout,
            completion_timeout=collective_timeout,
        )

    @wrapper
    def run_attempts(call: inprocess.CallWrapper = None):
        if call.iteration:
            print(f"megalign: rank {rank}: in-process restart {call.iteration} of at most "
                  f"{r.inprocess_max_restarts} (resilience.inprocess_max_restarts) after: "
                  f"{failures[-1] if failures else 'a fault on another rank'}",
                  file=sys.stderr, flush=True)
        try:
            attempt(dist.PrefixStore(f"{namespace}attempt_{call.iteration}/", attempts_store))
        except (Exception, Unrecoverable) as err:
            failures.append(first_line(err))
            if not gpu:
                with call.atomic():  # not while the wrapper's abort runs
                    release_gloo_groups(err)
            raise

    def run() -> None:
        try:
            run_attempts()
        except RestartAbort as err:
            raise RestartsExhausted(
                f"in-process restart gave up: a rank stopped for good (an error a restart cannot "
                f"fix, or it died; all {world} ranks are needed) or resilience."
                f"inprocess_max_restarts={r.inprocess_max_restarts} was reached [{err}]; last "
                f"failure on this rank: {failures[-1] if failures else 'none'}") from err

    return run
