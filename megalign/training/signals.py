"""Save-and-exit on SIGTERM/SIGUSR1 (Slurm preemption with ``--signal``, or a manual stop).

The handler only records the signal; the training loop asks ``requested()`` once per iteration,
which agrees across all ranks (a max all-reduce), so every rank saves the same iteration.
"""

from __future__ import annotations

import contextlib
import signal

import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGUSR1)


class ExitOnSignal:
    def __init__(self):
        self.received = None
        for sig in HANDLED:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


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
