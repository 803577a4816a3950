"""What a config is checked against beyond itself: the tokenizer's vocabulary (every command that
builds a model) and the launch (training: world size, batches, what each objective allows).

A config's sections and the model's layout were checked when it was built (``sections.py``);
these checks need what only a command knows, so each command calls them once, before any process
group exists.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import yaml

from megalign.config.sections import Config, ModelConfig
from megalign.errors import ConfigError


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def required_vocab_size(tokenizer_vocab: int, tokenizer_mask: Optional[int]) -> int:
    """Rows the model needs: the tokenizer's vocabulary plus a mask row when it has no <mask>."""
    return tokenizer_vocab + (0 if tokenizer_mask is not None else 1)


def padded_vocab_size(model: ModelConfig, tokenizer_vocab: int,
                      tokenizer_mask: Optional[int]) -> int:
    """Vocabulary rows in the embedding; independent of TP so every layout trains the same model."""
    if model.padded_vocab_size is not None:
        return model.padded_vocab_size
    need = required_vocab_size(tokenizer_vocab, tokenizer_mask)
    return _round_up(need, model.make_vocab_size_divisible_by)


def mask_token_id(cfg: Config, tokenizer_vocab: int, tokenizer_mask: Optional[int]) -> int:
    if cfg.diffusion.mask_token_id is not None:
        return cfg.diffusion.mask_token_id
    return tokenizer_mask if tokenizer_mask is not None else tokenizer_vocab


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // cfg.parallel.replica_size


def evaluation_batch_size(cfg: Config) -> int:
    """The samples evaluation scores at once: ``evaluation.batch_size``, else the micro-batch."""
    return cfg.evaluation.batch_size or cfg.data.micro_batch_size


def check_vocabulary(cfg: Config, tokenizer_vocab: int, tokenizer_mask: Optional[int]) -> None:
    """The padded vocabulary holds the tokenizer and the mask token, and splits over TP."""
    tp = cfg.parallel.tensor_model_parallel_size
    need = required_vocab_size(tokenizer_vocab, tokenizer_mask)
    vocab = padded_vocab_size(cfg.model, tokenizer_vocab, tokenizer_mask)
    if vocab < need:
        raise ConfigError(f"model.padded_vocab_size={vocab} is smaller than the {need} rows the "
                          "tokenizer and the mask token need")
    if vocab % tp != 0:
        key = ("model.padded_vocab_size" if cfg.model.padded_vocab_size is not None
               else "model.make_vocab_size_divisible_by")
        raise ConfigError(f"{key}: the padded vocabulary ({vocab}) is not divisible by "
                          f"tensor_model_parallel_size={tp}; use a multiple of {tp}")
    mask = mask_token_id(cfg, tokenizer_vocab, tokenizer_mask)
    if not 0 <= mask < vocab:
        raise ConfigError(f"diffusion.mask_token_id={mask} lies outside the padded vocabulary "
                          f"(0..{vocab - 1})")


def validate(cfg: Config, world_size: int, tokenizer_vocab: Optional[int] = None,
             tokenizer_mask: Optional[int] = None) -> None:
    """What training needs besides a well-formed config: the launch's world size and batches,
    the tokenizer's vocabulary, and the settings that only training reads."""
    if tokenizer_vocab is not None:
        check_vocabulary(cfg, tokenizer_vocab, tokenizer_mask)
    check_batches(cfg, world_size)
    _check_training_settings(cfg)
    if cfg.objective == "ar":
        _check_causal_lm(cfg)
    if not cfg.data.paths:
        raise ConfigError("data.paths is empty; give [prefix] or [weight1, prefix1, ...]")
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty; give a SentencePiece .model file")
    resiliency = importlib.util.find_spec("nvidia_resiliency_ext")
    if cfg.resilience.inprocess_restart and resiliency is None:
        raise ConfigError(
            "resilience.inprocess_restart=true needs NVIDIA's resiliency extension, which this "
            "Python cannot import: pip install 'megalign[resilience]' (nvidia-resiliency-ext), "
            "or set resilience.inprocess_restart=false")


