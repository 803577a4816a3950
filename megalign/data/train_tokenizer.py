"""megalign-train-tokenizer (tools/train_tokenizer.py): a SentencePiece tokenizer for a corpus.

    megalign-train-tokenizer --input 'corpus/*.jsonl.gz' --vocab-size 8000 \\
        --model-type bpe --output-prefix tokenizers/corpus_bpe8k

Reserves pad=0, unk=1, eod=2 and a ``<mask>`` piece (id 3) for diffusion training; the result
is usable by megalign-preprocess and by training (``data.tokenizer``). Inputs are read like
megalign-preprocess's: blank lines are skipped, a bad line stops the run naming file and line, and
an input without documents is an error. The ``.model``/``.vocab`` files are written under
temporary names and renamed when complete. Exit codes: 2 bad input or arguments, 1 an environment
error (permissions, disk), 130 Ctrl-C, 143 SIGTERM; each failure is one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from megalign.data.indexed import DataError, clean_stale_temporaries, make_output_directory
from megalign.data.preprocess import expand_inputs, read_records
from megalign.data.tool import (
    ArgumentParser,
    one_line,
    pipe,
    receive,
    run_tool,
    start_process,
    stop_processes,
)

MODEL_FILES = (".vocab", ".model")  # the .model, which tools open, last


def parse_args(argv=None):
    parser = ArgumentParser(prog="megalign-train-tokenizer", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL or .txt (.gz, globs)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--output-prefix", required=True)
    return parser.parse_args(argv)


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
    process = start_process(_train, (writer, text, prefix, vocab_size, model_type), close=[reader])
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


def train(args) -> None:
    from megalign.data.tokenizer import build_tokenizer

    files = expand_inputs(args.input)
    make_output_directory(args.output_prefix)
    clean_stale_temporaries([args.output_prefix])
    temp = f"{args.output_prefix}.tmp-{os.getpid()}"
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as text:
            _write_documents(files, args.json_key, text)
            _train_in_child(text.name, temp, args.vocab_size, args.model_type)
        for suffix in MODEL_FILES:
            os.replace(temp + suffix, args.output_prefix + suffix)
    finally:
        for suffix in MODEL_FILES:
            if os.path.exists(temp + suffix):
                os.remove(temp + suffix)
    tokenizer = build_tokenizer(args.output_prefix + ".model")
    print(f"megalign-train-tokenizer: {args.output_prefix}.model: {tokenizer.vocab_size} pieces, "
          f"eod {tokenizer.eod_token!r} (id {tokenizer.eod}), pad={tokenizer.pad}, "
          f"mask={tokenizer.mask}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_tool("megalign-train-tokenizer", lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
