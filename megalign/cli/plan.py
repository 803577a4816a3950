"""megalign-plan: the memory each rank of a training layout will need, before launching it.

    megalign-plan --config FILE --world-size N [--hf-config DIR|config.json] [key.sub=value ...]

Per pipeline stage (every tensor-, expert- and data-parallel rank of a stage holds the same): the
student's weights, fp32 gradients and optimizer states (sharded over data parallelism with
optimizer.distributed), the frozen teacher net of the tensors it shares with the student, the
activations of the micro-batches 1F1B keeps in flight (with recomputation as configured), the
aligned teacher states held for the backward and the last stage's logits. ``--hf-config`` takes
the architecture and vocabulary from a Hugging Face config (no weights needed); otherwise the
vocabulary comes from ``data.tokenizer`` or ``--vocab-size``. ``--gpu`` plans for Transformer
Engine on GPUs (bf16 teacher by default, no local attention buffer; activations then an upper
bound). megalign-train logs the same plan and, at the end, the measured peak per rank
(``<run_dir>/memory.json``). How it is counted and checked: docs/training.md.
"""

# Imports inside functions are deliberate here: a command parses its arguments before importing
# torch and Megatron-Core (fast --help and usage errors).

from __future__ import annotations

import argparse
import json
import os
import sys

from megalign.cli.common import ArgumentParser, run_command
from megalign.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="megalign-plan", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[],
                        help="YAML run configuration(s), merged in order")
    parser.add_argument("--world-size", type=int, required=True,
                        help="processes of the launch (data parallelism is what TP x PP leaves)")
    parser.add_argument("--hf-config", help="a Hugging Face model directory or its config.json: "
                                            "the model section and the vocabulary")
    parser.add_argument("--vocab-size", type=int, help="the tokenizer's vocabulary (default: "
                                                       "--hf-config's, else data.tokenizer's)")
    parser.add_argument("--gpu", action="store_true",
                        help="plan for GPUs with Transformer Engine (default: this machine)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    parser.add_argument("overrides", nargs="*",
                        help="dotted overrides, e.g. data.micro_batch_size=4")
    return parser


def hf_model_overrides(path: str) -> tuple[list[str], int]:
    """``model.*`` overrides and the vocabulary size of a Hugging Face config."""
    from transformers import AutoConfig

    from megalign.convert.hf import model_config_from_hf

    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            fields = json.load(handle)
        if "model_type" not in fields:
            raise ConfigError(f"{path}: no model_type field; give a Hugging Face config.json")
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    elif os.path.isdir(path):
        hf_config = AutoConfig.from_pretrained(path)
    else:
        raise ConfigError(f"--hf-config {path}: no such file or directory")
    model = model_config_from_hf(hf_config)
    return [f"model.{key}={json.dumps(value)}" for key, value in model.items()], \
        hf_config.vocab_size


def plan_command(args) -> None:
    import torch

    from megalign.config import check_batches, check_vocabulary, load_config, padded_vocab_size
    from megalign.training import memory_plan

    overrides, vocab = [], args.vocab_size
    if args.hf_config:
        overrides, hf_vocab = hf_model_overrides(args.hf_config)
        vocab = vocab or hf_vocab
    cfg = load_config(args.config, [*overrides, *args.overrides])
    mask = None
    if vocab is None:
        if not cfg.data.tokenizer:
            raise ConfigError("no vocabulary: give --vocab-size, --hf-config or data.tokenizer")
        from megalign.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
        vocab, mask = tokenizer.vocab_size, tokenizer.mask
    if args.world_size < 1:
        raise ConfigError(f"--world-size {args.world_size}: give at least 1")
    check_batches(cfg, args.world_size)
    check_vocabulary(cfg, vocab, mask)
    gpu = args.gpu or torch.cuda.is_available()
    stages = memory_plan.plan(cfg, padded_vocab_size(cfg.model, vocab, mask), args.world_size, gpu)
    if args.json:
        print(json.dumps({"world_size": args.world_size, "gpu": gpu, "stages": [
            {"stage": s.stage, "total_bytes": s.total, "bytes": s.bytes,
             "parameters": s.parameters, "trainable": s.trainable, "in_flight": s.in_flight,
             "notes": s.notes} for s in stages]}))
        return
    p = cfg.parallel
    context = f" x CP {p.context_parallel_size}" if p.context_parallel_size > 1 else ""
    print(f"megalign-plan: world {args.world_size} = TP {p.tensor_model_parallel_size} x PP "
          f"{p.pipeline_model_parallel_size}{context} x DP {args.world_size // p.replica_size}, "
          f"{cfg.precision}, {'GPU (Transformer Engine)' if gpu else 'CPU (local spec)'}")
    print("\n".join(memory_plan.describe(stages)))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("megalign-plan", lambda: plan_command(args))


if __name__ == "__main__":
    sys.exit(main())
