"""Write and check Megatron ``.bin/.idx`` indexed datasets.

Files are written under temporary names and renamed only when complete (``.bin`` first, ``.idx``
last), so an interrupted run never leaves a pair that ``IndexedDataset`` would accept. Writing
needs only numpy: importing torch and Megatron-Core takes seconds, longer than tokenizing a small
corpus, so they are imported only to check a dataset the way training opens it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy

# Megatron-Core's index format (megatron/core/datasets/indexed_dataset.py, _IndexWriter): header,
# version 1, dtype code, sequence and document counts, then int32 sequence lengths, int64 byte
# pointers and int64 document boundaries (sequence indices).
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_DTYPE_CODES = {numpy.dtype(numpy.uint16): 8, numpy.dtype(numpy.int32): 4,
                numpy.dtype(numpy.uint8): 1}  # Megatron-Core DType codes (uint8: SFT loss masks)
_HEADER_SIZE = len(_INDEX_HEADER) + 8 + 1 + 8 + 8

from megalign.errors import DataError


def get_bin_path(prefix: str) -> str:
    return prefix + ".bin"


def get_idx_path(prefix: str) -> str:
    return prefix + ".idx"


def optimal_dtype(vocab_size: int):
    """Megatron-Core's choice (``DType.optimal_dtype``): uint16 below 65500 ids, else int32."""
    return numpy.uint16 if vocab_size < 65500 else numpy.int32


class DatasetWriter:
    """Writes what Megatron-Core's ``IndexedDatasetBuilder`` writes, byte for byte, from token
    bytes already in the dataset's dtype (tokenizing workers produce them)."""

    def __init__(self, bin_path: str, dtype):
        self.dtype = numpy.dtype(dtype)
        self.path = bin_path
        self._file = open(bin_path, "wb")
        self._lengths: list = []  # arrays of sequence lengths
        self._documents: list = [numpy.zeros(1, numpy.int64)]  # document boundaries
        self._sequences = 0

    def add_documents(self, tokens: bytes, lengths: list[int]) -> None:
        """Documents of one sequence each, their tokens concatenated."""
        self._write(tokens)
        self._lengths.append(numpy.asarray(lengths, numpy.int32))
        ends = numpy.arange(1, len(lengths) + 1, dtype=numpy.int64)
        self._documents.append(self._sequences + ends)
        self._sequences += len(lengths)

    def add_document(self, ids: list[int]) -> None:
        self.add_documents(numpy.asarray(ids, self.dtype).tobytes(), [len(ids)])

    def add_dataset(self, prefix: str) -> None:
        """Append an existing dataset (``IndexedDatasetBuilder.add_index``)."""
        index = read_index(prefix)
        if index.dtype != self.dtype:
            raise DataError(f"dataset '{get_idx_path(prefix)}' holds {index.dtype} tokens, the "
                            f"first one {self.dtype}; merge datasets made with the same tokenizer")
        with open(get_bin_path(prefix), "rb") as source:
            while chunk := source.read(1 << 24):
                self._write(chunk)
        self._lengths.append(index.lengths)
        self._documents.append(index.documents[1:] + self._sequences)
        self._sequences += len(index.lengths)

    def _write(self, data: bytes) -> None:
        with _naming(self.path):
            self._file.write(data)

    def finalize(self, idx_path: str) -> None:
        with _naming(self.path):
            self._file.close()
        lengths = numpy.concatenate([numpy.zeros(0, numpy.int32), *self._lengths])
        documents = numpy.concatenate(self._documents)
        pointers = numpy.zeros(len(lengths), numpy.int64)
        numpy.cumsum(lengths[:-1].astype(numpy.int64) * self.dtype.itemsize, out=pointers[1:])
        header = struct.pack("<QBQQ", 1, _DTYPE_CODES[self.dtype], len(lengths), len(documents))
        with _naming(idx_path), open(idx_path, "wb") as index:
            index.write(_INDEX_HEADER + header)
            for array in (lengths, pointers, documents):
                index.write(array.tobytes(order="C"))

    def close(self) -> None:
        """After a failure: the file is removed, so a last flush that fails changes nothing."""
        try:
            self._file.close()
        except OSError:
            pass


