"""Process start-up: rank discovery (torchrun or Slurm), process groups, Megatron parallel state."""

# Imports inside functions are deliberate here: the CPU adapter is imported only without CUDA.

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random

from megalign.platform import collectives


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def launch_env() -> LaunchEnv:
    """Read ranks from torchrun's variables, else from Slurm's (one task per process), else 1."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launch = LaunchEnv(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
        env.setdefault("RANK", str(launch.rank))
        env.setdefault("WORLD_SIZE", str(launch.world_size))
        env.setdefault("LOCAL_RANK", str(launch.local_rank))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        if "MASTER_ADDR" not in env:
            raise RuntimeError(
                "running under Slurm without torchrun: set MASTER_ADDR to the first node's host "
                "name (examples/slurm shows how)"
            )
        return launch
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))  # one process: no peer needs to know it
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    return LaunchEnv(0, 1, 0)


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous no other process needs to find)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize(
    launch: LaunchEnv,
    tensor_parallel: int,
    pipeline_parallel: int,
    seed: int,
    virtual_pipeline_parallel: int | None = None,
    timeout_minutes: float = 10.0,
    store: dist.Store | None = None,
    expert_parallel: int = 1,
    context_parallel: int = 1,
) -> None:
    """Start the process group (NCCL with CUDA, gloo without) and Megatron's model-parallel state.

    ``store``: rendezvous on it instead of MASTER_ADDR:MASTER_PORT (in-process restarts give every
    attempt a fresh one)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
        backend = "nccl"
    else:
        from megalign.platform import cpu

        cpu.apply()
        backend = "gloo"
    if (launch.rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"):
        print("megalign: warning: torchrun restarts with the agent's shared store can hand the "
              "restarted workers stale addresses (pytorch/pytorch#135712); launch torchrun with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr, flush=True)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            store=store,
        )
        if store is not None and backend == "nccl":
            # in-process restart aborts NCCL by destroying its groups, which stops NCCL's kernels
            # only if the world communicator was set up before any subgroup: force that now
            collectives.all_reduce(torch.ones(1, device=device()))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        expert_model_parallel_size=expert_parallel,
        context_parallel_size=context_parallel,
    )
    torch.manual_seed(seed)
    mcore_random.model_parallel_cuda_manual_seed(seed)


def device() -> torch.device:
    return (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))


def shutdown() -> None:
    parallel_state.destroy_model_parallel()  # also after the groups were aborted from outside
    if dist.is_initialized():
        dist.destroy_process_group()
