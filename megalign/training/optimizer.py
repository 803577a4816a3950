"""The student's optimizer, owning its policies: which parameters train (``optimizer.freeze``),
Megatron-Core's DDP wrapping and optimizer, the learning-rate schedule, and the bytes per rank its
gradients and states take (the memory plan asks here)."""

from __future__ import annotations

import re

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megalign.config import Config
from megalign.errors import TrainingError
from megalign.model.gpt import global_parameter_name
from megalign.model.memory import FP32
from megalign.platform import collectives

TIED = ("embedding.word_embeddings.weight", "output_layer.weight")


def logical_names(name: str, tied: bool) -> list[str]:
    """The names a pattern of ``optimizer.freeze`` is matched against: with tied embeddings the
    last stage's output layer is a copy of the word embedding, one logical tensor under both
    names."""
    return list(TIED) if tied and name in TIED else [name]


def is_frozen(name: str, cfg: Config) -> bool:
    """Whether ``optimizer.freeze`` freezes the parameter of global name ``name``."""
    names = logical_names(name, cfg.model.tie_embeddings)
    return any(re.search(pattern, n) for pattern in cfg.optimizer.freeze for n in names)


def freeze_parameters(chunks: list, patterns: list[str]) -> int:
    """requires_grad=False for parameters whose global name matches a pattern (re.search).

    With tied embeddings the last pipeline stage holds a copy of the word embedding as its output
    layer; both names refer to one logical tensor, so a pattern matching either freezes both.
    """
    matches = torch.zeros(len(patterns), dtype=torch.int64)
    frozen = 0
    named = [(chunk, name, param) for chunk in chunks for name, param in chunk.named_parameters()]
    for chunk, name, param in named:
        names = logical_names(global_parameter_name(name, chunk),
                              chunk.share_embeddings_and_output_weights)
        hit = [any(re.search(p, n) for n in names) for p in patterns]
        matches += torch.tensor(hit, dtype=torch.int64)
        if any(hit):
            param.requires_grad_(False)
            frozen += param.numel()
    collectives.all_reduce(matches)
    unmatched = [p for p, n in zip(patterns, matches.tolist()) if n == 0]
    if unmatched:
        raise TrainingError(
            f"optimizer.freeze patterns {unmatched} match no parameter; names look like "
            "'embedding.word_embeddings.weight', 'decoder.layers.0.mlp.linear_fc1.weight', "
            "'output_layer.weight'"
        )
    return frozen


def wrap_and_optimize(cfg: Config, students: list):
    config = students[0].config
    if config.bf16:  # as Megatron-LM: fp32 outputs from the last stage, bf16 inputs to the first
        wrapped = [Float16Module(config, chunk) for chunk in students]
    else:
        wrapped = students
    models = [
        DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optimizer.distributed),
            module=chunk,
            disable_bucketing=index > 0,  # as Megatron-LM: only the first chunk overlaps
        )
        for index, chunk in enumerate(wrapped)
    ]
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            decoupled_weight_decay=o.name == "adamw",
            adam_beta1=o.beta1,
            adam_beta2=o.beta2,
            adam_eps=o.eps,
            clip_grad=o.clip_grad,
            bf16=cfg.precision != "fp32",
            params_dtype=config.params_dtype,
            use_distributed_optimizer=o.distributed,
        ),
        models,
    )
    gbs, s = cfg.data.global_batch_size, cfg.schedule
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_iters * gbs,
        lr_decay_steps=s.train_iters * gbs,
        lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=s.train_iters * gbs,
        wd_incr_style="constant",
        override_opt_param_scheduler=True,  # on resume the current config's schedule applies
        use_checkpoint_opt_param_scheduler=False,
    )
    no_sync = [model.no_sync for model in models]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if cfg.precision != "fp32" else None
    return models, optimizer, scheduler


def gradient_bytes(trainable: int) -> int:
    """The DDP gradient buffer: fp32 (``grad_reduce_in_fp32``), trainable parameters only."""
    return trainable * FP32


def state_bytes(cfg: Config, table: list[tuple[str, int]], dp: int) -> int:
    """Adam's two moments (and fp32 main weights under mixed precision) of the trainable entries
    of ``table`` (name, elements on one rank); with ``optimizer.distributed`` divided over the
    ranks holding the same parameters (data parallel; experts: data / expert parallel)."""
    per_parameter = FP32 * (3 if cfg.precision != "fp32" else 2)
    trainable = [(name, n) for name, n in table if not is_frozen(name, cfg)]
    dense = sum(n for name, n in trainable if ".experts." not in name)
    experts = sum(n for name, n in trainable if ".experts." in name)
    if not cfg.optimizer.distributed:
        return (dense + experts) * per_parameter
    return (dense * per_parameter // dp
            + experts * per_parameter // (dp // cfg.parallel.expert_model_parallel_size))
