"""Indexed-dataset tools: round trips, determinism across workers and partitions, safety, blends."""

import gzip
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megalign.cli.preprocess import main as preprocess_main
from megalign.cli.train_tokenizer import main as train_tokenizer_main
from megalign.config import parse_blend
from megalign.data.dataset import PretrainingSampler, build_datasets
from megalign.data.indexed import check_indexed_dataset, write_indexed_dataset
from megalign.data.preprocess import preprocess, read_jsonl
from megalign.data.tokenizer import build_tokenizer
from megalign.errors import DataError

from conftest import CORPUS, REPO, TOKENIZER, chat_tokenizer, run_env


def files_of(prefix):
    return [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")]


@pytest.mark.unit
def test_round_trip_equals_direct_tokenisation(corpus_prefix):
    tok = build_tokenizer(str(TOKENIZER))
    dataset = IndexedDataset(corpus_prefix)
    texts = list(read_jsonl(str(CORPUS)))
    assert len(dataset) == len(texts) == 1189
    for i in (0, 17, 1188):
        assert dataset[i].tolist() == tok.encode(texts[i]) + [tok.eod]
    assert dataset[0].dtype == np.uint16  # chosen from the 4000-token vocabulary


@pytest.mark.unit
def test_output_is_identical_for_any_workers_and_partitions(tmp_path, corpus_prefix):
    reference = files_of(corpus_prefix)
    for workers, partitions in ((2, 1), (2, 3)):
        prefix = preprocess([str(CORPUS)], str(TOKENIZER),
                            str(tmp_path / f"w{workers}p{partitions}"),
                            "text", True, workers=workers, partitions=partitions)
        assert files_of(prefix) == reference, (workers, partitions)
    assert not [p for p in os.listdir(tmp_path) if ".part" in p or ".tmp-" in p]


@pytest.mark.unit
def test_merge_step(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_indexed_dataset([[5, 6], [7]], a, 4000)
    write_indexed_dataset([[8, 9, 10]], b, 4000)
    assert preprocess_main(["--merge", a, b, "--output-prefix", str(tmp_path / "ab")]) == 0
    merged = IndexedDataset(str(tmp_path / "ab"))
    assert [merged[i].tolist() for i in range(len(merged))] == [[5, 6], [7], [8, 9, 10]]


@pytest.mark.unit
def test_text_input_and_globs(tmp_path):
    for name, lines in (("a.txt", ["first document", "", "second one"]), ("b.txt", ["third"])):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    prefix = preprocess([str(tmp_path / "*.txt")], str(TOKENIZER), str(tmp_path / "out"), "text",
                        False)
    tok = build_tokenizer(str(TOKENIZER))
    dataset = IndexedDataset(prefix)
    assert [dataset[i].tolist() for i in range(len(dataset))] == [
        tok.encode(t) for t in ("first document", "second one", "third")]


@pytest.mark.unit
@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": broken\n', ":2: malformed JSON"),
    (b'{"body": "x"}\n', ":1: no key 'text'"),
    (b'{"text": "   "}\n', ":1: key 'text' holds an empty"),
    (b'{"text": "\xff\xfe"}\n', ":1: line is not valid UTF-8"),
])
def test_bad_input_names_file_and_line_or_is_skipped(tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(b'{"text": "a good document"}\n' + content)
    out = str(tmp_path / "out")
    assert preprocess_main(["--input", str(path), "--tokenizer", str(TOKENIZER),
                            "--output-prefix", out, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "bad.jsonl.gz" in error and message.replace(":1:", ":2:").replace(":2:", "") in error
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]
    assert preprocess_main(["--input", str(path), "--tokenizer", str(TOKENIZER),
                            "--output-prefix", out, "--skip-bad", "--no-progress"]) == 0
    assert "1 skipped" in capsys.readouterr().err
    assert len(IndexedDataset(out + "_text_document")) == 1 + content.count(b"fine")


def test_killed_run_leaves_nothing_that_looks_valid(tmp_path):
    out = tmp_path / "big"
    cmd = [sys.executable, "-m", "megalign.cli.preprocess", "--input", *[str(CORPUS)] * 30,
           "--tokenizer", str(TOKENIZER), "--output-prefix", str(out), "--no-progress"]
    process = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(".tmp-" in p and os.path.getsize(tmp_path / p) > 100_000
                  for p in os.listdir(tmp_path)):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "big_text_document.bin").exists()
    assert not (tmp_path / "big_text_document.idx").exists()
    with pytest.raises(DataError, match="does not exist"):
        check_indexed_dataset(str(out) + "_text_document")
    # the next run removes the dead run's temporaries and succeeds
    preprocess([str(CORPUS)], str(TOKENIZER), str(out))
    assert sorted(os.listdir(tmp_path)) == ["big_text_document.bin", "big_text_document.idx"]


@pytest.mark.unit
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


@pytest.mark.unit
def test_hf_tokenizer_file_and_directory_end_documents_alike(tmp_path, capsys):
    """SmolLM2's layout, whose directory names the chat end-of-turn <|im_end|> as eos_token: both
    forms end documents with <|endoftext|> (0)."""
    text = list(read_jsonl(str(CORPUS)))[3]
    for source in chat_tokenizer(tmp_path):
        tok = build_tokenizer(str(source))
        assert (tok.eod_token, tok.eod, tok.mask) == ("<|endoftext|>", 0, None)
        assert tok.encode_batch([text, "x"]) == [tok.encode(text), tok.encode("x")]
        prefix = preprocess([str(CORPUS)], str(source), str(tmp_path / source.stem), "text", True)
        assert "eod '<|endoftext|>' (id 0) appended" in capsys.readouterr().err
        dataset = IndexedDataset(prefix)  # keep it alive: items are views of its memory map
        assert dataset[3].tolist() == tok.encode(text) + [0]
        for choice in ("<|im_end|>", "2"):  # --eod-token by text or by id
            assert build_tokenizer(str(source), choice).eod == 2
        assert preprocess_main(["--input", str(CORPUS), "--tokenizer", str(source), "--append-eod",
                                "--eod-token", "<|im_end|>", "--no-progress",
                                "--output-prefix", str(tmp_path / "chat")]) == 0
        assert "eod '<|im_end|>' (id 2) appended" in capsys.readouterr().err
        dataset = IndexedDataset(str(tmp_path / "chat_text_document"))
        assert dataset[3].tolist() == tok.encode(text) + [2]


@pytest.mark.unit
def test_sentencepiece_end_of_document_rule_and_choice(tmp_path, capsys):
    tok = build_tokenizer(str(TOKENIZER))
    assert (tok.eod_token, tok.eod) == ("</s>", 2)  # no <|endoftext|>: </s>, also its eos piece
    for choice in ("<mask>", "3"):
        assert (build_tokenizer(str(TOKENIZER), choice).eod_token,
                build_tokenizer(str(TOKENIZER), choice).eod) == ("<mask>", 3)
    out = str(tmp_path / "masked")
    assert preprocess_main(["--input", str(CORPUS), "--tokenizer", str(TOKENIZER), "--append-eod",
                            "--eod-token", "3", "--no-progress", "--output-prefix", out]) == 0
    assert "eod '<mask>' (id 3) appended" in capsys.readouterr().err
    dataset = IndexedDataset(out + "_text_document")
    assert dataset[0].tolist() == tok.encode(next(read_jsonl(str(CORPUS)))) + [3]


@pytest.mark.unit
def test_blank_lines_are_skipped_and_counted(tmp_path, capsys):
    with gzip.open(CORPUS, "rb") as handle:
        lines = handle.read().splitlines(keepends=True)[:200]
    (tmp_path / "plain.jsonl").write_bytes(b"".join(lines))
    blanks = [b"\n", b"   \n", b"\r\n"]
    spaced = [line + blanks[i % 3] if i % 50 == 0 else line for i, line in enumerate(lines)]
    (tmp_path / "spaced.jsonl").write_bytes(b"\n" + b"".join(spaced) + b"\t\n")
    reference = preprocess([str(tmp_path / "plain.jsonl")], str(TOKENIZER), str(tmp_path / "a"))
    capsys.readouterr()
    for workers in ("1", "2"):
        out = str(tmp_path / f"b{workers}")
        assert preprocess_main(["--input", str(tmp_path / "spaced.jsonl"), "--tokenizer",
                                str(TOKENIZER), "--append-eod", "--workers", workers,
                                "--no-progress", "--output-prefix", out]) == 0
        summary = capsys.readouterr().err
        assert "200 documents" in summary and "6 blank lines" in summary
        assert files_of(out + "_text_document") == files_of(reference)


@pytest.mark.unit
def test_train_tokenizer_reserves_special_ids(tmp_path):
    """Called from a process that ran torch's OpenMP threads (where a forked SentencePiece
    trainer hung or crashed; it now runs in a fresh interpreter)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.ones(512, 512) @ torch.ones(512, 512)
    torch.set_num_threads(threads)
    prefix = str(tmp_path / "tok")
    assert train_tokenizer_main(["--input", str(CORPUS), "--vocab-size", "600",
                                 "--model-type", "unigram", "--output-prefix", prefix]) == 0
    tok = build_tokenizer(prefix + ".model")
    assert (tok.pad, tok.eod, tok.mask, tok.vocab_size) == (0, 2, 3, 600)


@pytest.mark.unit
def test_blended_sampling_proportions_and_resumable_order(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_indexed_dataset(([10 + i % 7] * 40 for i in range(300)), a, 4000)
    write_indexed_dataset(([2000 + i % 7] * 40 for i in range(300)), b, 4000)

    class Tok:
        vocab_size, eod, pad, unique_identifiers = 4000, 2, 0, {"class": "synthetic"}

    # Megatron's BlendedDataset asks torch.distributed for the rank: a one-process group
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0,
                                         world_size=1)
    try:
        train, _, _ = build_datasets([0.3, a, 0.7, b], Tok(), 32, "100,0,0", 1, [2000, 0, 0],
                                     str(tmp_path / "cache"), reset_position_ids=False)
        from_a = sum(int(train[i]["tokens"][0]) < 1000 for i in range(2000))
    finally:
        torch.distributed.destroy_process_group()
    assert abs(from_a / 2000 - 0.3) < 0.02
    full = list(PretrainingSampler(64, 0, 2, 1, 2))
    resumed = list(PretrainingSampler(64, 16, 2, 1, 2))
    assert resumed == full[4:]  # 16 consumed samples = 4 steps of micro-batch 2 x DP 2
    assert full[0] == [2, 3] and full[1] == [6, 7]  # DP rank 1's slice of each global chunk


@pytest.mark.unit
def test_blend_parsing():
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend([0.3, "a", 0.7, "b"]) == (["a", "b"], [0.3, 0.7])
    with pytest.raises(ValueError, match="alternate weight and prefix"):
        parse_blend([0.3, "a", "b"])
