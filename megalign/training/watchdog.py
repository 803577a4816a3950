"""Bounded failure detection: heartbeats through the rendezvous store, so no rank waits forever.

Why: when a rank dies or stalls, the others block inside a collective until the process-group
timeout (minutes to hours), burning the allocation and hiding the cause. Here every rank's
background thread increments its counter ``beat/<rank>`` in the TCP store the job already
rendezvoused through (MASTER_ADDR:MASTER_PORT: the torchrun agent's store, or rank 0's under
Slurm without torchrun), over a connection of its own with a short timeout. Rank 0 watches every
counter; the other ranks watch rank 0's and an ``abort`` key. Staleness is judged on the local
monotonic clock (when a counter was last seen to change), so clocks need not agree across nodes.
Store traffic is O(world size) per interval.

A rank whose counter has not moved for ``failure_timeout_s`` is declared dead or stalled: the
detecting rank writes the reason to ``abort``, prints it and leaves with ``os._exit`` (its main
thread may be stuck in a collective that will never finish); every other rank sees ``abort``
within one interval and leaves the same way. Losing the store itself for that long (its host
died or is stopped) ends the rank too. A rank that fails with an ordinary error publishes it
through ``abort`` before exiting, so the others stop at once instead of timing out. Worst-case
detection is ``failure_timeout_s`` plus two intervals. Ranks that finish normally mark
themselves ``done`` and are no longer watched.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import sys
import threading
import time
from typing import Optional

import torch.distributed as dist

EXIT_CODE = 1
_ACTIVE: Optional["Watchdog"] = None


class Watchdog:
    def __init__(self, rank: int, world_size: int, interval: float, timeout: float):
        self.rank, self.world_size = rank, world_size
        self.interval, self.timeout = interval, timeout
        self.iteration = 0  # set by the training loop; named in the failure message
        self.address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        client = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
            timeout=datetime.timedelta(seconds=max(2 * interval, 5.0)), wait_for_workers=False,
        )
        self._store = dist.PrefixStore(f"megalign/watchdog/attempt_{attempt}/", client)
        self._watched = [r for r in range(world_size) if r != rank] if rank == 0 else [0]
        now = time.monotonic()
        self._seen = {r: -1 for r in self._watched}
        self._changed = {r: now for r in self._watched}
        self._contact = now
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="megalign-watchdog", daemon=True)

    # ------------------------------------------------------------------ main-thread interface

    def start(self) -> "Watchdog":
        self._store.add(f"beat/{self.rank}", 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Normal end of this rank: stop beating and tell the watchers not to wait for it."""
        self._stopped.set()
        self._thread.join(timeout=2 * self.interval)
        try:
            self._store.set(f"done/{self.rank}", "1")
        except Exception:  # the store's host may have finished first; nothing to tell then
            pass

    def publish_failure(self, reason: str) -> None:
        """This rank is failing: make every other rank stop now rather than at a timeout."""
        try:
            self._store.set("abort", f"rank {self.rank} failed at iteration {self.iteration}: "
                                     f"{reason}")
        except Exception:
            pass

    def await_verdict(self) -> None:
        """After a failed collective: wait (bounded) for the watchdog to name the failed rank;
        it ends the process when it does. Returns only if nothing was found in time."""
        self._thread.join(timeout=self.timeout + 3 * self.interval)

    # ------------------------------------------------------------------ watchdog thread

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval):
            now = time.monotonic()
            try:
                self._store.add(f"beat/{self.rank}", 1)
                if self._store.check(["abort"]):
                    self._exit(f"stopping because {self._store.get('abort').decode()}")
                for rank in list(self._watched):
                    if self._store.check([f"done/{rank}"]):
                        self._watched.remove(rank)
                        continue
                    count = self._store.add(f"beat/{rank}", 0)
                    if count != self._seen[rank]:
                        self._seen[rank], self._changed[rank] = count, now
                self._contact = now
            except Exception as err:  # store unreachable or too slow
                if now - self._contact > self.timeout:
                    self._exit(
                        f"lost contact with the rendezvous store at {self.address} for "
                        f"{now - self._contact:.0f} s ({type(err).__name__}); the process hosting "
                        "it (rank 0, or the torchrun agent) has died or stalled"
                    )
                continue
            silent = [r for r in self._watched if now - self._changed[r] > self.timeout]
            if silent:
                age = now - min(self._changed[r] for r in silent)
                reason = (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} "
                          f"stopped responding: no heartbeat for {age:.0f} s "
                          f"(resilience.failure_timeout_s={self.timeout:g}) during iteration "
                          f"{self.iteration + 1}; it died or is stalled")
                self.publish_failure(f"detected that {reason}")
                self._exit(reason)

    def _exit(self, reason: str) -> None:
        print(f"megalign-train: error on rank {self.rank}: {reason}. Restart the job to resume "
              "from the latest checkpoint.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # os._exit skips the exit handlers that stop helper processes (the checkpoint writer's
        # multiprocessing manager): stop them here, or they outlive the job
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(EXIT_CODE)


def start(rank: int, world_size: int, interval: float, timeout: float) -> Optional[Watchdog]:
    """Start this process's watchdog (none for one process or ``timeout`` 0)."""
    global _ACTIVE
    if world_size > 1 and timeout > 0:
        _ACTIVE = Watchdog(rank, world_size, interval, timeout).start()
    return _ACTIVE


def stop() -> None:
    global _ACTIVE
    if _ACTIVE is not None:
        _ACTIVE.stop()
        _ACTIVE = None


def is_communication_error(err: BaseException) -> bool:
    """A collective or p2p call that failed because a peer went away (not a local bug)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection closed",
                                      "Connection reset", "Broken pipe", "Timed out")
    )


def progress(iteration: int) -> None:
    """Record the iterations completed, for the failure message."""
    if _ACTIVE is not None:
        _ACTIVE.iteration = iteration


def publish_failure(reason: str) -> None:
    """See ``Watchdog.publish_failure``; nothing without a watchdog."""
    if _ACTIVE is not None:
        _ACTIVE.publish_failure(reason)


def await_verdict() -> None:
    """See ``Watchdog.await_verdict``; returns at once without a watchdog."""
    if _ACTIVE is not None:
        _ACTIVE.await_verdict()
