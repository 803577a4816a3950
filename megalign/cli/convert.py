"""megalign-convert: Hugging Face <-> megalign checkpoints (megalign/convert/checkpoints.py).

    megalign-convert --from hf --to megalign --input HF_DIR [--gguf-file F.gguf] --output DIR \\
        [--tp N --pp N]
    megalign-convert --from megalign --to hf --input CKPT_DIR --output HF_DIR
    megalign-convert --from megalign --to dream --input CKPT_DIR --output DREAM_DIR
    megalign-convert --from megalign --to gguf --input CKPT_DIR --output FILE.gguf
    megalign-convert --from megalign --to fast-dllm-v2 ...   (refused: why, in one line)

--to hf writes megalign's own transformers format (every student megalign trains); --to dream
writes Dream's format, which Dream's code, Fast-dLLM, dllm, Diffulex and llama.cpp's converter
read (dense Llama-family students with bidirectional decoding: docs/hugging-face.md); --to gguf
writes such a student trained with a SentencePiece tokenizer as a GGUF file of llama.cpp's Dream
architecture (mixtures of experts with QK-norm as its RND1 or LLaDA-MoE architecture, by their
router); --to fast-dllm-v2 says why Fast-dLLM v2's format cannot hold the student (its block
decoding differs from megalign's).
"""

# Imports inside functions are deliberate here: a command parses its arguments before importing
# torch, Megatron-Core or transformers (fast --help and usage errors).

from __future__ import annotations

import argparse
import sys

from megalign.cli.common import ArgumentParser, run_command


def parse_args(argv=None):
    parser = ArgumentParser(prog="megalign-convert", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", choices=["hf", "megalign"], required=True)
    parser.add_argument("--to", dest="target",
                        choices=["hf", "megalign", "dream", "gguf", "fast-dllm-v2"],
                        required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--gguf-file", help="GGUF file name inside --input (HF input only)")
    parser.add_argument("--tp", type=int, default=1, help="TP size the model must support")
    parser.add_argument("--pp", type=int, default=1, help="PP size the model must support")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow HF repositories to run their own code (off by default)")
    return parser.parse_args(argv)


def convert(args) -> None:
    from megalign.convert.checkpoints import hf_to_megalign, megalign_to_hf

    if args.source == args.target:
        raise ValueError("--from and --to must differ")
    if args.target in ("dream", "gguf", "fast-dllm-v2"):
        from megalign.convert.dream import megalign_to_dream
        from megalign.convert.dream_gguf import megalign_to_gguf
        from megalign.convert.fast_dllm import megalign_to_fast_dllm_v2

        if args.source != "megalign":
            raise ValueError(f"--to {args.target} converts a megalign checkpoint "
                             "(--from megalign)")
        export = {"dream": megalign_to_dream, "gguf": megalign_to_gguf,
                  "fast-dllm-v2": megalign_to_fast_dllm_v2}[args.target]
        output = export(args.input, args.output)
    elif args.source == "hf":
        output = hf_to_megalign(args.input, args.output, args.gguf_file, args.tp, args.pp,
                                args.make_vocab_size_divisible_by, args.trust_remote_code)
    else:
        output = megalign_to_hf(args.input, args.output)
    print(f"megalign-convert: wrote {output}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command("megalign-convert", lambda: convert(args))


if __name__ == "__main__":
    sys.exit(main())
