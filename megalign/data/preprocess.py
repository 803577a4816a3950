"""Corpora -> Megatron ``.bin/.idx`` files (megalign-preprocess's library; the command and its
options: megalign/cli/preprocess.py)."""

from __future__ import annotations

import glob
import gzip
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

from megalign.data.indexed import (
    DatasetWriter,
    atomic_dataset_paths,
    clean_stale_temporaries,
    get_bin_path,
    get_idx_path,
    make_output_directory,
    optimal_dtype,
    read_index,
)
from megalign.data.workers import (
    OrderedWorkers,
    pipe,
    receive,
    start_process,
    stop_processes,
)
from megalign.data.sft import SFT_KEY, SFTFormat, example_tokens, loss_mask_prefix
from megalign.errors import DataError, one_line

BATCH_DOCS = 64  # lines per task sent to a worker


@dataclass
class Stats:
    documents: int = 0
    tokens: dict = field(default_factory=dict)  # per key
    skipped: int = 0
    blank: int = 0  # blank lines: not documents, never an error
    bytes_read: int = 0
    loop_seconds: float = 0.0  # reading, tokenizing and writing, without start-up

    def add(self, other: "Stats") -> None:
        self.documents += other.documents
        self.skipped += other.skipped
        self.blank += other.blank
        self.bytes_read += other.bytes_read
        for key, count in other.tokens.items():
            self.tokens[key] = self.tokens.get(key, 0) + count


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


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of one input file; damaged gzip data is a DataError naming the
    file and the line it stops at."""
    number = 0
    try:
        with _open(path) as handle:
            for number, raw in enumerate(handle, start=1):
                yield number, raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}:{number + 1}: {_gzip_problem(err)}") from None


def _gzip_problem(err: Exception) -> str:
    if isinstance(err, EOFError):
        return "the gzip data ends early (a truncated file); compress or download it again"
    if "Not a gzipped file" in str(err):
        return "not gzip data; if the file is plain text, rename it without .gz"
    return f"corrupt gzip data ({err}); compress or download it again"


def read_records(path: str, keys: list[str]):
    """(line number, {key: text}, None for a blank line, or a DataError; raw byte count)."""
    text_input = _is_text(path)
    for number, raw in read_lines(path):
        yield number, _parse(path, number, raw, keys, text_input), len(raw)


def _parse(path, number, raw: bytes, keys, text_input):
    if not raw.strip():
        return None
    where = f"{path}:{number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return DataError(f"{where}: line is not valid UTF-8")
    if number == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write
    if text_input:
        return {key: line.removesuffix("\n").removesuffix("\r") for key in keys}
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return DataError(f"{where}: malformed JSON ({err.msg})")
    except RecursionError:
        return DataError(f"{where}: JSON nested too deeply to be a document")
    if not isinstance(record, dict):
        return DataError(f"{where}: expected a JSON object")
    out = {}
    for key in keys:
        if key not in record:
            return DataError(f"{where}: no key '{key}' (choose others with --json-keys)")
        if not isinstance(record[key], str) or not record[key].strip():
            return DataError(f"{where}: key '{key}' holds an empty or non-string document")
        if not is_unicode_text(record[key]):
            return DataError(f"{where}: invalid Unicode text in key '{key}' (a lone surrogate "
                             "escape such as \\ud800)")
        out[key] = record[key]
    return out


def is_unicode_text(value) -> bool:
    """False for a string (or JSON value holding one) with a lone surrogate: valid JSON
    (``"\\ud800"``), but not text any tokenizer or UTF-8 file can hold."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_jsonl(path: str, key: str = "text") -> Iterator[str]:
    """Documents of one JSONL file; the first bad line raises ``DataError``."""
    for _, record, _ in read_records(path, [key]):
        if isinstance(record, DataError):
            raise record
        if record is not None:
            yield record[key]


def _batches(files, stats: Stats, line_range=None):
    """(path, text input?, [(line number, raw)]) batches of the non-blank lines, in input order,
    each from one file; counts bytes and blank lines. ``line_range``: global line indices."""
    line_index = 0
    for path in files:
        lines = []
        for number, raw in read_lines(path):
            line_index += 1
            if line_range is not None and line_index > line_range[1]:
                break
            if line_range is not None and line_index <= line_range[0]:
                continue
            stats.bytes_read += len(raw)
            if not raw.strip():
                stats.blank += 1
                continue
            lines.append((number, raw))
            if len(lines) == BATCH_DOCS:
                yield path, _is_text(path), lines
                lines = []
        if lines:
            yield path, _is_text(path), lines
        if line_range is not None and line_index > line_range[1]:
            return