def check_batches(cfg: Config, world_size: int) -> None:
    """The layout divides the world size and the batches divide over data parallelism."""
    p, d = cfg.parallel, cfg.data
    tp, pp, cp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.context_parallel_size)
    if world_size % (tp * pp * cp) != 0:
        context = f" x context ({cp})" if cp > 1 else ""
        raise ConfigError(
            f"parallel: tensor ({tp}) x pipeline ({pp}){context} = {tp * pp * cp} does not divide "
            f"the world size {world_size}; launch a multiple of {tp * pp * cp} processes or change "
            "the parallel sizes")
    check_context_parallel(cfg)
    dp = data_parallel_size(cfg, world_size)
    if cfg.model.num_experts and tp > 1 and not p.sequence_parallel:
        raise ConfigError("training experts with parallel.tensor_model_parallel_size > 1 needs "
                          "parallel.sequence_parallel=true (Megatron-Core's MoE layer)")
    if dp % p.expert_model_parallel_size:
        raise ConfigError(
            f"parallel.expert_model_parallel_size={p.expert_model_parallel_size} does not divide "
            f"the data-parallel size {dp}; launch more processes or use a smaller one")
    if d.global_batch_size % (d.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by "
            f"data.micro_batch_size ({d.micro_batch_size}) x data-parallel size ({dp}); "
            f"use a multiple of {d.micro_batch_size * dp}")
    if (p.virtual_pipeline_model_parallel_size is not None
            and (d.global_batch_size // (d.micro_batch_size * dp)) % pp != 0):
        raise ConfigError(
            f"data.global_batch_size={d.global_batch_size}: the interleaved schedule needs a "
            f"number of micro-batches per step divisible by pipeline_model_parallel_size={pp}; "
            f"use a multiple of {d.micro_batch_size * dp * pp}")


def check_context_parallel(cfg: Config) -> None:
    """The sequence splits into the context-parallel layout, and what runs under it can."""
    p, seq = cfg.parallel, cfg.model.seq_length
    cp = p.context_parallel_size
    if cp == 1:
        return
    split = 2 * cp * (p.tensor_model_parallel_size if p.sequence_parallel else 1)
    if seq % split:
        raise ConfigError(
            f"model.seq_length={seq} does not split over parallel.context_parallel_size={cp} "
            f"(2 chunks per rank{' and the sequence-parallel ranks' if p.sequence_parallel else ''}"
            f"): use a multiple of {split}")
    refused = (  # (key, its value, the value that turns it off, why)
        ("diffusion.block_length", cfg.diffusion.block_length, "null",
         "block diffusion's two streams are not split over context-parallel ranks"),
        ("diffusion.ar_loss_weight", cfg.diffusion.ar_loss_weight, "0",
         "the hybrid objective's second stream is not split over context-parallel ranks"),
        ("align.kd_weight", cfg.align.kd_weight, "0",
         "distillation runs without context parallelism"),
        ("evaluation.generation_samples", cfg.evaluation.generation_samples, "0",
         "decoding runs without context parallelism (megalign-eval scores a checkpoint's "
         "samples)"),
        ("evaluation.infill_span", cfg.evaluation.infill_span, "0",
         "infilling decodes, which runs without context parallelism"),
    )
    for key, value, off, why in refused:
        if value and not (key == "diffusion.block_length" and value >= seq):
            raise ConfigError(f"{key}={value} with parallel.context_parallel_size={cp}: {why}; "
                              f"set {key}={off} or parallel.context_parallel_size=1")


def check_document_format(cfg: Config) -> None:
    """``model.document_format=thd`` asks for what packed sequences can carry."""
    m, d, cp = cfg.model, cfg.diffusion, cfg.parallel.context_parallel_size
    if m.document_format != "thd":
        return
    why = None
    if not m.document_attention:
        why = "needs model.document_attention=true (the documents are what it packs)"
    elif d.block_length is not None and d.block_length < m.seq_length and cfg.objective != "ar":
        why = (f"cannot carry block diffusion's two streams (diffusion.block_length="
               f"{d.block_length})")
    elif d.anneal_iters and cfg.objective != "ar":
        why = f"cannot carry annealed attention (diffusion.anneal_iters={d.anneal_iters})"
    elif d.ar_loss_weight and cfg.objective != "ar":
        why = (f"cannot carry the hybrid objective's two streams (diffusion.ar_loss_weight="
               f"{d.ar_loss_weight:g})")
    elif cp > 1:
        why = (f"is not split over context-parallel ranks yet (parallel.context_parallel_size="
               f"{cp})")
    if why:
        raise ConfigError(f"model.document_format=thd {why}; use model.document_format=mask "
                          "(or auto)")


def _check_training_settings(cfg: Config) -> None:
    """Alignment, recomputation, FP8 and held-out evaluation against the model they train."""
    m, a = cfg.model, cfg.align
    if a.kd_weight and not cfg.diffusion.shift:
        raise ConfigError(f"align.kd_weight={a.kd_weight:g} with diffusion.shift=false: the "
                          "teacher's position i predicts token i + 1, an unshifted student's its "
                          "own token; set diffusion.shift=true or align.kd_weight=0")
    if a.layers is not None:
        bad = [i for i in a.layers if not isinstance(i, int) or not 0 <= i <= m.num_layers]
        if bad or not a.layers:
            raise ConfigError(
                f"align.layers={a.layers}: give indices in 0..{m.num_layers} (0 = embedding "
                f"output, i = output of block i, {m.num_layers} = final-norm output)")
    if a.layer_weights is not None:
        count = len(a.layers) if a.layers is not None else m.num_layers + 1
        if len(a.layer_weights) != count or any(w < 0 for w in a.layer_weights):
            raise ConfigError(
                f"align.layer_weights needs {count} non-negative numbers (one per aligned layer)")
    if cfg.checkpoint.async_save and cfg.resilience.inprocess_restart:
        raise ConfigError("checkpoint.async_save=true with resilience.inprocess_restart=true: a "
                          "restart in the same processes would leave a background save writing "
                          "into the checkpoint it starts again; turn one of them off")
    if cfg.fp8.teacher and cfg.precision != "fp8":
        raise ConfigError(f"fp8.teacher=true needs precision=fp8 (got precision={cfg.precision}); "
                          "set precision=fp8 or drop fp8.teacher")
    check_document_format(cfg)
    _check_recompute(cfg)
    _check_evaluation(cfg)


def _check_recompute(cfg: Config) -> None:
    r = cfg.recompute
    if r.granularity == "selective" and "moe" in r.modules and not cfg.model.num_experts:
        raise ConfigError("recompute.modules: 'moe' recomputes expert layers; this model has "
                          "none (model.num_experts is null): use 'mlp'")
    if r.granularity != "full":
        return
    per_chunk = cfg.model.num_layers // cfg.parallel.chunks
    if not 1 <= r.num_layers <= per_chunk:
        raise ConfigError(f"recompute.num_layers={r.num_layers} must lie in 1..{per_chunk} "
                          "(the layers of one pipeline stage, or virtual stage)")
    if r.method == "uniform" and r.num_layers > 1 and cfg.align.weight > 0:
        raise ConfigError(
            f"recompute.num_layers={r.num_layers} with recompute.method=uniform recomputes "
            "several layers as one unit, and the aligned hidden states inside a unit get no "
            "gradient: use recompute.num_layers=1 or recompute.method=block")


def _check_evaluation(cfg: Config) -> None:
    e, seq = cfg.evaluation, cfg.model.seq_length
    if e.generation_samples and e.prompt_length + e.gen_length > seq:
        raise ConfigError(f"evaluation.prompt_length + evaluation.gen_length ({e.prompt_length} + "
                          f"{e.gen_length}) exceeds model.seq_length={seq}")
    if e.infill_span >= seq // 2:
        raise ConfigError(f"evaluation.infill_span={e.infill_span} must be below half of "
                          f"model.seq_length ({seq}): it needs a prefix and a suffix")
    if e.interval and cfg.parallel.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError(
            "evaluation.interval > 0 needs one model chunk per rank: the held-out forward "
            "(megalign/model/inference.py) does not run the interleaved schedule; set "
            "parallel.virtual_pipeline_model_parallel_size=null or evaluation.interval=0 "
            "and score checkpoints with megalign-eval")
    batch = evaluation_batch_size(cfg)
    if e.interval and e.samples < batch:
        raise ConfigError(f"evaluation.samples={e.samples} is fewer than one batch "
                          f"(evaluation.batch_size={batch})")


def _check_causal_lm(cfg: Config) -> None:
    """objective=ar trains the causal model alone: nothing to align to, no masks to learn."""
    diffusion_only = {
        "align.weight": (cfg.align.weight, 0.0),
        "align.kd_weight": (cfg.align.kd_weight, 0.0),
        "diffusion.block_length": (cfg.diffusion.block_length, None),
        "diffusion.anneal_iters": (cfg.diffusion.anneal_iters, 0),
        "diffusion.loss_weighting": (cfg.diffusion.loss_weighting, "none"),
        "diffusion.ar_loss_weight": (cfg.diffusion.ar_loss_weight, 0.0),
        "data.sft": (cfg.data.sft, False),
        "evaluation.infill_span": (cfg.evaluation.infill_span, 0),
        "evaluation.generation_samples": (cfg.evaluation.generation_samples, 0),
    }
    for key, (value, off) in diffusion_only.items():
        if value != off:
            off_text = yaml.safe_dump(off).splitlines()[0]  # null, false, 0, none
            raise ConfigError(f"{key}={value!r} is a diffusion setting: objective=ar pretrains "
                              f"the causal model alone; set {key}={off_text} or "
                              "objective=diffusion")