@contextlib.contextmanager
def _naming(path: str):
    """A failed write (a full disk) does not say which file; re-raise it naming ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, path) from None


@dataclass
class Index:
    dtype: numpy.dtype
    lengths: numpy.ndarray  # int32 per sequence
    documents: numpy.ndarray  # int64 document boundaries, starting at 0


def read_index(prefix: str) -> Index:
    """The ``.idx`` of a text dataset, checked against its ``.bin``; a DataError names a bad file."""
    path = get_idx_path(prefix)
    for required in (path, get_bin_path(prefix)):
        if not os.path.isfile(required):
            raise DataError(f"dataset file '{required}' does not exist; build it with "
                            "megalign-preprocess")
    with open(path, "rb") as handle:
        data = handle.read()
    codes = {code: dtype for dtype, code in _DTYPE_CODES.items()}
    if (len(data) < _HEADER_SIZE or not data.startswith(_INDEX_HEADER)
            or struct.unpack_from("<Q", data, 9)[0] != 1 or data[17] not in codes):
        raise DataError(f"dataset index '{path}' is not a Megatron uint16/int32 text index; "
                        "rebuild it with megalign-preprocess")
    sequences, documents = struct.unpack_from("<QQ", data, 18)
    if len(data) != _HEADER_SIZE + 12 * sequences + 8 * documents:
        raise DataError(f"dataset index '{path}' is truncated or multimodal ({len(data)} bytes "
                        f"for {sequences} sequences); rebuild it with megalign-preprocess")
    index = Index(codes[data[17]],
                  numpy.frombuffer(data, numpy.int32, sequences, _HEADER_SIZE),
                  numpy.frombuffer(data, numpy.int64, documents, _HEADER_SIZE + 12 * sequences))
    expected = int(index.lengths.sum(dtype=numpy.int64)) * index.dtype.itemsize
    actual = os.path.getsize(get_bin_path(prefix))
    if actual != expected:
        raise DataError(f"dataset file '{get_bin_path(prefix)}' has {actual} bytes, its index "
                        f"expects {expected}; rebuild it with megalign-preprocess")
    return index


def _temp_prefix(prefix: str) -> str:
    return f"{prefix}.tmp-{os.getpid()}"


@contextlib.contextmanager
def atomic_dataset_paths(prefixes: list[str]):
    """Yield temporary prefixes to write; on success rename ``.bin`` then ``.idx`` into place,
    on failure remove them. An ``.idx`` only ever appears next to its complete ``.bin``."""
    temps = [_temp_prefix(prefix) for prefix in prefixes]
    for prefix in prefixes:
        make_output_directory(prefix)
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


def make_output_directory(prefix: str) -> None:
    """Create the directory an output prefix names; a file standing in its way is a DataError
    (a wrong --output-prefix), a directory that cannot be created an OSError (the environment)."""
    directory = os.path.dirname(os.path.abspath(prefix))
    existing = directory
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(f"output prefix '{prefix}': '{existing}' is a file, not a directory; "
                        "choose another --output-prefix")
    os.makedirs(directory, exist_ok=True)


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
        writer = DatasetWriter(get_bin_path(temp), optimal_dtype(vocab_size))
        try:
            for ids in documents:
                writer.add_document(ids)
                num_docs += 1
                num_tokens += len(ids)
            writer.finalize(get_idx_path(temp))
        finally:
            writer.close()
    return num_docs, num_tokens


def check_indexed_dataset(prefix: str) -> int:
    """Open ``prefix`` as Megatron does; a missing, truncated or corrupt pair gives a DataError.
    Returns its number of documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

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