def count_lines(files: list[str]) -> int:
    return sum(1 for path in files for _ in read_lines(path))


# ----------------------------------------------------------------------------- tokenizing


class _Encoder:
    """One batch of lines -> (problems in line order, {key: token bytes}, {key: lengths}).

    Runs in the workers, parsing included: the main process only reads lines and writes bytes.
    A document with a problem is left out of every key; the main process decides whether the
    first problem stops the run (it does unless --skip-bad)."""

    def __init__(self, tokenizer, keys: list[str], append_eod: bool, dtype):
        self.tokenizer, self.keys, self.dtype = tokenizer, keys, dtype
        self.suffix = [tokenizer.eod] if append_eod else []

    def __call__(self, batch) -> tuple[list[str], dict, dict]:
        path, text_input, lines = batch
        problems, good = [], []
        for position, (number, raw) in enumerate(lines):
            record = _parse(path, number, raw, self.keys, text_input)
            if isinstance(record, DataError):
                problems.append((position, str(record)))
            else:
                good.append((position, record))
        ids = {key: self.tokenizer.encode_batch([record[key] for _, record in good])
               for key in self.keys}
        kept = []
        for index, (position, _) in enumerate(good):
            if all(ids[key][index] for key in self.keys):
                kept.append(index)
            else:
                number = lines[position][0]
                problems.append((position, f"{path}:{number}: the document tokenizes to nothing"))
        data, lengths = {}, {}
        for key in self.keys:
            data[key], lengths[key] = self._token_bytes([ids[key][index] for index in kept])
        return [message for _, message in sorted(problems)], data, lengths

    def _token_bytes(self, documents: list[list[int]]) -> tuple[bytes, list[int]]:
        import numpy

        tokens, lengths = [], []
        for ids in documents:
            tokens += ids
            tokens += self.suffix
            lengths.append(len(ids) + len(self.suffix))
        return numpy.array(tokens, self.dtype).tobytes(), lengths


