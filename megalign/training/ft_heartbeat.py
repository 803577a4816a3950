"""Heartbeats to NVIDIA's ``ft_launcher`` (in-job restart), whenever a job runs under it.

Why: ``ft_launcher`` (nvidia-resiliency-ext's drop-in for torchrun) restarts the worker group
inside the same allocation when a rank hangs, and it can only tell a hang from the rank's
heartbeats: a rank silent for ``--ft-rank-heartbeat-timeout`` seconds (the first heartbeat,
which includes start-up, gets ``--ft-initial-rank-heartbeat-timeout``) is terminated with its
peers, and the group restarts up to ``--max-restarts`` times, each time resuming from the latest
checkpoint like any restart (``checkpoint.auto_resume``). megalign sends one heartbeat per
training iteration whenever the launcher set ``FT_RANK_MONITOR_IPC_SOCKET``; there is nothing to
configure, and without the launcher the package is not needed. A checkpoint save or held-out
evaluation sends none, so the heartbeat timeout must exceed the longest of them.
"""

# Imports inside functions are deliberate here: nvidia-resiliency-ext is optional (only under
# ft_launcher).

from __future__ import annotations

import os

SOCKET_ENV = "FT_RANK_MONITOR_IPC_SOCKET"


class LauncherHeartbeat:
    """Connected to this rank's ft_launcher monitor, or inert when not launched by it."""

    def __init__(self):
        self._client = None
        if not os.environ.get(SOCKET_ENV):
            return
        try:
            from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient
        except ImportError as err:
            raise RuntimeError(
                f"{SOCKET_ENV} is set (launched by ft_launcher) but this Python cannot import "
                "nvidia_resiliency_ext: install it in the environment that runs megalign "
                "(pip install 'megalign[resilience]')"
            ) from err
        self._client = RankMonitorClient()
        self._client.init_workload_monitoring()

    @property
    def active(self) -> bool:
        return self._client is not None

    def beat(self) -> None:
        if self._client is not None:
            self._client.send_heartbeat()

    def close(self) -> None:
        if self._client is not None:
            self._client.shutdown_workload_monitoring()
            self._client = None
