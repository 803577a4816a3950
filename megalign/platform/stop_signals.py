"""Ctrl-C and SIGTERM as an exception, so that every ``finally`` (temporary files, child
processes) runs for them as for any error."""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM; a BaseException so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_interrupted(signum, frame):
    for stop in STOP_SIGNALS:  # the cleanup this starts must not be interrupted in turn
        signal.signal(stop, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals_raise():
    """Inside: SIGINT and SIGTERM raise ``Interrupted``; the previous handlers come back after."""
    previous = {stop: signal.signal(stop, raise_interrupted) for stop in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
