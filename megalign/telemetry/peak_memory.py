"""The memory a rank's training actually used, to set beside the plan
(``megalign.training.memory_plan``).

The plan counts the bytes of live tensors, so the probe measures the same thing. On a GPU that is
the CUDA caching allocator's peak of allocated bytes. On CPU it is the peak of what malloc holds
in use (glibc's ``mallinfo2``: allocated heap chunks plus mmapped chunks), sampled by a thread
every ``SAMPLE_INTERVAL_S`` and when read, less its value when the probe started (after the
imports, before any model is built). The resident set size would also count the freed memory
glibc keeps for reuse (on the main job about a fifth more than the live bytes, growing over the
first steps); it is the fallback where ``mallinfo2`` is missing (glibc before 2.33, other C
libraries).
"""

from __future__ import annotations

import ctypes
import os
import resource
import threading
from typing import Callable, Optional

import torch

SAMPLE_INTERVAL_S = 0.1


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_in_use_reader() -> Optional[Callable[[], int]]:
    """A function returning the bytes malloc holds in use, or None without glibc's mallinfo2."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype, mallinfo2.argtypes = MallInfo2, []

    def in_use() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


def resident_bytes() -> int:
    """This process's current resident set size."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryProbe:
    def __init__(self):
        self.gpu = torch.cuda.is_available()
        self.in_use = None if self.gpu else heap_in_use_reader()
        self.sampler = None
        if self.gpu:
            torch.cuda.reset_peak_memory_stats()
            self.start = 0
        elif self.in_use:
            self.start = self.highest = self.in_use()
            self.stopped = threading.Event()
            self.sampler = threading.Thread(target=self.sample, name="megalign-memory-probe",
                                            daemon=True)
            self.sampler.start()
        else:
            self.start = resident_bytes()

    @property
    def method(self) -> str:
        """What ``peak`` measures, as memory.json records it."""
        if self.gpu:
            return "cuda max_memory_allocated"
        return "malloc in use (mallinfo2)" if self.in_use else "resident set size"

    def sample(self) -> None:
        while not self.stopped.wait(SAMPLE_INTERVAL_S):
            self.highest = max(self.highest, self.in_use())

    def peak(self) -> int:
        """Bytes above the start at this process's peak so far."""
        if self.gpu:
            return torch.cuda.max_memory_allocated()
        if self.in_use:
            self.highest = max(self.highest, self.in_use())
            return self.highest - self.start
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start

    def close(self) -> None:
        if self.sampler is not None:
            self.stopped.set()
            self.sampler.join()
            self.sampler = None
