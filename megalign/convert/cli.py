"""megalign-convert (tools/convert_checkpoint.py): Hugging Face <-> megalign checkpoints.

    megalign-convert --from hf --to megalign --input HF_DIR [--gguf-file F.gguf] --output DIR \\
        [--tp N --pp N]
    megalign-convert --from megalign --to hf --input CKPT_DIR --output HF_DIR

HF -> megalign writes a weights-only distributed checkpoint (torch_dist) in one process; its
tensors carry global keys, so it loads into any TP/PP layout (``--tp/--pp`` check that the model
can be split that way). Next to it: ``megalign.yaml`` (the model/diffusion/data config sections to
train from it: ``--config megalign.yaml --config run.yaml``) and the tokenizer; ``data.eod_token``
records the token that ends documents (the rule of ``megalign/data/tokenizer.py``, which
megalign-preprocess applies to the same tokenizer directory). The vocabulary is padded to a
multiple of 128 with room for the mask token.

megalign -> HF writes a ``save_pretrained`` directory whose config records the diffusion model's
facts under ``megalign``: bidirectional attention, the mask token id and the shift convention.
Remote code is never run unless ``--trust-remote-code`` is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys

import torch
import yaml

from megalign.config import Config, config_from_dict, to_dict
from megalign.convert.hf import (
    ConversionError,
    check_layout,
    hf_to_megatron,
    megatron_to_hf,
    model_config_from_hf,
)

MEGALIGN_YAML = "megalign.yaml"


def _single_process_group(cfg: Config) -> None:
    from megalign import distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    distributed.initialize(distributed.LaunchEnv(0, 1, 0), 1, 1, cfg.seed)


def _build_single_process_model(cfg: Config):
    from megalign.model.gpt import build_chunks

    _single_process_group(cfg)
    return build_chunks(cfg, cfg.model.padded_vocab_size, causal=True, params_dtype=torch.float32)


def _load_exact(chunk, tensors: dict) -> None:
    """Load every converted tensor; list missing/unexpected names and shape mismatches."""
    expected = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape)
    if missing or unexpected or shapes:
        raise ConversionError(
            "tensors do not match the model:"
            + (f"\n  missing: {missing}" if missing else "")
            + (f"\n  unexpected: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {shapes}" if shapes else "")
        )
    chunk.load_state_dict(tensors, strict=False)


def hf_to_megalign(args) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megalign.checkpoint import save_weights
    from megalign.data.tokenizer import MASK_CANDIDATES, build_tokenizer

    load_kwargs = {"trust_remote_code": args.trust_remote_code}
    if args.gguf_file:
        load_kwargs["gguf_file"] = args.gguf_file
    if not os.path.isdir(args.input):
        raise ConversionError(f"--input '{args.input}' is not a directory")
    hf_model = AutoModelForCausalLM.from_pretrained(args.input, dtype=torch.float32, **load_kwargs)
    model = model_config_from_hf(hf_model.config)
    check_layout(model, args.tp, args.pp)
    rows = hf_model.get_input_embeddings().weight.shape[0]

    tokenizer_dir = os.path.join(args.output, "tokenizer")
    mask_id = rows  # the first padded row, unless the tokenizer has a mask token
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.input, **load_kwargs)
    except (OSError, ValueError, TypeError):
        pass  # a weights-only directory
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        mask_id = next((vocab[t] for t in MASK_CANDIDATES if t in vocab), mask_id)
    multiple = args.make_vocab_size_divisible_by
    padded = -(-max(rows, mask_id + 1) // multiple) * multiple

    cfg = Config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    cfg.model.padded_vocab_size = padded
    cfg.model.make_vocab_size_divisible_by = multiple
    cfg.model.seq_length = min(cfg.model.seq_length, model["max_position_embeddings"])
    cfg.diffusion.mask_token_id = mask_id
    tensors = hf_to_megatron(hf_model.state_dict(), model, padded)
    del hf_model
    chunks = _build_single_process_model(cfg)
    _load_exact(chunks[0], tensors)
    output = os.path.abspath(args.output)
    save_weights(output, chunks, meta={"config": to_dict(cfg), "source": os.path.abspath(args.input),
                                       "hf_vocab_size": rows})
    sections = {
        "model": {**model, "padded_vocab_size": padded, "init_checkpoint": output},
        "diffusion": {"mask_token_id": mask_id},
    }
    if tokenizer is not None:
        tokenizer.save_pretrained(tokenizer_dir)
        # the rule's choice, recorded so that training keeps it and preprocessing can be checked
        eod = build_tokenizer(tokenizer_dir)
        sections["data"] = {"tokenizer": tokenizer_dir, "eod_token": eod.eod_token}
        print(f"megalign-convert: documents end with {eod.eod_token!r} (id {eod.eod}; "
              "data.eod_token)", file=sys.stderr)
    with open(os.path.join(output, MEGALIGN_YAML), "w", encoding="utf-8") as handle:
        yaml.safe_dump(sections, handle, sort_keys=False)
    return output


def megalign_to_hf(args) -> str:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    from megalign.checkpoint import load_checkpoint, read_meta, resolve
    from megalign.model.gather import full_tensors

    path = resolve(args.input)
    meta = read_meta(path)
    if "config" not in meta:
        raise ConversionError(f"checkpoint '{path}' records no model config")
    cfg = config_from_dict(meta["config"])
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.virtual_pipeline_model_parallel_size = None
    cfg.parallel.sequence_parallel = False
    m = cfg.model
    if m.padded_vocab_size is None:
        raise ConversionError(f"checkpoint '{path}' records no padded vocabulary size")
    chunks = _build_single_process_model(cfg)
    load_checkpoint(path, chunks)
    model = {k: getattr(m, k) for k in ("arch", "num_layers", "num_attention_heads",
                                         "num_query_groups", "qkv_bias", "tie_embeddings")}
    hf_state = megatron_to_hf(full_tensors(chunks, "param"), model, m.padded_vocab_size)
    from megalign.model.gpt import ffn_hidden_size

    common = {"vocab_size": m.padded_vocab_size, "tie_word_embeddings": m.tie_embeddings}
    if m.arch == "gpt2":
        hf_config = GPT2Config(n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_attention_heads,
                               n_inner=ffn_hidden_size(cfg), n_positions=m.max_position_embeddings or m.seq_length,
                               layer_norm_epsilon=m.norm_epsilon, activation_function="gelu_new", **common)
        hf_config.architectures = ["GPT2LMHeadModel"]
    else:
        config_class, architecture = (Qwen2Config, "Qwen2ForCausalLM") if m.qkv_bias else (LlamaConfig, "LlamaForCausalLM")
        hf_config = config_class(
            hidden_size=m.hidden_size, intermediate_size=ffn_hidden_size(cfg),
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups or m.num_attention_heads,
            max_position_embeddings=m.max_position_embeddings or m.seq_length,
            rms_norm_eps=m.norm_epsilon, rope_theta=float(m.rotary_base), **common)
        hf_config.architectures = [architecture]
    hf_config.megalign = {
        "attention": "bidirectional",
        "document_attention": m.document_attention,
        "mask_token_id": cfg.diffusion.mask_token_id,
        "shift": cfg.diffusion.shift,
        "source_checkpoint": path,
    }
    hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not (m.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConversionError(f"HF model mismatch: missing {missing}, unexpected {unexpected}")
    hf_model.save_pretrained(args.output)
    tokenizer = cfg.data.tokenizer
    if tokenizer and os.path.isdir(tokenizer):
        for name in os.listdir(tokenizer):
            shutil.copy(os.path.join(tokenizer, name), args.output)
    return args.output


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="megalign-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", choices=["hf", "megalign"], required=True)
    parser.add_argument("--to", dest="target", choices=["hf", "megalign"], required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--gguf-file", help="GGUF file name inside --input (HF input only)")
    parser.add_argument("--tp", type=int, default=1, help="TP size the model must support")
    parser.add_argument("--pp", type=int, default=1, help="PP size the model must support")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow HF repositories to run their own code (off by default)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from megalign import distributed
    from megalign.checkpoint import CheckpointError

    args = parse_args(argv)
    if args.source == args.target:
        print("megalign-convert: error: --from and --to must differ", file=sys.stderr)
        return 2
    try:
        output = hf_to_megalign(args) if args.source == "hf" else megalign_to_hf(args)
    except (ValueError, CheckpointError, OSError) as err:  # incl. ConversionError, ConfigError
        print(f"megalign-convert: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    print(f"megalign-convert: wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
