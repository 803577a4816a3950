"""Opening a checkpoint for inference: its config and tokenizer, the diffusion student and the
AR model it started from, in whatever TP/PP layout the process was launched with.

A checkpoint is a training checkpoint (``iter_NNNNNNN``, or a root with ``latest``) or a model
written by megalign-convert, which is taken as the step-0 student (the mask row initialised as
training initialises it) and is its own AR model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from megatron.core import parallel_state

from megalign import distributed
from megalign.checkpoint import load_checkpoint, read_meta, resolve
from megalign.config import (
    ParallelConfig,
    check_vocabulary,
    config_from_dict,
    parse_override,
    set_dotted,
    to_dict,
)
from megalign.data.tokenizer import build_tokenizer
from megalign.data.vocabulary import Vocabulary
from megalign.errors import CheckpointError, ConfigError, one_line
from megalign.model.embedding import init_mask_token_embedding
from megalign.model.gpt import ModelBuild, build_chunks, cast_chunk


def recorded_config(path: str):
    """The config a checkpoint directory records (``${config_dir}`` resolved), and its meta;
    a missing or unreadable one is a CheckpointError naming the directory."""
    meta = read_meta(path)
    tree = meta.get("config")
    if not isinstance(tree, dict):
        raise CheckpointError(f"checkpoint '{path}' records no config")
    try:
        return config_from_dict(tree, path), meta
    except ConfigError as err:
        raise CheckpointError(f"checkpoint '{path}' records a config megalign cannot read "
                              f"({err}); it may be damaged or from another version") from None


def load_config_from_checkpoint(path: str, overrides: list[str]):
    """The recorded config for inference in one process (or the layout ``overrides`` give)."""
    recorded, meta = recorded_config(path)
    tree = to_dict(replace(recorded, parallel=ParallelConfig(),  # the sampler's masks:
                           model=replace(recorded.model, document_attention=True,
                                         document_format="mask")))
    for text in overrides:  # keep batch padding out
        set_dotted(tree, *parse_override(text))
    cfg = config_from_dict(tree, path)
    if cfg.parallel.context_parallel_size > 1:
        raise ConfigError("parallel.context_parallel_size: sampling and evaluating commands run "
                          "without context parallelism (a checkpoint trained with it loads into "
                          "any layout); leave it at 1")
    return cfg, meta


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
    path = resolve(checkpoint)
    cfg, meta = load_config_from_checkpoint(path, overrides)
    if not cfg.data.tokenizer:
        raise ConfigError(f"checkpoint '{path}' records no tokenizer; give one with "
                          "data.tokenizer=PATH")
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} (of checkpoint '{path}', or "
                          f"overridden): {one_line(err)}") from None
    try:
        check_vocabulary(cfg, tokenizer.vocab_size, tokenizer.mask)
    except ConfigError as err:
        raise ConfigError(f"checkpoint '{path}' (with the overrides given): {err}") from None
    return Opened(path, cfg, meta, tokenizer, Vocabulary.of(cfg, tokenizer))


def load_student(opened: Opened, dtype: torch.dtype = torch.float32) -> list:
    """The bidirectional student's chunks, resharded into the launch layout (``parallel.*`` of the
    config; one process: TP=1, PP=1); starts the process groups unless they exist. ``dtype``:
    the weights' type for inference (bfloat16 halves the bytes a decoding step reads)."""
    cfg = opened.cfg
    if not parallel_state.model_parallel_is_initialized():
        distributed.initialize(distributed.launch_env(), cfg.parallel.tensor_model_parallel_size,
                               cfg.parallel.pipeline_model_parallel_size, cfg.seed,
                               expert_parallel=cfg.parallel.expert_model_parallel_size)
    chunks = build_chunks(ModelBuild.of(cfg, causal=False, params_dtype=torch.float32),
                          opened.vocab.padded)
    load_checkpoint(opened.path, chunks)
    start_step0_student(chunks, cfg, opened.meta, opened.vocab)
    if dtype != torch.float32:
        for chunk in chunks:
            cast_chunk(chunk, dtype)
    return chunks


def start_step0_student(chunks: list, cfg, meta: dict, vocab: Vocabulary) -> None:
    """A converted AR model's mask row initialised as training initialises it
    (megalign.training.trainer.build_models), so that the step-0 student sampled, evaluated or
    exported is the one training starts from; a trained checkpoint is left as it is."""
    if is_converted_ar_model(meta) and cfg.model.mask_token_init == "mean":
        for chunk in chunks:
            init_mask_token_embedding(chunk, vocab.mask, vocab.size)


def is_converted_ar_model(meta: dict) -> bool:
    """A weights-only checkpoint written by megalign-convert: the AR model, not yet trained."""
    return "iteration" not in meta


def load_ar_model(cfg, meta: dict, path: str, padded_vocab: int) -> list:
    """The causal AR model a run started from (``meta['ar_checkpoint']``; a converted AR model is
    its own), for --ar and generative perplexity."""
    teacher = meta.get("ar_checkpoint") or (path if is_converted_ar_model(meta) else None)
    if not teacher:
        raise CheckpointError(f"checkpoint '{path}' records no AR checkpoint for --ar")
    # plain causal attention over whole rows, whatever the run's document attention
    causal = build_chunks(ModelBuild(cfg.model, cfg.parallel), padded_vocab)
    load_checkpoint(teacher, causal)
    return causal
