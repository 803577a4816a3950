"""Helper processes that end with their rank, and keep out of the rank's stop signal.

Megatron's checkpoint writer keeps its results queue in a multiprocessing Manager: a spawned
server process, created at the first save and kept for the life of the rank. When a rank is
SIGKILLed (a hard timeout, ft_launcher or torchrun stopping a worker group, the OOM killer),
nothing stops that server: it outlives the rank with a few hundred MB and the rank's stdout and
stderr, so a launcher reading them never sees end-of-file, and every restart leaves one more.
Here the manager is created by megalign, with an initializer that asks the kernel to SIGKILL it
when its parent dies (Linux ``PR_SET_PDEATHSIG``), and its queues are handed to the writers'
caches (Megatron-Core's, and NVRx's where it writes asynchronous saves).
"""

# Imports inside functions are deliberate here: Megatron-Core's checkpoint writer is imported at
# the first save only (the platform layer imports no Megatron module when it is loaded).

from __future__ import annotations

import contextlib
import ctypes
import importlib
import multiprocessing
import signal
import sys
from multiprocessing.managers import SyncManager

PR_SET_PDEATHSIG = 1
# the checkpoint writers that cache a results queue in a module global
_WRITER_MODULES = ("megatron.core.dist_checkpointing.strategies.filesystem_async",
                   "nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async")
_manager: SyncManager | None = None


def die_with_parent() -> None:
    """Runs first in the helper: the kernel kills it when the rank that started it ends."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def own_checkpoint_writer_queue() -> None:
    """Before a save: make the checkpoint writers use results queues whose server dies with us
    (Megatron-Core's, and from Megatron-Core 0.19 NVRx's, which writes asynchronous saves)."""
    global _manager
    if not sys.platform.startswith("linux"):
        return
    for name in _WRITER_MODULES:
        try:
            writer = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(writer, "_results_queue", False) is not None:
            continue  # one was made already, or this version keeps no such cache
        if _manager is None:
            _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            _manager.start(die_with_parent)
        writer._results_queue = _manager.Queue()


@contextlib.contextmanager
def sigusr1_blocked_in_helpers():
    """Processes started inside (dist_checkpointing's writers and results queue) block SIGUSR1.

    Slurm delivers a step's signal to every process of the step; a checkpoint helper dying of it
    would break the very save the signal asks for. The mask is inherited across fork and exec, so
    the helpers never see SIGUSR1, while this rank still does: another thread takes it, or it is
    delivered when the mask is restored. (SIGTERM cannot be kept out this way: multiprocessing
    unblocks it when it starts its resource tracker.)
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
