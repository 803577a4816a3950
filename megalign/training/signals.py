"""Save-and-exit on SIGTERM/SIGUSR1 (Slurm preemption with ``--signal``, or a manual stop).

The handler only records the signal; the training loop asks ``requested()`` once per iteration,
which agrees across all ranks (a max all-reduce), so every rank saves the same iteration.
"""

from __future__ import annotations

import signal

import torch

from megalign.platform import collectives

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
        collectives.all_reduce(flag, op=collectives.ReduceOp.MAX)
        return bool(flag.item())
