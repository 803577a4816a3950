"""megalign-preprocess (tools/preprocess_data.py): JSONL (.jsonl / .jsonl.gz) -> Megatron ``.bin/.idx`` with a SentencePiece model.

    megalign-preprocess --input data/corpus/kjv.jsonl.gz --tokenizer data/tokenizer/kjv_bpe4k.model \
        --output-prefix data/kjv --append-eod

Writes ``<output-prefix>_<key>_document.{bin,idx}`` (Megatron-LM's naming) atomically.
"""

from __future__ import annotations

import argparse
import sys
import time

from megalign.data.indexed import DataError, read_jsonl, write_indexed_dataset
from megalign.data.tokenizer import build_tokenizer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="megalign-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help="JSONL files (.gz allowed)")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model file")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-keys", default="text")
    parser.add_argument("--append-eod", action="store_true")
    return parser.parse_args(argv)


def preprocess(inputs, tokenizer_file, output_prefix, key="text", append_eod=True) -> str:
    tokenizer = build_tokenizer(tokenizer_file)
    suffix = [tokenizer.eod] if append_eod else []

    def documents():
        for path in inputs:
            for text in read_jsonl(path, key):
                yield tokenizer.encode(text) + suffix

    prefix = f"{output_prefix}_{key}_document"
    start = time.perf_counter()
    docs, tokens = write_indexed_dataset(documents(), prefix, tokenizer.vocab_size)
    seconds = time.perf_counter() - start
    print(f"megalign-preprocess: {docs} documents, {tokens} tokens, {seconds:.1f} s -> {prefix}")
    return prefix


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        preprocess(args.input, args.tokenizer, args.output_prefix, args.json_keys, args.append_eod)
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"megalign-preprocess: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
