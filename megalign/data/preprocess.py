"""megalign-preprocess (tools/preprocess_data.py): corpora -> Megatron ``.bin/.idx`` files.

    megalign-preprocess --input 'corpus/*.jsonl.gz' --tokenizer tokenizer.model \\
        --output-prefix data/corpus --append-eod --workers 2

Inputs: JSONL files (``.jsonl``/``.json``, optionally ``.gz``; globs allowed) or plain text
(``.txt``, optionally ``.gz``; one document per non-empty line). One output per JSON key:
``<output-prefix>_<key>_document.{bin,idx}`` (Megatron-LM's naming), written under temporary names
and renamed when complete. Documents are read in input order by the main process and tokenized in
ordered batches by ``--workers`` processes, so the output is byte-identical for any worker count.
``--partitions K`` splits the input into K contiguous ranges processed in parallel and merged in
order (equal to a single pass); ``--merge PREFIX...`` merges existing datasets.

Bad input (malformed JSON, a missing key, non-UTF-8 bytes, an empty document) stops the run with
the file and line, unless ``--skip-bad`` is given: then it is skipped and counted.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy
import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)
from tqdm import tqdm

from megalign.data.indexed import atomic_dataset_paths, clean_stale_temporaries

from megalign.errors import DataError
from megalign.data.tokenizer import build_tokenizer

BATCH_DOCS = 64  # documents per task sent to a worker


@dataclass
class Stats:
    documents: int = 0
    tokens: dict = field(default_factory=dict)  # per key
    skipped: int = 0
    bytes_read: int = 0


# ----------------------------------------------------------------------------- reading


def expand_inputs(patterns: list[str]) -> list[str]:
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise DataError(f"--input '{pattern}' matches no file")
        for path in matched:
            if not os.path.isfile(path):
                raise DataError(f"input file '{path}' does not exist")
            files.append(path)
    return files


def _is_text(path: str) -> bool:
    return path.removesuffix(".gz").endswith(".txt")


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_records(path: str, keys: list[str], first_line: int = 1, last_line: Optional[int] = None):
    """(line number, {key: text} or DataError, raw byte count) for lines first..last (1-based)."""
    text_input = _is_text(path)
    with _open(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if number < first_line:
                continue
            if last_line is not None and number > last_line:
                break
            yield number, _parse(path, number, raw, keys, text_input), len(raw)


def _parse(path, number, raw: bytes, keys, text_input):
    where = f"{path}:{number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return DataError(f"{where}: line is not valid UTF-8")
    if text_input:
        return {key: line.rstrip("\n") for key in keys} if line.strip() else None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return DataError(f"{where}: malformed JSON ({err.msg})")
    if not isinstance(record, dict):
        return DataError(f"{where}: expected a JSON object")
    out = {}
    for key in keys:
        if key not in record:
            return DataError(f"{where}: no key '{key}' (choose others with --json-keys)")
        if not isinstance(record[key], str) or not record[key].strip():
            return DataError(f"{where}: key '{key}' holds an empty or non-string document")
        out[key] = record[key]
    return out


def read_jsonl(path: str, key: str = "text") -> Iterator[str]:
    """Documents of one JSONL file; the first bad line raises ``DataError``."""
    for _, record, _ in read_records(path, [key]):
        if isinstance(record, DataError):
            raise record
        yield record[key]


# ----------------------------------------------------------------------------- tokenizing


_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = build_tokenizer(tokenizer_path)


def _tokenize_batch(batch: list[dict]) -> list[dict]:
    return [{key: _worker_tokenizer.encode(text) for key, text in doc.items()} for doc in batch]


def _batches(files, keys, stats: Stats, skip_bad: bool, line_range=None):
    """Ordered batches of documents from the inputs (optionally a global line range)."""
    batch, line_index = [], 0
    for path in files:
        for number, record, nbytes in read_records(path, keys):
            line_index += 1
            if line_range is not None and not line_range[0] <= line_index - 1 < line_range[1]:
                continue
            stats.bytes_read += nbytes
            if record is None:
                continue
            if isinstance(record, DataError):
                if not skip_bad:
                    raise record
                stats.skipped += 1
                continue
            batch.append((f"{path}:{number}", record))
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
    if batch:
        yield batch


def count_lines(files: list[str]) -> int:
    total = 0
    for path in files:
        with _open(path) as handle:
            total += sum(1 for _ in handle)
    return total


# ----------------------------------------------------------------------------- writing


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _dtype(vocab_size: int, requested: str):
    if requested == "auto":
        return DType.optimal_dtype(vocab_size)
    if requested == "uint16" and vocab_size > 65535:
        raise DataError(f"--dtype uint16 cannot hold a vocabulary of {vocab_size} tokens; use int32")
    return numpy.uint16 if requested == "uint16" else numpy.int32


def tokenize_to_datasets(
    files: list[str],
    tokenizer_path: str,
    output_prefix: str,
    keys: list[str],
    append_eod: bool,
    workers: int,
    skip_bad: bool,
    dtype: str = "auto",
    line_range=None,
    progress: bool = True,
) -> Stats:
    """Tokenize ``files`` into one dataset per key; returns the counts."""
    tokenizer = build_tokenizer(tokenizer_path)
    suffix = [tokenizer.eod] if append_eod else []
    np_dtype = _dtype(tokenizer.vocab_size, dtype)
    stats = Stats(tokens={key: 0 for key in keys})
    outputs = {key: output_prefix_for(output_prefix, key) for key in keys}
    plain = line_range is None and not any(p.endswith(".gz") for p in files)
    total_bytes = sum(os.path.getsize(p) for p in files) if plain else None  # text bytes
    with atomic_dataset_paths(list(outputs.values())) as temp_prefixes:
        builders = {
            key: IndexedDatasetBuilder(get_bin_path(temp_prefixes[i]), dtype=np_dtype)
            for i, key in enumerate(keys)
        }
        pool = (
            multiprocessing.get_context("fork").Pool(workers, _init_worker, (tokenizer_path,))
            if workers > 1
            else None
        )
        try:
            if pool is None:
                _init_worker(tokenizer_path)
            batches = _batches(files, keys, stats, skip_bad, line_range)
            located = _LocatedBatches(batches)
            results = (
                pool.imap(_tokenize_batch, located, chunksize=1)
                if pool
                else map(_tokenize_batch, located)
            )
            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress,
                       desc="tokenizing", file=sys.stderr, mininterval=1.0)
            start = time.perf_counter()
            for batch_index, docs in enumerate(results):
                for doc, where in zip(docs, located.locations(batch_index)):
                    if any(not ids for ids in doc.values()):
                        if not skip_bad:
                            raise DataError(f"{where}: the document tokenizes to nothing")
                        stats.skipped += 1
                        continue
                    for key, ids in doc.items():
                        builders[key].add_document(torch.tensor(ids + suffix), [len(ids) + len(suffix)])
                        stats.tokens[key] += len(ids) + len(suffix)
                    stats.documents += 1
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(docs_s=f"{stats.documents / elapsed:.0f}",
                                tok_s=f"{sum(stats.tokens.values()) / elapsed:.0f}", refresh=False)
                bar.update(stats.bytes_read - bar.n)
            bar.close()
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        for i, key in enumerate(keys):
            builders[key].finalize(get_idx_path(temp_prefixes[i]))
    return stats


class _LocatedBatches:
    """Passes batches of records to the tokenizer while remembering each document's file:line."""

    def __init__(self, batches):
        self._batches = batches
        self._where: dict[int, list[str]] = {}
        self._next = 0

    def __iter__(self):
        for batch in self._batches:
            self._where[self._next] = [where for where, _ in batch]
            self._next += 1
            yield [record for _, record in batch]

    def locations(self, index: int) -> list[str]:
        return self._where.pop(index)


