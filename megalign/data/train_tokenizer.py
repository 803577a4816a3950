"""megalign-train-tokenizer (tools/train_tokenizer.py): a SentencePiece tokenizer for a corpus.

    megalign-train-tokenizer --input 'corpus/*.jsonl.gz' --vocab-size 8000 \\
        --model-type bpe --output-prefix tokenizers/corpus_bpe8k

Reserves pad=0, unk=1, eod=2 and a ``<mask>`` piece (id 3) for diffusion training; the result
is usable by megalign-preprocess and by training (``data.tokenizer``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from megalign.errors import DataError
from megalign.data.preprocess import expand_inputs, read_records
from megalign.data.tokenizer import build_tokenizer, train_sentencepiece


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megalign-train-tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL or .txt (.gz, globs)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--output-prefix", required=True)
    args = parser.parse_args(argv)
    try:
        files = expand_inputs(args.input)
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as text:
            for path in files:
                for _, record, _ in read_records(path, [args.json_key]):
                    if isinstance(record, DataError):
                        raise record
                    if record is not None:
                        text.write(record[args.json_key].replace("\n", " ") + "\n")
            text.flush()
            model = train_sentencepiece([text.name], args.output_prefix, args.vocab_size,
                                        args.model_type)
    except (DataError, RuntimeError, OSError) as err:
        print(f"megalign-train-tokenizer: error: {err}", file=sys.stderr)
        return 2
    tokenizer = build_tokenizer(model)
    print(f"megalign-train-tokenizer: {model}: {tokenizer.vocab_size} pieces, eod={tokenizer.eod}, "
          f"pad={tokenizer.pad}, mask={tokenizer.mask}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
