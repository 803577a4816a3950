"""The errors a user acts on, in one place, and how one is told in one line.

Each names what is wrong (the config key, the file and line, the checkpoint directory, the rank)
and what to do. Commands report them as ``<command>: error: <message>`` with exit code 2 (bad
input) or 1 (the run failed), never with a traceback; in-process restart never retries them.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the key and how to fix it."""


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory."""


class ConversionError(ValueError):
    """Unsupported architecture or mismatching tensors; the message lists what is wrong."""


class TrainingError(RuntimeError):
    """A failure during training that the user can act on (NaN loss, bad freeze pattern, ...)."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, ConversionError, TrainingError)


def first_line(err: BaseException) -> str:
    """The root cause in one line (for torch.distributed.checkpoint: the first rank's error)."""
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(failures, dict) and failures:
        err = next(iter(failures.values()))[0]
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {(lines[0] if lines else '')[:300]}"


def one_line(text) -> str:
    """``text`` with its line breaks and runs of spaces folded: a failure is told in one line."""
    return " ".join(str(text).split())
