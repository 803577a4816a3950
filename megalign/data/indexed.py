"""Write and check Megatron ``.bin/.idx`` indexed datasets.

Files are written under temporary names and renamed only when complete (``.bin`` first, ``.idx``
last), so an interrupted run never leaves a pair that ``IndexedDataset`` would accept.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator

import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what to do."""


def read_jsonl(path: str, key: str = "text") -> Iterator[str]:
    """Documents of a JSONL (optionally .gz) file; errors name the file and line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{where}: line is not valid UTF-8") from None
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg})") from None
            if not isinstance(record, dict) or key not in record:
                raise DataError(f"{where}: no key '{key}' (choose another with --json-keys)")
            text = record[key]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: key '{key}' holds an empty or non-string document")
            yield text


def write_indexed_dataset(
    documents: Iterable[list[int]], output_prefix: str, vocab_size: int
) -> tuple[int, int]:
    """Write token-id documents to ``output_prefix.{bin,idx}``; returns (documents, tokens)."""
    directory = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(directory, exist_ok=True)
    temp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    dtype = DType.optimal_dtype(vocab_size)
    builder = IndexedDatasetBuilder(get_bin_path(temp_prefix), dtype=dtype)
    num_docs = num_tokens = 0
    try:
        for ids in documents:
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            num_docs += 1
            num_tokens += len(ids)
        builder.finalize(get_idx_path(temp_prefix))
        os.replace(get_bin_path(temp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(temp_prefix), get_idx_path(output_prefix))
    finally:
        for path in (get_bin_path(temp_prefix), get_idx_path(temp_prefix)):
            if os.path.exists(path):
                os.remove(path)
    return num_docs, num_tokens


def check_indexed_dataset(prefix: str) -> None:
    """Open ``prefix`` as Megatron does; a missing, truncated or corrupt pair gives a DataError."""
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
