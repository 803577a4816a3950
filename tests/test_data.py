"""Indexed files: round trip through Megatron's reader, atomic writes, clear errors."""

import gzip
import json
import os

import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import CORPUS, TOKENIZER
from megalign.data.dataset import parse_blend
from megalign.data.indexed import DataError, check_indexed_dataset, read_jsonl, write_indexed_dataset
from megalign.data.preprocess import preprocess
from megalign.data.tokenizer import build_tokenizer


def test_round_trip_equals_direct_tokenisation(corpus_prefix):
    tok = build_tokenizer(str(TOKENIZER))
    dataset = IndexedDataset(corpus_prefix)
    texts = list(read_jsonl(str(CORPUS)))
    assert len(dataset) == len(texts) == 1189
    for i in (0, 17, 1188):
        assert dataset[i].tolist() == tok.encode(texts[i]) + [tok.eod]


def test_interrupted_write_leaves_nothing_valid(tmp_path):
    prefix = str(tmp_path / "broken")

    def documents():
        yield [5, 6, 7]
        raise KeyboardInterrupt  # killed mid-run

    with pytest.raises(KeyboardInterrupt):
        write_indexed_dataset(documents(), prefix, 4000)
    assert os.listdir(tmp_path) == []
    with pytest.raises(DataError, match="does not exist"):
        check_indexed_dataset(prefix)


def test_corrupt_and_truncated_files_are_named(tmp_path):
    prefix = str(tmp_path / "ok")
    write_indexed_dataset(([i, i + 1, i + 2] for i in range(100)), prefix, 4000)
    check_indexed_dataset(prefix)
    with open(prefix + ".bin", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(DataError, match=r"ok\.bin' is truncated"):
        check_indexed_dataset(prefix)
    with open(prefix + ".idx", "wb") as handle:
        handle.write(b"garbage")
    with pytest.raises(DataError, match=r"ok\.idx' is corrupt"):
        check_indexed_dataset(prefix)


@pytest.mark.parametrize("line, message", [
    (b'{"text": "fine"}\n{"text": broken\n', ":2: malformed JSON"),
    (b'{"body": "x"}\n', ":1: no key 'text'"),
    (b'{"text": "   "}\n', ":1: key 'text' holds an empty"),
    (b'{"text": "\xff\xfe"}\n', ":1: line is not valid UTF-8"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(line)
    with pytest.raises(DataError, match=message):
        preprocess([str(path)], str(TOKENIZER), str(tmp_path / "out"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_blend_parsing():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend([0.3, "a", 0.7, "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="alternate weight and prefix"):
        parse_blend([0.3, "a", "b"])
