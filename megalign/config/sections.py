"""The run configuration's sections: typed dataclasses that check their own values when built.

Why each section checks itself (as Megatron-Core's ``TransformerConfig`` does in
``__post_init__``): a section can only exist valid, however it was made (a YAML file, a
checkpoint's recorded config, a command's overrides, ``dataclasses.replace`` in code), and the
rule for a field sits beside the field. Allowed values are ``Literal`` types, so loading, the
checks and the command-line choices all read them from one place. A built section is read-only:
what is decided while running (the checkpoint resumed, the teacher's weights) is kept by the
component that decides it, never written back into the config.

Rules that relate sections (the model's layout over the parallel sizes) are checked by
``Config``; those that need the launch (world size, tokenizer) by ``megalign.config.checks``.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal, Optional

from megalign.errors import ConfigError

SEED_LIMIT = 2**32  # numpy's generators (Megatron's dataset shuffles) take seeds below this
RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "layernorm")  # Megatron-Core's, for our layers


class Section:
    """A config section: its ``Literal`` fields and ``check`` run when it is built, then it is
    read-only. ``KEY`` is where it sits in the run config (errors name ``KEY.field``)."""

    KEY: ClassVar[str] = ""
    _frozen = False

    def __post_init__(self) -> None:
        for name, allowed in choices_of(type(self)).items():
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"{self.key(name)}={value!r} is not one of {list(allowed)}")
        self.check()
        object.__setattr__(self, "_frozen", True)

    def check(self) -> None:
        """This section's own rules (each section defines them)."""

    def key(self, name: str) -> str:
        return f"{self.KEY}.{name}" if self.KEY else name

    def at_least(self, minimum, *names: str) -> None:
        """Each of ``names`` (None allowed: a default) is at least ``minimum``."""
        for name in names:
            value = getattr(self, name)
            if value is not None and not value >= minimum:
                hint = {0: ">= 0", 1: "at least 1"}.get(minimum, f">= {minimum}")
                raise ConfigError(f"{self.key(name)}={value} must be {hint}")

    def __setattr__(self, name: str, value) -> None:
        if self._frozen:
            raise AttributeError(f"the validated config is read-only: cannot set '{name}' "
                                 "(derive a copy with dataclasses.replace)")
        object.__setattr__(self, name, value)


@functools.cache
def choices_of(cls: type) -> dict[str, tuple]:
    """{field: allowed values} of ``cls``'s ``Literal`` fields (``Optional``: None allowed)."""
    found = {}
    for name, hint in typing.get_type_hints(cls).items():
        options, args = (), typing.get_args(hint)
        if typing.get_origin(hint) is Literal:
            options = args
        elif type(None) in args:
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1 and typing.get_origin(inner[0]) is Literal:
                options = (None, *typing.get_args(inner[0]))
        if options:
            found[name] = options
    return found


def choices(cls: type, name: str) -> tuple:
    """The allowed values of ``cls.name`` (for command-line ``choices=``)."""
    return tuple(value for value in choices_of(cls)[name] if value is not None)


