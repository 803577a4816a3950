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

# Imports inside functions are deliberate here: a command parses its arguments before importing its
# library; the data tools never import torch.

from __future__ import annotations

import argparse
import sys

from megalign.cli.common import ArgumentParser, run_command


def parse_args(argv=None):
    parser = ArgumentParser(prog="megalign-train-tokenizer", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL or .txt (.gz, globs)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--output-prefix", required=True)
    return parser.parse_args(argv)


def train(args) -> None:
    from megalign.data.tokenizer import build_tokenizer
    from megalign.data.train_tokenizer import train_tokenizer

    model = train_tokenizer(args.input, args.json_key, args.vocab_size, args.model_type,
                            args.output_prefix)
    tokenizer = build_tokenizer(model)
    print(f"megalign-train-tokenizer: {model}: {tokenizer.vocab_size} pieces, "
          f"eod {tokenizer.eod_token!r} (id {tokenizer.eod}), pad={tokenizer.pad}, "
          f"mask={tokenizer.mask}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command("megalign-train-tokenizer", lambda: train(args), one_line_failures=True)


if __name__ == "__main__":
    sys.exit(main())