def merge_datasets(prefixes: list[str], output_prefix: str) -> None:
    """Concatenate indexed datasets in order (``IndexedDatasetBuilder.add_index``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megalign.data.indexed import check_indexed_dataset

    for prefix in prefixes:
        check_indexed_dataset(prefix)
    dtype = IndexedDataset(prefixes[0]).index.dtype
    with atomic_dataset_paths([output_prefix]) as (temp,):
        builder = IndexedDatasetBuilder(get_bin_path(temp), dtype=dtype)
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(get_idx_path(temp))


def _partition_worker(args) -> Stats:
    files, tokenizer, prefix, keys, append_eod, workers, skip_bad, dtype, line_range = args
    return tokenize_to_datasets(files, tokenizer, prefix, keys, append_eod, workers, skip_bad,
                                dtype, line_range, progress=False)


def preprocess(
    inputs: list[str],
    tokenizer_path: str,
    output_prefix: str,
    keys="text",
    append_eod: bool = True,
    workers: int = 1,
    partitions: int = 1,
    skip_bad: bool = False,
    dtype: str = "auto",
    progress: bool = False,
) -> str:
    """Library entry point; returns the output prefix of the first key."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    files = expand_inputs(inputs)
    clean_stale_temporaries([output_prefix_for(output_prefix, key) for key in keys])
    start = time.perf_counter()
    if partitions <= 1:
        stats = tokenize_to_datasets(files, tokenizer_path, output_prefix, keys, append_eod,
                                     workers, skip_bad, dtype, progress=progress)
    else:
        stats = _preprocess_partitions(files, tokenizer_path, output_prefix, keys, append_eod,
                                       workers, partitions, skip_bad, dtype)
    seconds = time.perf_counter() - start
    megabytes = stats.bytes_read / 1e6
    tokens = sum(stats.tokens.values())
    print(
        f"megalign-preprocess: {stats.documents} documents, {tokens} tokens, {stats.skipped} "
        f"skipped, {seconds:.2f} s ({megabytes / seconds:.2f} MB/s, {tokens / seconds:.0f} "
        f"tokens/s) -> {output_prefix_for(output_prefix, keys[0])}",
        file=sys.stderr,
    )
    return output_prefix_for(output_prefix, keys[0])