@dataclass
class ModelConfig(Section):
    """Architecture of the AR model the student and teacher share."""

    KEY: ClassVar[str] = "model"

    # llama: RMSNorm, SwiGLU, RoPE; gpt2: LayerNorm, GeLU, learned positions
    arch: Literal["llama", "gpt2"] = "llama"
    num_layers: int = 4
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None  # default: 4*hidden (gpt2), 8/3*hidden rounded (llama)
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = multi-head attention
    head_dim: Optional[int] = None  # per-head size; None = hidden_size / num_attention_heads
    qk_norm: bool = False  # llama: RMSNorm on each head's queries and keys before RoPE (Qwen3)
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None  # default: seq_length
    qkv_bias: bool = False
    tie_embeddings: bool = True
    rotary_base: int = 10000
    # Llama 3.x RoPE scaling by this factor (low/high frequency factors 1 and 4 over 8,192
    # original positions, the published models' and Megatron-Core's); None = unscaled RoPE
    rope_scaling_factor: Optional[float] = None
    # mixture of experts (Qwen3-MoE, Mixtral, Qwen2-MoE): every layer's MLP is num_experts
    # SwiGLU experts of moe_ffn_hidden_size, each token sent to moe_topk of them by a softmax
    # router; None = dense
    num_experts: Optional[int] = None
    moe_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # default: ffn_hidden_size
    # softmax over all experts, then the top k kept as they are (Qwen3-MoE's norm_topk_prob:
    # false); false: the top k's probabilities renormalised to sum 1 (Mixtral, norm_topk_prob: true)
    moe_router_pre_softmax: bool = False
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss (Switch) added to the student's loss
    # Qwen2-MoE: besides the routed experts, one shared SwiGLU expert of this width that every
    # token passes through, its output scaled by sigmoid(x . w) with moe_shared_expert_gate
    moe_shared_expert_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    # Megatron-Core's token dispatcher: allgather (every platform) or alltoall (training on CUDA
    # only, the one Megatron-Core recommends for expert parallelism across nodes; not yet run by
    # megalign; its checkpoints sample on a CPU with allgather)
    moe_token_dispatcher: Literal["allgather", "alltoall"] = "allgather"
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: Optional[int] = None  # default: tokenizer (+ mask row) rounded up
    document_attention: bool = True  # attention stays inside each packed document
    # how the documents reach attention: "thd" as Megatron-Core PackedSeqParams (cu_seqlens from
    # the EOD tokens; Transformer Engine's fused kernels, memory linear in the sequence), "mask"
    # as an explicit [b, 1, s, s] mask; "auto": thd where Transformer Engine runs, else mask.
    # Block diffusion and attention annealing always take a mask.
    document_format: Literal["auto", "thd", "mask"] = "auto"
    # mean: the mask token's row starts as the mean of the real vocabulary's rows; unused: as is
    mask_token_init: Literal["mean", "unused"] = "mean"
    init_checkpoint: Optional[str] = None  # AR weights (megatron dist checkpoint) for both models
    # a fine-tune: the student starts from this megalign checkpoint's weights (e.g. a converted
    # diffusion student, for SFT) with a fresh optimizer and schedule; the teacher, the scorer
    # of generated samples and the alignment stay with init_checkpoint's AR weights
    student_checkpoint: Optional[str] = None

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        """The per-head size."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def check(self) -> None:
        self.at_least(1, "num_layers", "hidden_size", "num_attention_heads", "seq_length",
                      "make_vocab_size_divisible_by", "rotary_base")
        for name in ("ffn_hidden_size", "num_query_groups", "head_dim", "padded_vocab_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"model.{name}={value} must be at least 1 (or null: the default)")
        for name in ("norm_epsilon", "init_method_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be > 0")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_attention_heads={self.num_attention_heads}; set "
                              "model.head_dim")
        if self.arch == "llama" and self.kv_channels % 2:
            raise ConfigError(f"model.head_dim={self.kv_channels} must be even "
                              "(RoPE rotates pairs)")
        if self.arch == "gpt2" and (
                self.qk_norm or self.rope_scaling_factor is not None
                or self.head_dim not in (None, self.hidden_size // self.num_attention_heads)):
            raise ConfigError("model.qk_norm, model.rope_scaling_factor and a model.head_dim other "
                              "than hidden_size / heads need model.arch=llama")
        if self.num_experts is not None:
            self._check_experts()
        elif self.moe_shared_expert_ffn_hidden_size is not None or self.moe_shared_expert_gate:
            raise ConfigError("model.moe_shared_expert_ffn_hidden_size and "
                              "model.moe_shared_expert_gate need model.num_experts")
        if self.rope_scaling_factor is not None and not self.rope_scaling_factor >= 1:
            raise ConfigError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be at "
                              "least 1 (or null: unscaled)")
        if self.num_attention_heads % self.query_groups != 0:
            raise ConfigError(f"model.num_query_groups={self.query_groups} does not divide "
                              f"model.num_attention_heads={self.num_attention_heads}")

    def _check_experts(self) -> None:
        if self.arch != "llama":
            raise ConfigError("model.num_experts needs model.arch=llama")
        if self.num_experts < 1:
            raise ConfigError(f"model.num_experts={self.num_experts} must be at least 1 (or "
                              "null: a dense model)")
        if not 1 <= self.moe_topk <= self.num_experts:
            raise ConfigError(f"model.moe_topk={self.moe_topk} must be between 1 and "
                              f"model.num_experts={self.num_experts}")
        if self.moe_ffn_hidden_size is not None and self.moe_ffn_hidden_size < 1:
            raise ConfigError(f"model.moe_ffn_hidden_size={self.moe_ffn_hidden_size} must be at "
                              "least 1 (or null: model.ffn_hidden_size)")
        self.at_least(0, "moe_aux_loss_coeff")
        shared = self.moe_shared_expert_ffn_hidden_size
        if shared is not None and shared < 1:
            raise ConfigError(f"model.moe_shared_expert_ffn_hidden_size={shared} must be at "
                              "least 1 (or null: no shared expert)")
        if self.moe_shared_expert_gate and shared is None:
            raise ConfigError("model.moe_shared_expert_gate needs "
                              "model.moe_shared_expert_ffn_hidden_size")


@dataclass
class ParallelConfig(Section):
    """How the model is split over processes (Megatron-Core's parallel state); data parallelism
    is what is left of the world size."""

    KEY: ClassVar[str] = "parallel"

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # model chunks per PP rank (interleaved 1F1B)
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    # experts split over this many data-parallel ranks (model.num_experts); it divides the
    # data-parallel size, which is what is left: world_size / (tp * pp)
    expert_model_parallel_size: int = 1
    # the sequence split over this many ranks, student and teacher alike (Megatron-Core's
    # load-balanced layout: 2·cp chunks, two per rank); data parallelism is world / (tp·pp·cp)
    context_parallel_size: int = 1
    # how Transformer Engine's context-parallel attention exchanges keys and values (GPU); without
    # TE megalign's core attention all-gathers them over the context-parallel group
    cp_comm_type: Literal["p2p", "a2a", "all_gather", "a2a+p2p"] = "p2p"

    @property
    def replica_size(self) -> int:
        """The ranks one data-parallel replica spans: tensor x pipeline x context."""
        return (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                * self.context_parallel_size)

    @property
    def chunks(self) -> int:
        """Model chunks in the whole pipeline (stages x virtual stages)."""
        return self.pipeline_model_parallel_size * (self.virtual_pipeline_model_parallel_size or 1)

    def check(self) -> None:
        self.at_least(1, "tensor_model_parallel_size", "pipeline_model_parallel_size",
                      "expert_model_parallel_size", "context_parallel_size")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (self.pipeline_model_parallel_size < 2 or vpp < 2):
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size "
                ">= 2 and a value >= 2 (or null for the non-interleaved schedule)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel=true needs "
                              "tensor_model_parallel_size > 1")


@dataclass
class DiffusionConfig(Section):
    """Masked-diffusion objective (see megalign/diffusion/objective.py)."""

    KEY: ClassVar[str] = "diffusion"

    eps: float = 0.002  # t ~ U(eps, 1 - eps)
    shift: bool = True  # position i predicts token i+1 (AR shift kept)
    # none: mean CE over supervised positions; inv_t: the MDLM ELBO's 1/t weighting; path: the
    # mean CE plus the REPR-ALIGN reference code's path term, each CE weighted by the detached
    # probability of its target (objective.py)
    loss_weighting: Literal["none", "inv_t", "path"] = "none"
    mask_token_id: Optional[int] = None  # default: the tokenizer's <mask> or first padded row
    # attention annealing (DiffuLLaMA): over the first K iterations the student's attention moves
    # from causal to bidirectional, each future position opened by a per-sample draw; 0 = off
    anneal_iters: int = 0
    # block diffusion (BD3-LM's two streams): each block of this many positions (counted from its
    # document's start) is noised and attended bidirectionally, seeing only the clean earlier
    # blocks; None = the whole sequence is one block (plain masked diffusion)
    block_length: Optional[int] = None
    # hybrid AR + diffusion (NVIDIA's ar_to_dlm recipe): in training the student also reads the
    # clean sequence causally, as a second stream, and learns its next tokens; the loss is
    # (dlm_loss_weight x diffusion sum + ar_loss_weight x next-token sum) / (the diffusion
    # normaliser + the next-token positions). 0 = off; Nemotron-Labs-Diffusion's: 1.0 with 0.3
    ar_loss_weight: float = 0.0
    # the diffusion term's weight in the hybrid objective (Nemotron-Labs-Diffusion's: 0.3)
    dlm_loss_weight: float = 1.0

    def check(self) -> None:
        if not 0.0 < self.eps < 0.5:
            raise ConfigError(f"diffusion.eps={self.eps} must lie in (0, 0.5)")
        if self.block_length is not None and self.block_length < 1:
            raise ConfigError(f"diffusion.block_length={self.block_length} must be >= 1 "
                              "(null: the whole sequence is one block)")
        if self.block_length and self.anneal_iters:
            raise ConfigError("diffusion.block_length and diffusion.anneal_iters are two ways of "
                              "leaving causal attention: set one of them")
        if self.anneal_iters < 0:
            raise ConfigError(f"diffusion.anneal_iters={self.anneal_iters} must be >= 0 "
                              "(0: no annealing)")
        if self.ar_loss_weight < 0 or self.dlm_loss_weight <= 0:
            raise ConfigError(f"diffusion.ar_loss_weight={self.ar_loss_weight} must be >= 0 and "
                              f"diffusion.dlm_loss_weight={self.dlm_loss_weight} > 0")
        if not self.ar_loss_weight and self.dlm_loss_weight != 1.0:
            raise ConfigError(f"diffusion.dlm_loss_weight={self.dlm_loss_weight} weighs the "
                              "diffusion term against the next-token term, which is off: set "
                              "diffusion.ar_loss_weight > 0 or diffusion.dlm_loss_weight=1.0")
        if self.ar_loss_weight and self.block_length:
            raise ConfigError("diffusion.ar_loss_weight with diffusion.block_length: the next-"
                              "token stream is causal, while block diffusion's clean stream is "
                              "block-causal and its decoding reads it so; set one of them")
        if self.ar_loss_weight and self.anneal_iters:
            raise ConfigError("diffusion.ar_loss_weight with diffusion.anneal_iters: annealing "
                              "is not combined with the next-token stream; set one of them")


@dataclass
class AlignConfig(Section):
    """REPR-ALIGN: lambda * (1 - cos(student, teacher)) over aligned hidden states."""

    KEY: ClassVar[str] = "align"

    weight: float = 0.0  # lambda; 0 = no alignment (nor a teacher, unless kd_weight > 0)
    # teacher-logit distillation: this weight times KL(teacher || student) of the next-token
    # distributions at the supervised positions, computed on the vocabulary shards
    # (megalign/align/distill.py), added to the diffusion loss with its normaliser; 0 = off
    kd_weight: float = 0.0
    layers: Optional[list[int]] = None  # aligned state indices 0..L (0 = embedding, L = final norm)
    layer_weights: Optional[list[float]] = None  # same length as layers; normalised to sum 1
    # auto: fp32 for precision=fp32, else bf16
    teacher_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    log_teacher_loss: bool = False  # also run the teacher's LM head: log its AR loss on V
    # consecutive micro-batches the teacher runs as one batch: fewer, larger forwards and TP
    # collectives, for holding their teacher states and a longer pipeline fill (docs/repr-align.md)
    teacher_microbatches: int = 1
    # the teacher holds the student's frozen tensors (optimizer.freeze) instead of copies of
    # them, where the dtypes agree; False: copies (the same numbers, more memory)
    share_frozen: bool = True

    def check(self) -> None:
        self.at_least(0, "weight")
        self.at_least(0, "kd_weight")
        if self.teacher_microbatches < 1:
            raise ConfigError(f"align.teacher_microbatches={self.teacher_microbatches} must be "
                              ">= 1 (1 = one teacher forward per micro-batch)")

    @property
    def uses_teacher(self) -> bool:
        """Whether training builds and runs the frozen teacher (alignment or distillation)."""
        return self.weight > 0 or self.kd_weight > 0


@dataclass
class DataConfig(Section):
    """The training data: Megatron indexed datasets, their tokenizer and the batch sizes."""

    KEY: ClassVar[str] = "data"

    paths: list = field(default_factory=list)  # [prefix] or [w1, prefix1, w2, prefix2, ...]
    tokenizer: str = ""  # SentencePiece .model, tokenizer.json or a Hugging Face directory
    # end-of-document token (its text, or its id in quotes); None: the rule of data/tokenizer.py
    eod_token: Optional[str] = None
    split: str = "98,2,0"
    micro_batch_size: int = 2
    global_batch_size: int = 8
    cache_dir: Optional[str] = None  # Megatron index cache; default <run_dir>/data_cache
    # diffusion SFT: every prefix has a loss-mask stream (megalign-preprocess --sft); only its
    # response tokens are noised and supervised, the prompt stays clean
    sft: bool = False

    def check(self) -> None:
        self.at_least(1, "micro_batch_size", "global_batch_size")
        parse_blend(self.paths, "data.paths")


@dataclass
class OptimizerConfig(Section):
    """Megatron-Core's optimizer (Adam / AdamW, gradient clipping) and what it leaves frozen."""

    KEY: ClassVar[str] = "optimizer"

    name: Literal["adam", "adamw"] = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    freeze: list[str] = field(default_factory=list)  # regexes over parameter names (re.search)
    # Megatron-Core's distributed optimizer (ZeRO-1): fp32 main weights and Adam states sharded
    # over the data-parallel ranks, gradients reduce-scattered, weights all-gathered after a step
    distributed: bool = False


@dataclass
class RecomputeConfig(Section):
    """Activation recomputation for the student (Megatron-Core's ``recompute_*`` fields); the
    teacher keeps no activations in any case (it runs under no_grad)."""

    KEY: ClassVar[str] = "recompute"

    # null: off; full: whole layers; selective: the modules below
    granularity: Optional[Literal["full", "selective"]] = None
    # full: uniform (every num_layers layers as one unit) | block (num_layers per stage)
    method: Literal["uniform", "block"] = "uniform"
    num_layers: int = 1  # full: layers per unit (uniform) or layers recomputed per stage (block)
    # selective: what to recompute (core_attn, mlp, moe; layernorm with Transformer Engine)
    modules: list[str] = field(default_factory=lambda: ["core_attn"])

    def check(self) -> None:
        if self.granularity == "selective":
            unknown = [name for name in self.modules if name not in RECOMPUTE_MODULES]
            if unknown or not self.modules:
                raise ConfigError(f"recompute.modules={self.modules}: give some of "
                                  f"{list(RECOMPUTE_MODULES)}")


@dataclass
class ScheduleConfig(Section):
    """The length of the run and its learning-rate schedule (warm-up, then decay to min_lr)."""

    KEY: ClassVar[str] = "schedule"

    train_iters: int = 100
    warmup_iters: int = 10
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"

    def check(self) -> None:
        self.at_least(1, "train_iters")
        if not 0 <= self.warmup_iters < self.train_iters:
            raise ConfigError(f"schedule.warmup_iters={self.warmup_iters} must lie in "
                              f"0..schedule.train_iters - 1 ({self.train_iters - 1})")


@dataclass
class EvaluationConfig(Section):
    """Held-out diffusion NELBO during training, computed as megalign-eval computes it."""

    KEY: ClassVar[str] = "evaluation"

    interval: int = 0  # evaluate every N iterations (and at 0 and the end); 0 = off
    # chooses the held-out samples, the noise levels' masks and so the generation prompts; apart
    # from the run's seed, so that runs with different seeds are scored on the same text with the
    # same masks (paired comparisons)
    seed: int = 1234
    samples: int = 16  # from the validation split (data.split) of paths
    batch_size: Optional[int] = None  # default: data.micro_batch_size
    t_grid: int = 4  # midpoint noise levels, deterministic masks (megalign/evaluate.py)
    paths: list = field(default_factory=list)  # default: data.paths
    split: Optional[str] = None  # held out = the validation split under this; default data.split
    # a second corpus the run never trains on (every document of it is held out): its NELBO
    # measures what the conversion keeps of the AR model's knowledge beyond the training data
    ood_paths: list = field(default_factory=list)
    infill_span: int = 0  # > 0: middle tokens of each held-out sample restored by the sampler
    # > 0: continuations of this many held-out prompts, sampled with the sampler's defaults and
    # scored by the AR model the run started from (megalign/evaluation/generation.py)
    generation_samples: int = 0
    prompt_length: int = 16
    gen_length: int = 32

    def check(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"evaluation.interval={self.interval} must be >= 0 (0 = off)")
        check_seed(self.seed, "evaluation.seed")
        self.at_least(1, "samples", "t_grid", "batch_size", "prompt_length", "gen_length")
        for name in ("infill_span", "generation_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"evaluation.{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if self.generation_samples > self.samples:
            raise ConfigError(f"evaluation.generation_samples={self.generation_samples} exceeds "
                              f"evaluation.samples={self.samples}: the prompts are held-out "
                              "samples")
        parse_blend(self.paths, "evaluation.paths")
        parse_blend(self.ood_paths, "evaluation.ood_paths")


@dataclass
class CheckpointConfig(Section):
    """Where a run saves and resumes (megalign/training/checkpointer.py)."""

    KEY: ClassVar[str] = "checkpoint"

    save: Optional[str] = None  # root directory: iter_NNNNNNN/ checkpoints and a 'latest' file
    save_interval: int = 0  # 0 = only at the end (and on SIGTERM/SIGUSR1)
    keep_last_n: int = 0  # 0 = keep every checkpoint
    load: Optional[str] = None  # resume: a checkpoint root (its 'latest') or an iter_ directory
    auto_resume: bool = True  # resume from checkpoint.save's 'latest' when it has one (before load)
    # stop: a failed save ends the run (non-zero); continue: keep training and retry later
    on_save_failure: Literal["stop", "continue"] = "stop"
    # interval saves written by a helper process while training goes on (Megatron-Core's
    # asynchronous dist_checkpointing); the rename and 'latest' follow when it has finished, and
    # the last save of a run is written before it ends
    async_save: bool = False

    def check(self) -> None:
        self.at_least(0, "save_interval", "keep_last_n")


@dataclass
class ResilienceConfig(Section):
    """Bounded failure detection (megalign/training/watchdog.py) and in-process restart
    (megalign/training/inprocess.py)."""

    KEY: ClassVar[str] = "resilience"

    collective_timeout_minutes: float = 10.0  # process-group timeout (gloo and NCCL)
    heartbeat_interval_s: float = 2.0
    failure_timeout_s: float = 60.0  # a rank silent this long is declared dead; 0 = no watchdog
    inprocess_restart: bool = False  # restart in the same processes (nvidia-resiliency-ext)
    inprocess_max_restarts: int = 3

    def check(self) -> None:
        for name in ("collective_timeout_minutes", "heartbeat_interval_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"resilience.{name}={getattr(self, name)} must be > 0")
        if self.failure_timeout_s and self.failure_timeout_s < 3 * self.heartbeat_interval_s:
            raise ConfigError(
                f"resilience.failure_timeout_s={self.failure_timeout_s} must be at least 3 x "
                f"resilience.heartbeat_interval_s ({self.heartbeat_interval_s}), or 0 to turn the "
                "watchdog off; a shorter bound would declare healthy ranks dead")
        if not self.inprocess_restart:
            return
        if self.inprocess_max_restarts < 1:
            raise ConfigError(f"resilience.inprocess_max_restarts={self.inprocess_max_restarts} "
                              "must be >= 1 with resilience.inprocess_restart=true")
        if self.failure_timeout_s <= 0:
            raise ConfigError("resilience.inprocess_restart=true detects faults with "
                              "resilience.failure_timeout_s: set it > 0 (default 60)")
        if 2 * self.failure_timeout_s >= 60 * self.collective_timeout_minutes:
            raise ConfigError(
                f"resilience.collective_timeout_minutes={self.collective_timeout_minutes:g} must "
                f"exceed 2 x resilience.failure_timeout_s ({2 * self.failure_timeout_s:g} s): "
                "in-process restart terminates a stuck rank after that long, and its barriers "
                "wait for the collective timeout")


@dataclass
class LoggingConfig(Section):
    """Rank 0's metrics.jsonl, console lines and TensorBoard scalars (training/metrics.py)."""

    KEY: ClassVar[str] = "logging"

    run_dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True

    def check(self) -> None:
        self.at_least(1, "log_interval")


@dataclass
class Fp8Config(Section):
    """FP8 GEMMs in Transformer Engine when precision=fp8 (Megatron-Core's ``fp8_*`` fields).

    Defaults are TE's DelayedScaling defaults; parameters, gradients and the rest stay in bf16.
    """

    KEY: ClassVar[str] = "fp8"

    format: Literal["hybrid", "e4m3"] = "hybrid"  # hybrid: e4m3 forward, e5m2 gradients
    # delayed | tensorwise (current scaling) | blockwise | mxfp8 (Blackwell)
    recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    margin: int = 0
    amax_history_len: int = 1024  # delayed scaling only
    amax_compute_algo: Literal["max", "most_recent"] = "max"  # delayed scaling only
    wgrad: bool = True  # false: weight gradients in bf16
    teacher: bool = False  # the frozen teacher's forward under FP8 autocast too

    def check(self) -> None:
        self.at_least(0, "margin")
        self.at_least(1, "amax_history_len")


@dataclass
class DebugConfig(Section):
    """What a run records to check itself against another (a refactor, another layout)."""

    KEY: ClassVar[str] = "debug"

    # a .pt file with the first micro-batch's inputs and losses
    dump_first_batch: Optional[str] = None


@dataclass
class Config(Section):
    """The run configuration. Besides its sections' own rules it checks what relates them and
    holds wherever the config is used: the model's layout over the parallel sizes."""

    seed: int = 1234  # data order, noise and initialisation; evaluation.seed is apart
    # diffusion: the masked-diffusion student (with REPR-ALIGN when align.weight > 0);
    # ar: plain causal next-token pretraining of the same model, data, layouts and checkpoints
    objective: Literal["diffusion", "ar"] = "diffusion"
    # fp8: bf16 with FP8 GEMMs (a GPU with Transformer Engine)
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    fp8: Fp8Config = field(default_factory=Fp8Config)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def check(self) -> None:
        check_seed(self.seed, "seed")
        check_layout(self.model, self.parallel)


def sections(cls: type = Config) -> dict[str, type]:
    """{name: section class} of ``cls``'s fields that are sections."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Section)}


def check_seed(value: int, key: str) -> None:
    if not 0 <= value < SEED_LIMIT:
        raise ConfigError(f"{key}={value} must lie in 0..{SEED_LIMIT - 1}")


def check_layout(m: ModelConfig, p: ParallelConfig) -> None:
    """The model splits over the tensor, pipeline and expert parallel sizes."""
    tp, pp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.expert_model_parallel_size)
    if m.num_experts is None and ep > 1:
        raise ConfigError(f"parallel.expert_model_parallel_size={ep} needs experts "
                          "(model.num_experts)")
    if m.num_experts is not None and m.num_experts % ep:
        raise ConfigError(f"parallel.expert_model_parallel_size={ep} does not divide "
                          f"model.num_experts={m.num_experts}")
    if m.num_attention_heads % tp != 0:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} does not divide "
            f"model.num_attention_heads={m.num_attention_heads}; choose a TP size that divides it")
    if m.query_groups % tp != 0:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} does not divide "
            f"model.num_query_groups={m.query_groups} (KV groups); choose a TP size that divides "
            f"{m.query_groups}")
    if m.num_layers % pp != 0:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} does not divide "
            f"model.num_layers={m.num_layers}; choose a PP size that divides {m.num_layers}")
    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None and m.num_layers % p.chunks != 0:
        raise ConfigError(
            f"parallel.virtual_pipeline_model_parallel_size={vpp}: pipeline ({pp}) x virtual "
            f"({vpp}) = {p.chunks} model chunks do not divide model.num_layers={m.num_layers}")
    if p.sequence_parallel and m.seq_length % tp != 0:
        raise ConfigError(
            f"model.seq_length={m.seq_length} must be divisible by tensor_model_parallel_size={tp} "
            "with parallel.sequence_parallel=true")


def parse_blend(paths: list, key: str = "data.paths") -> tuple[list[str], Optional[list[float]]]:
    """``[prefix]``, ``[prefix1, prefix2]`` or ``[w1, prefix1, w2, prefix2]`` -> Megatron blend."""
    if all(isinstance(p, str) for p in paths):
        if "" in paths:
            raise ConfigError(f"{key}={paths}: a dataset prefix is empty")
        return [str(p) for p in paths], None
    if len(paths) % 2 or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and isinstance(p, str)
        for w, p in zip(paths[::2], paths[1::2])
    ):
        raise ConfigError(
            f"{key}={paths}: give prefixes only, or alternate weight and prefix "
            "([0.7, data/a_text_document, 0.3, data/b_text_document])"
        )
    if "" in paths[1::2]:
        raise ConfigError(f"{key}={paths}: a dataset prefix is empty")
    weights = [float(w) for w in paths[::2]]
    if not all(0 < w < math.inf for w in weights):
        raise ConfigError(f"{key}: blend weights must be positive and finite, got {weights}")
    return [str(p) for p in paths[1::2]], weights
