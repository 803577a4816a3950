"""Write and check Megatron ``.bin/.idx`` indexed datasets.

Files are written under temporary names and renamed only when complete (``.bin`` first, ``.idx``
last), so an interrupted run never leaves a pair that ``IndexedDataset`` would accept.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable

import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megalign.errors import DataError


def _temp_prefix(prefix: str) -> str:
    return f"{prefix}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_dataset_paths(prefixes: list[str]):
    """Yield temporary prefixes to write; on success rename ``.bin`` then ``.idx`` into place,
    on failure remove them. An ``.idx`` only ever appears next to its complete ``.bin``."""
    temps = [_temp_prefix(prefix) for prefix in prefixes]
    for prefix in prefixes:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    try:
        yield temps
        for prefix, temp in zip(prefixes, temps):
            if os.path.exists(get_idx_path(prefix)):  # never pair a new .bin with an old .idx
                os.remove(get_idx_path(prefix))
            os.replace(get_bin_path(temp), get_bin_path(prefix))
            os.replace(get_idx_path(temp), get_idx_path(prefix))
    finally:
        for temp in temps:
            for path in (get_bin_path(temp), get_idx_path(temp)):
                if os.path.exists(path):
                    os.remove(path)


def clean_stale_temporaries(prefixes: list[str]) -> None:
    """Remove temporaries left by killed runs (their process no longer exists)."""
    for prefix in prefixes:
        for path in glob.glob(glob.escape(prefix) + ".tmp-*"):
            pid = path[len(prefix) + len(".tmp-") :].split(".")[0]
            if pid.isdigit() and not _alive(int(pid)):
                os.remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_indexed_dataset(
    documents: Iterable[list[int]], output_prefix: str, vocab_size: int
) -> tuple[int, int]:
    """Write token-id documents to ``output_prefix.{bin,idx}``; returns (documents, tokens)."""
    num_docs = num_tokens = 0
    with atomic_dataset_paths([output_prefix]) as (temp,):
        builder = IndexedDatasetBuilder(get_bin_path(temp), dtype=DType.optimal_dtype(vocab_size))
        for ids in documents:
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            num_docs += 1
            num_tokens += len(ids)
        builder.finalize(get_idx_path(temp))
    return num_docs, num_tokens


def check_indexed_dataset(prefix: str) -> int:
    """Open ``prefix`` as Megatron does; a missing, truncated or corrupt pair gives a DataError.
    Returns its number of documents."""
    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        if not os.path.isfile(path):
            raise DataError(
                f"dataset file '{path}' does not exist; build it with megalign-preprocess"
            )
    try:
        index = IndexedDataset(prefix, mmap=True).index
        expected = 0
        if len(index):
            last_length = int(index.sequence_lengths[-1])
            expected = int(index.sequence_pointers[-1]) + last_length * index.dtype_size
    except Exception as err:  # numpy/struct errors from a damaged index
        raise DataError(
            f"dataset index '{get_idx_path(prefix)}' is corrupt or truncated ({err}); "
            "rebuild it with megalign-preprocess"
        ) from None
    actual = os.path.getsize(get_bin_path(prefix))
    if actual < expected:
        raise DataError(
            f"dataset file '{get_bin_path(prefix)}' is truncated ({actual} bytes, index expects "
            f"{expected}); rebuild it with megalign-preprocess"
        )
    return len(index)


class DataFileGuard:
    """Notices a training file that vanishes or changes under a running job.

    Why: the files are memory-mapped; a truncated ``.bin`` kills the process with SIGBUS at the
    next read past its new end, and a deleted or replaced one silently keeps serving stale pages
    to this run while a restart would see different data. Checked (two ``stat`` calls per file)
    at the start of every iteration, before that iteration's reads.
    """

    def __init__(self, prefixes: list[str]):
        self.paths = [p for prefix in prefixes for p in (get_idx_path(prefix), get_bin_path(prefix))]
        self.identity = {path: self._identity(os.stat(path)) for path in self.paths}

    @staticmethod
    def _identity(stat: os.stat_result) -> tuple:
        return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def verify(self) -> None:
        for path, known in self.identity.items():
            try:
                now = self._identity(os.stat(path))
            except FileNotFoundError:
                raise DataError(
                    f"dataset file '{path}' disappeared during training; restore it (the job "
                    "resumes from its latest checkpoint when restarted)"
                ) from None
            if now != known:
                raise DataError(
                    f"dataset file '{path}' changed during training (size {known[2]} -> "
                    f"{now[2]} bytes, or replaced); restore the original file, or rebuild the "
                    "data and start a new run: a resumed run must read the same samples"
                )