def _preprocess_partitions(files, tokenizer, output_prefix, keys, append_eod, workers,
                           partitions, skip_bad, dtype) -> Stats:
    lines = count_lines(files)
    bounds = [lines * k // partitions for k in range(partitions + 1)]
    part_prefixes = [f"{output_prefix}.part{k:03d}" for k in range(partitions)]
    per_part_workers = max(1, workers // partitions)
    tasks = [(files, tokenizer, part_prefixes[k], keys, append_eod, per_part_workers, skip_bad,
              dtype, (bounds[k], bounds[k + 1])) for k in range(partitions)]
    try:
        with multiprocessing.get_context("fork").Pool(min(partitions, max(workers, 1))) as pool:
            parts = pool.map(_partition_worker, tasks)
        for key in keys:
            merge_datasets([output_prefix_for(p, key) for p in part_prefixes],
                           output_prefix_for(output_prefix, key))
    finally:
        for prefix in part_prefixes:
            for key in keys:
                for path in (get_bin_path(output_prefix_for(prefix, key)),
                             get_idx_path(output_prefix_for(prefix, key))):
                    if os.path.exists(path):
                        os.remove(path)
    total = Stats(tokens={key: 0 for key in keys})
    for part in parts:
        total.documents += part.documents
        total.skipped += part.skipped
        total.bytes_read += part.bytes_read
        for key in keys:
            total.tokens[key] += part.tokens[key]
    return total


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="megalign-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="JSONL or .txt files (.gz and globs allowed)")
    parser.add_argument("--tokenizer", help="SentencePiece .model, HF tokenizer.json or HF directory")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--append-eod", action="store_true")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad documents")
    parser.add_argument("--dtype", choices=["auto", "uint16", "int32"], default="auto")
    parser.add_argument("--merge", nargs="+", metavar="PREFIX",
                        help="merge these datasets (in order) into --output-prefix and exit")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.merge:
            merge_datasets(args.merge, args.output_prefix)
            print(f"megalign-preprocess: merged {len(args.merge)} datasets -> {args.output_prefix}",
                  file=sys.stderr)
            return 0
        if not args.input or not args.tokenizer:
            raise DataError("--input and --tokenizer are required (or --merge PREFIX ...)")
        if args.workers < 1 or args.partitions < 1:
            raise DataError("--workers and --partitions must be at least 1")
        preprocess(args.input, args.tokenizer, args.output_prefix, args.json_keys,
                   args.append_eod, args.workers, args.partitions, args.skip_bad, args.dtype,
                   progress=not args.no_progress)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"megalign-preprocess: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