class _SFTEncoder:
    """One batch of instruction records -> (problems, {"tokens", "loss_mask"}: bytes, lengths);
    see ``megalign.data.sft``."""

    def __init__(self, tokenizer, fmt: SFTFormat, dtype):
        self.tokenizer, self.fmt, self.dtype = tokenizer, fmt, dtype

    def __call__(self, batch) -> tuple[list[str], dict, dict]:
        import numpy

        path, _, lines = batch
        problems, tokens, masks, lengths = [], [], [], []
        for number, raw in lines:
            where = f"{path}:{number}"
            try:
                record = json.loads(raw.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError("expected a JSON object")
                if not is_unicode_text(record):
                    raise ValueError("invalid Unicode text (a lone surrogate escape such as "
                                     "\\ud800)")
                ids, mask = example_tokens(record, self.fmt, self.tokenizer)
            except UnicodeDecodeError:
                problems.append(f"{where}: line is not valid UTF-8")
                continue
            except json.JSONDecodeError as err:
                problems.append(f"{where}: malformed JSON ({err.msg})")
                continue
            except ValueError as err:
                problems.append(f"{where}: {err}")
                continue
            tokens += ids
            masks += mask
            lengths.append(len(ids))
        data = {"tokens": numpy.array(tokens, self.dtype).tobytes(),
                "loss_mask": numpy.array(masks, numpy.uint8).tobytes()}
        return problems, data, {"tokens": lengths, "loss_mask": lengths}


def _one_thread() -> None:
    """In each worker: --workers is the parallelism. Hugging Face tokenizers' own threads
    (rayon) make batches of BATCH_DOCS several times slower when workers share the cores."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


# ----------------------------------------------------------------------------- writing


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


def _dtype(vocab_size: int, requested: str):
    import numpy

    if requested == "auto":
        return optimal_dtype(vocab_size)
    if requested == "uint16" and vocab_size > 65535:
        raise DataError(f"--dtype uint16 cannot hold a vocabulary of {vocab_size} tokens; use int32")
    return numpy.uint16 if requested == "uint16" else numpy.int32


def tokenize_to_datasets(
    files: list[str],
    tokenizer,
    output_prefix: str,
    keys: list[str],
    append_eod: bool,
    workers: int,
    skip_bad: bool,
    dtype: str = "auto",
    line_range=None,
    progress: bool = True,
    sft: Optional[SFTFormat] = None,
) -> Stats:
    """Tokenize ``files`` into one dataset per key with ``workers`` processes; returns the counts.
    A whole input (no ``line_range``) without documents is a DataError. ``sft``: instruction
    records, written as tokens and their loss-mask stream (``megalign.data.sft``)."""
    import numpy

    np_dtype = _dtype(tokenizer.vocab_size, dtype)
    if sft is None:
        streams = {key: (output_prefix_for(output_prefix, key), np_dtype) for key in keys}
        encoder = _Encoder(tokenizer, keys, append_eod, np_dtype)
    else:
        tokens = output_prefix_for(output_prefix, SFT_KEY)
        streams = {"tokens": (tokens, np_dtype), "loss_mask": (loss_mask_prefix(tokens), numpy.uint8)}
        encoder = _SFTEncoder(tokenizer, sft, np_dtype)
    counted = [name for name in streams if name != "loss_mask"]
    stats = Stats(tokens={name: 0 for name in counted})
    outputs = [path for path, _ in streams.values()]
    with OrderedWorkers(workers, encoder, "tokenizing worker", _one_thread) as pool, \
            atomic_dataset_paths(outputs) as temps:
        writers = []
        try:
            for temp, (_, stream_dtype) in zip(temps, streams.values()):
                writers.append(DatasetWriter(get_bin_path(temp), stream_dtype))
            bar = _progress_bar(files, line_range, progress)
            start = time.perf_counter()
            try:
                for problems, data, lengths in pool.map(_batches(files, stats, line_range)):
                    if problems and not skip_bad:
                        raise DataError(problems[0])
                    stats.skipped += len(problems)
                    for name, writer in zip(streams, writers):
                        writer.add_documents(data[name], lengths[name])
                    for name in counted:
                        stats.tokens[name] += sum(lengths[name])
                    stats.documents += len(lengths[counted[0]])
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix(docs_s=f"{stats.documents / elapsed:.0f}",
                                    tok_s=f"{sum(stats.tokens.values()) / elapsed:.0f}",
                                    refresh=False)
                    bar.update(stats.bytes_read - bar.n)
            finally:
                bar.close()  # clears its line, also before a failure's one line
            stats.loop_seconds = time.perf_counter() - start
            if line_range is None and not stats.documents:
                raise DataError(_no_documents(files, stats))
            for writer, temp in zip(writers, temps):
                writer.finalize(get_idx_path(temp))
        finally:
            for writer in writers:
                writer.close()
    return stats


def _progress_bar(files, line_range, enabled: bool):
    from tqdm import tqdm

    plain = line_range is None and not any(path.endswith(".gz") for path in files)
    total = sum(os.path.getsize(path) for path in files) if plain else None  # text bytes
    return tqdm(total=total, unit="B", unit_scale=True, disable=not enabled, desc="tokenizing",
                file=sys.stderr, mininterval=1.0, leave=False)  # the summary line follows


def _no_documents(files: list[str], stats: Stats) -> str:
    where = files[0] if len(files) == 1 else f"the {len(files)} input files ({files[0]}, ...)"
    return (f"{where}: no documents to write ({stats.blank} blank lines, {stats.skipped} skipped "
            "as bad); give an input with at least one document")


def merge_datasets(prefixes: list[str], output_prefix: str) -> None:
    """Concatenate indexed datasets in order (Megatron's ``IndexedDatasetBuilder.add_index``)."""
    dtype = read_index(prefixes[0]).dtype
    with atomic_dataset_paths([output_prefix]) as (temp,):
        writer = DatasetWriter(get_bin_path(temp), dtype)
        try:
            for prefix in prefixes:
                writer.add_dataset(prefix)
            writer.finalize(get_idx_path(temp))
        finally:
            writer.close()


def load_tokenizer(path: str, eod_token: Optional[str] = None):
    """``build_tokenizer`` with a tokenizer that cannot be used as a DataError naming it."""
    from megalign.data.tokenizer import TokenizerError, build_tokenizer

    try:
        return build_tokenizer(path, eod_token)
    except (TokenizerError, FileNotFoundError) as err:  # their messages name the tokenizer
        raise DataError(one_line(err)) from None
    except PermissionError:
        raise
    except Exception as err:  # the library's own words, e.g. a file that is no model
        raise DataError(f"tokenizer '{path}' cannot be read ({one_line(err)}); give a "
                        "SentencePiece .model file, a Hugging Face tokenizer.json or a Hugging "
                        "Face tokenizer directory") from None


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
    eod_token: Optional[str] = None,
    sft: Optional[str] = None,
) -> str:
    """Library entry point; returns the output prefix of the first key. ``sft``: the instruction
    format (``megalign.data.sft``), written with its loss-mask stream."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    fmt = None
    if sft is not None:
        try:
            fmt = SFTFormat.parse(sft)
        except ValueError as err:
            raise DataError(str(err)) from None
        if partitions > 1:
            raise DataError("--sft writes one pass: use --workers instead of --partitions")
        keys, append_eod = [SFT_KEY], True
    files = expand_inputs(inputs)
    make_output_directory(output_prefix)
    outputs = [output_prefix_for(output_prefix, key) for key in keys]
    clean_stale_temporaries(outputs + ([loss_mask_prefix(outputs[0])] if fmt else []))
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_path, eod_token)
    if partitions <= 1:
        stats = tokenize_to_datasets(files, tokenizer, output_prefix, keys, append_eod,
                                     workers, skip_bad, dtype, progress=progress, sft=fmt)
    else:
        stats = _preprocess_partitions(files, tokenizer, output_prefix, keys, append_eod,
                                       workers, partitions, skip_bad, dtype)
    print(_summary(stats, tokenizer, append_eod, time.perf_counter() - start,
                   output_prefix_for(output_prefix, keys[0])), file=sys.stderr)
    return output_prefix_for(output_prefix, keys[0])


def _summary(stats: Stats, tokenizer, append_eod: bool, seconds: float, output: str) -> str:
    megabytes, tokens = stats.bytes_read / 1e6, sum(stats.tokens.values())
    loop = max(stats.loop_seconds, 1e-9)
    eod = (f"eod {tokenizer.eod_token!r} (id {tokenizer.eod}) "
           f"{'appended' if append_eod else 'not appended'}")
    return (f"megalign-preprocess: {stats.documents} documents, {tokens} tokens, {stats.skipped} "
            f"skipped, {stats.blank} blank lines, {eod}; {seconds:.2f} s "
            f"({megabytes / seconds:.2f} MB/s, {tokens / seconds:.0f} tokens/s), tokenizing loop "
            f"{stats.loop_seconds:.3f} s ({megabytes / loop:.2f} MB/s) -> {output}")


def _preprocess_partitions(files, tokenizer, output_prefix, keys, append_eod, workers,
                           partitions, skip_bad, dtype) -> Stats:
    lines = count_lines(files)
    bounds = [lines * k // partitions for k in range(partitions + 1)]
    part_prefixes = [f"{output_prefix}.part{k:03d}" for k in range(partitions)]
    part_outputs = [output_prefix_for(p, key) for p in part_prefixes for key in keys]
    per_part_workers = max(1, workers // partitions)
    children = []  # (process, result reader)
    total = Stats(tokens={key: 0 for key in keys})
    start = time.perf_counter()
    try:
        for k in range(partitions):
            task = (files, tokenizer, part_prefixes[k], keys, append_eod, per_part_workers,
                    skip_bad, dtype, (bounds[k], bounds[k + 1]))
            children.append(_start_partition(task, [reader for _, reader in children]))
        for k, (process, reader) in enumerate(children):  # in order: the first problem wins
            total.add(receive(reader, process, f"partition {k} process"))
        total.loop_seconds = time.perf_counter() - start
        if not total.documents:
            raise DataError(_no_documents(files, total))
        for key in keys:
            merge_datasets([output_prefix_for(p, key) for p in part_prefixes],
                           output_prefix_for(output_prefix, key))
    finally:
        stop_processes([process for process, _ in children])
        clean_stale_temporaries(part_outputs)  # those of killed partitions
        for prefix in part_outputs:
            for path in (get_bin_path(prefix), get_idx_path(prefix)):
                if os.path.exists(path):
                    os.remove(path)
    return total


def _start_partition(task, parent_ends):
    reader, writer = pipe()
    process = start_process(_partition, (writer, task), close=[*parent_ends, reader],
                            daemon=False)  # it starts workers of its own
    writer.close()
    return process, reader


def _partition(results, task) -> None:
    try:
        stats = tokenize_to_datasets(*task, progress=False)
    except Exception as err:
        stats = err
    results.send(stats)


# ----------------------------------------------------------------------------- command line
