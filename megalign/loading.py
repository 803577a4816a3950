"""Opening a checkpoint for inference: its config and tokenizer, the diffusion student and the
AR model it started from, in whatever TP/PP layout the process was launched with.

A checkpoint is a training checkpoint (``iter_NNNNNNN``, or a root with ``latest``) or a model
written by megalign-convert, which is taken as the step-0 student (the mask row initialised as
training initialises it) and is its own AR model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megalign.data.vocabulary import Vocabulary


def load_config_from_checkpoint(path: str, overrides: list[str]):
    from megalign.checkpoint import read_meta
    from megalign.errors import CheckpointError
    from megalign.config import config_from_dict, parse_override, set_dotted

    meta = read_meta(path)
    tree = meta.get("config")
    if tree is None:
        raise CheckpointError(f"checkpoint '{path}' records no config")
    tree.setdefault("parallel", {}).update(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, sequence_parallel=False)
    tree["model"]["document_attention"] = True  # explicit masks keep batch padding out
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return config_from_dict(tree, path), meta


@dataclass
class Opened:
    """A checkpoint's config and tokenizer, before any process group or weights exist."""

    path: str
    cfg: object
    meta: dict
    tokenizer: object
    vocab: Vocabulary


def open_checkpoint(checkpoint: str, overrides: list[str]) -> Opened:
    """Resolve ``checkpoint`` and read what inference needs; fails early without a mask token."""
    from megalign.checkpoint import resolve
    from megalign.data.tokenizer import build_tokenizer
    from megalign.errors import ConfigError

    path = resolve(checkpoint)
    cfg, meta = load_config_from_checkpoint(path, overrides)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    vocab = Vocabulary.of(cfg, tokenizer)
    if vocab.mask >= vocab.padded:
        raise ConfigError(f"the model has no mask token (id {vocab.mask} >= vocabulary "
                          f"{vocab.padded})")
    return Opened(path, cfg, meta, tokenizer, vocab)


def load_student(opened: Opened, dtype: torch.dtype = torch.float32) -> list:
    """The bidirectional student's chunks, resharded into the launch layout (``parallel.*`` of the
    config; one process: TP=1, PP=1); starts the process groups unless they exist. ``dtype``:
    the weights' type for inference (bfloat16 halves the bytes a decoding step reads)."""
    from megatron.core import parallel_state

    from megalign import distributed
    from megalign.checkpoint import load_checkpoint
    from megalign.model.gpt import build_chunks

    cfg = opened.cfg
    if not parallel_state.model_parallel_is_initialized():
        distributed.initialize(distributed.launch_env(), cfg.parallel.tensor_model_parallel_size,
                               cfg.parallel.pipeline_model_parallel_size, cfg.seed)
    chunks = build_chunks(cfg, opened.vocab.padded, causal=False, params_dtype=torch.float32)
    load_checkpoint(opened.path, chunks)
    if is_converted_ar_model(opened.meta) and cfg.model.mask_token_init == "mean":
        # the step-0 student: what training starts from (megalign.training.trainer.build_models)
        from megalign.model.embedding import init_mask_token_embedding

        for chunk in chunks:
            init_mask_token_embedding(chunk, opened.vocab.mask, opened.vocab.size)
    if dtype != torch.float32:
        for chunk in chunks:  # the weights, and the activations pipeline stages exchange
            chunk.to(dtype)
            chunk.config.params_dtype = chunk.config.pipeline_dtype = dtype
    return chunks


def is_converted_ar_model(meta: dict) -> bool:
    """A weights-only checkpoint written by megalign-convert: the AR model, not yet trained."""
    return "iteration" not in meta


def load_ar_model(cfg, meta: dict, path: str, padded_vocab: int) -> list:
    """The causal AR model a run started from (``meta['ar_checkpoint']``; a converted AR model is
    its own), for --ar and generative perplexity."""
    from dataclasses import replace

    from megalign.checkpoint import load_checkpoint

    from megalign.errors import CheckpointError
    from megalign.model.gpt import build_chunks

    teacher = meta.get("ar_checkpoint") or (path if is_converted_ar_model(meta) else None)
    if not teacher:
        raise CheckpointError(f"checkpoint '{path}' records no AR checkpoint for --ar")
    causal_cfg = replace(cfg, model=replace(cfg.model, document_attention=False))
    causal = build_chunks(causal_cfg, padded_vocab, causal=True, params_dtype=torch.float32)
    load_checkpoint(teacher, causal)
    return causal
