"""The memory a rank's training actually used, to set beside ``megalign.model.memory``'s plan.

On a GPU that is the CUDA caching allocator's peak of allocated bytes. On CPU it is the process's
peak resident set size less its size when the probe started (after the imports, before any model
is built), so the Python runtime and libraries are left out and what remains is what training
allocated: weights, gradients, optimizer states, activations and the allocator's slack.
"""

from __future__ import annotations

import os
import resource

import torch


def resident_bytes() -> int:
    """This process's current resident set size."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryProbe:
    def __init__(self):
        self.gpu = torch.cuda.is_available()
        if self.gpu:
            torch.cuda.reset_peak_memory_stats()
            self.start = 0
        else:
            self.start = resident_bytes()

    def peak(self) -> int:
        """Bytes above the start at this process's peak so far."""
        if self.gpu:
            return torch.cuda.max_memory_allocated()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start
