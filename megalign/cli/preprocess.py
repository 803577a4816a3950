"""megalign-preprocess (tools/preprocess_data.py): corpora -> Megatron ``.bin/.idx`` files.

    megalign-preprocess --input 'corpus/*.jsonl.gz' --tokenizer tokenizer.model \\
        --output-prefix data/corpus --append-eod --workers 2

Inputs: JSONL files (``.jsonl``/``.json``, optionally ``.gz``; globs allowed) or plain text
(``.txt``, optionally ``.gz``; one document per line). Blank lines are skipped and counted in
both. One output per JSON key: ``<output-prefix>_<key>_document.{bin,idx}`` (Megatron-LM's
naming), written under temporary names and renamed when complete. The main process reads the
input in order and writes the output; ``--workers`` processes parse and tokenize batches of lines,
so the output is byte-identical for any worker count. ``--partitions K`` splits the input into K
contiguous ranges processed in parallel and merged in order (equal to a single pass);
``--merge PREFIX...`` merges existing datasets.

Instruction data (``--sft prompt:response`` for two JSON keys, or ``--sft messages`` for chat
messages through a Hugging Face tokenizer's chat template): ``<output-prefix>_sft_document``
plus its loss-mask stream ``<output-prefix>_sft_document_loss_mask`` (1 on response tokens, 0 on
the prompt), for training with ``data.sft=true``.

End of document (``--append-eod``): ``--eod-token TEXT|ID`` names the token; without it the first
of <|endoftext|>, </s>, <|end_of_text|>, <eos>, <|im_end|> in the vocabulary, else the tokenizer's
eos token (the same rule for every tokenizer form and in training). The summary names it.

Bad input (malformed JSON, a missing key, non-UTF-8 bytes, an empty document) stops the run with
the file and line, unless ``--skip-bad`` is given: then it is skipped and counted. An input without
documents is an error. Exit codes: 2 bad input or arguments, 1 an environment error (permissions,
disk), 130 Ctrl-C, 143 SIGTERM; each failure is one line and leaves no output or temporary files.
"""

# Imports inside functions are deliberate here: a command parses its arguments before importing its
# library; the data tools never import torch.

from __future__ import annotations

import argparse
import sys

from megalign.cli.common import ArgumentParser, run_command


def parse_args(argv=None):
    parser = ArgumentParser(prog="megalign-preprocess", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="JSONL or .txt files (.gz and globs allowed)")
    parser.add_argument("--tokenizer",
                        help="SentencePiece .model, HF tokenizer.json or HF directory")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--sft", metavar="PROMPT_KEY:RESPONSE_KEY|MESSAGES_KEY",
                        help="instruction data for diffusion SFT: tokens and a loss-mask stream "
                             "(see megalign/data/sft.py); --json-keys is not used")
    parser.add_argument("--append-eod", action="store_true",
                        help="end every document with the end-of-document token")
    parser.add_argument("--eod-token", metavar="TEXT|ID",
                        help="the end-of-document token (its text, or its id); default: see above")
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizing processes besides the one reading and writing")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad documents")
    parser.add_argument("--dtype", choices=["auto", "uint16", "int32"], default="auto")
    parser.add_argument("--merge", nargs="+", metavar="PREFIX",
                        help="merge these datasets (in order) into --output-prefix and exit")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _run(args) -> None:
    from megalign.data.preprocess import merge_datasets, preprocess
    from megalign.errors import DataError

    if args.merge:
        merge_datasets(args.merge, args.output_prefix)
        print(f"megalign-preprocess: merged {len(args.merge)} datasets -> {args.output_prefix}",
              file=sys.stderr)
        return
    if not args.input or not args.tokenizer:
        raise DataError("--input and --tokenizer are required (or --merge PREFIX ...)")
    if args.workers < 1 or args.partitions < 1:
        raise DataError("--workers and --partitions must be at least 1")
    if args.eod_token is not None and not args.append_eod and not args.sft:
        raise DataError("--eod-token names the token --append-eod appends; add --append-eod")
    preprocess(args.input, args.tokenizer, args.output_prefix, args.json_keys, args.append_eod,
               args.workers, args.partitions, args.skip_bad, args.dtype,
               progress=not args.no_progress, eod_token=args.eod_token, sft=args.sft)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command("megalign-preprocess", lambda: _run(args), one_line_failures=True)


if __name__ == "__main__":
    sys.exit(main())
