"""A SentencePiece tokenizer for a corpus (megalign-train-tokenizer's library; the command:
megalign/cli/train_tokenizer.py)."""

from __future__ import annotations

import os
import sys
import tempfile

from megalign.data.indexed import clean_stale_temporaries, make_output_directory
from megalign.data.preprocess import expand_inputs, read_records
from megalign.data.workers import pipe, receive, start_process, stop_processes
from megalign.errors import DataError, one_line

MODEL_FILES = (".vocab", ".model")  # the .model, which tools open, last


def _write_documents(files: list[str], key: str, text) -> None:
    """The documents, one per line, for SentencePiece's trainer; none at all is a DataError."""
    documents = blank = 0
    for path in files:
        for _, record, _ in read_records(path, [key]):
            if isinstance(record, DataError):
                raise record
            if record is None:
                blank += 1
                continue
            text.write(record[key].replace("\n", " ") + "\n")
            documents += 1
    if not documents:
        where = files[0] if len(files) == 1 else f"the {len(files)} input files ({files[0]}, ...)"
        raise DataError(f"{where}: no documents to train on ({blank} blank lines); give an input "
                        "with documents")
    text.flush()


def _train_in_child(text: str, prefix: str, vocab_size: int, model_type: str) -> None:
    """SentencePiece trains in C++ and returns to Python, where signals are handled, only when
    done: in a child process the tool can stop at once."""
    reader, writer = pipe()
    # SentencePiece's trainer hangs in a forked child of a process that ran torch's OpenMP
    # threads (the library called from Python with torch loaded, as in a notebook): there, a
    # fresh interpreter; the command never imports torch and forks
    process = start_process(_train, (writer, text, prefix, vocab_size, model_type), close=[reader],
                            fresh_interpreter="torch" in sys.modules)
    writer.close()
    try:
        receive(reader, process, "SentencePiece trainer")
    finally:
        stop_processes([process])
        reader.close()


def _train(results, text, prefix, vocab_size, model_type) -> None:
    from megalign.data.tokenizer import train_sentencepiece

    try:
        train_sentencepiece([text], prefix, vocab_size, model_type)
        outcome = None
    except OSError as err:
        outcome = err
    except Exception as err:  # SentencePiece's RuntimeError: writing the model, or the input
        if prefix in str(err):
            outcome = OSError(f"cannot write the model: {one_line(err)}")
        else:
            outcome = DataError(f"SentencePiece cannot train on this input: {one_line(err)}")
    results.send(outcome)


def train_tokenizer(inputs: list[str], json_key: str, vocab_size: int, model_type: str,
                    output_prefix: str) -> str:
    """``output_prefix``.model/.vocab trained on ``inputs``; returns the .model's path."""
    files = expand_inputs(inputs)
    make_output_directory(output_prefix)
    clean_stale_temporaries([output_prefix])
    temp = f"{output_prefix}.tmp-{os.getpid()}"
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as text:
            _write_documents(files, json_key, text)
            _train_in_child(text.name, temp, vocab_size, model_type)
        for suffix in MODEL_FILES:
            os.replace(temp + suffix, output_prefix + suffix)
    finally:
        for suffix in MODEL_FILES:
            if os.path.exists(temp + suffix):
                os.remove(temp + suffix)
    return output_prefix + ".model"
