"""Typed run configuration: dataclasses loaded from YAML, with dotted ``key.sub=value`` overrides.

Every check that can be made without a process group is made here (``validate``), so a bad
configuration fails before anything is launched, with one message naming the key and a fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from megalign.errors import ConfigError, one_line


class Section:
    """A config section; read-only once ``freeze`` was called on the config holding it.

    Why: a run's configuration is checked once, before anything starts, and is what checkpoints
    record; what is decided while running (the checkpoint resumed, the teacher's weights) is kept
    by the component that decides it, never written back into the config."""

    _frozen = False

    def __setattr__(self, name: str, value) -> None:
        if self._frozen:
            raise AttributeError(f"the validated config is read-only: cannot set '{name}' "
                                 "(derive a copy with dataclasses.replace)")
        object.__setattr__(self, name, value)


def freeze(cfg: "Config") -> "Config":
    """Make ``cfg`` and its sections read-only (returns it)."""
    for section in [cfg, *(getattr(cfg, f.name) for f in dataclasses.fields(cfg))]:
        if isinstance(section, Section):
            object.__setattr__(section, "_frozen", True)
    return cfg


@dataclass
class ModelConfig(Section):
    """Architecture of the AR model the student and teacher share."""

    arch: str = "llama"  # llama (RMSNorm, SwiGLU, RoPE) | gpt2 (LayerNorm, GeLU, learned positions)
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
    # mixture of experts (Qwen3-MoE, Mixtral): every layer's MLP is num_experts SwiGLU experts
    # of moe_ffn_hidden_size, each token sent to moe_topk of them by a softmax router; None = dense
    num_experts: Optional[int] = None
    moe_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None  # default: ffn_hidden_size
    # softmax over all experts, then the top k kept as they are (Qwen3-MoE's norm_topk_prob:
    # false); false: the top k's probabilities renormalised to sum 1 (Mixtral, norm_topk_prob: true)
    moe_router_pre_softmax: bool = False
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss (Switch) added to the student's loss
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    padded_vocab_size: Optional[int] = None  # default: tokenizer (+ mask row) rounded up
    document_attention: bool = True  # attention stays inside each packed document
    mask_token_init: str = "mean"  # mean (mean of the real vocabulary's rows) | unused (row as is)
    init_checkpoint: Optional[str] = None  # AR weights (megatron dist checkpoint) for both models
    # a fine-tune: the student starts from this megalign checkpoint's weights (e.g. a converted
    # diffusion student, for SFT) with a fresh optimizer and schedule; the teacher, the scorer
    # of generated samples and the alignment stay with init_checkpoint's AR weights
    student_checkpoint: Optional[str] = None


@dataclass
class ParallelConfig(Section):
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None  # model chunks per PP rank (interleaved 1F1B)
    sequence_parallel: bool = False
    # experts split over this many data-parallel ranks (model.num_experts); it divides the
    # data-parallel size, which is what is left: world_size / (tp * pp)
    expert_model_parallel_size: int = 1


@dataclass
class DiffusionConfig(Section):
    """Masked-diffusion objective (see megalign/diffusion/objective.py)."""

    eps: float = 0.002  # t ~ U(eps, 1 - eps)
    shift: bool = True  # position i predicts token i+1 (AR shift kept)
    loss_weighting: str = "none"  # none (mean CE over supervised) | inv_t (MDLM ELBO, 1/t)
    mask_token_id: Optional[int] = None  # default: the tokenizer's <mask> or first padded row
    # attention annealing (DiffuLLaMA): over the first K iterations the student's attention moves
    # from causal to bidirectional, each future position opened by a per-sample draw; 0 = off
    anneal_iters: int = 0
    # block diffusion (BD3-LM's two streams): each block of this many positions (counted from its
    # document's start) is noised and attended bidirectionally, seeing only the clean earlier
    # blocks; None = the whole sequence is one block (plain masked diffusion)
    block_length: Optional[int] = None


@dataclass
class AlignConfig(Section):
    """REPR-ALIGN: lambda * (1 - cos(student, teacher)) over aligned hidden states."""

    weight: float = 0.0  # lambda; 0 = plain diffusion training (no teacher is built)
    layers: Optional[list[int]] = None  # aligned state indices 0..L (0 = embedding, L = final norm)
    layer_weights: Optional[list[float]] = None  # same length as layers; normalised to sum 1
    teacher_dtype: str = "auto"  # auto (fp32 for precision=fp32 on CPU, else bf16) | fp32 | bf16
    log_teacher_loss: bool = False  # also run the teacher's LM head: log its AR loss on V
    # consecutive micro-batches the teacher runs as one batch: fewer, larger forwards and TP
    # collectives, for holding their teacher states and a longer pipeline fill (docs/repr-align.md)
    teacher_microbatches: int = 1
    # the teacher holds the student's frozen tensors (optimizer.freeze) instead of copies of
    # them, where the dtypes agree; False: copies (the same numbers, more memory)
    share_frozen: bool = True


@dataclass
class DataConfig(Section):
    paths: list = field(default_factory=list)  # [prefix] or [w1, prefix1, w2, prefix2, ...]
    tokenizer: str = ""  # SentencePiece .model file
    # end-of-document token (its text, or its id in quotes); None: the rule of data/tokenizer.py
    eod_token: Optional[str] = None
    split: str = "98,2,0"
    micro_batch_size: int = 2
    global_batch_size: int = 8
    cache_dir: Optional[str] = None  # Megatron index cache; default <run_dir>/data_cache
    # diffusion SFT: every prefix has a loss-mask stream (megalign-preprocess --sft); only its
    # response tokens are noised and supervised, the prompt stays clean
    sft: bool = False


@dataclass
class OptimizerConfig(Section):
    name: str = "adamw"  # adam | adamw
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

    granularity: Optional[str] = None  # null (off) | full (whole layers) | selective (modules)
    method: str = "uniform"  # full: uniform (every num_layers layers as one unit) | block
    num_layers: int = 1  # full: layers per unit (uniform) or layers recomputed per stage (block)
    # selective: what to recompute (core_attn, mlp, moe; layernorm with Transformer Engine)
    modules: list[str] = field(default_factory=lambda: ["core_attn"])


@dataclass
class ScheduleConfig(Section):
    train_iters: int = 100
    warmup_iters: int = 10
    lr_decay_style: str = "cosine"  # cosine | linear | constant


@dataclass
class EvaluationConfig(Section):
    """Held-out diffusion NELBO during training, computed as megalign-eval computes it."""

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


@dataclass
class CheckpointConfig(Section):
    save: Optional[str] = None  # root directory: iter_NNNNNNN/ checkpoints and a 'latest' file
    save_interval: int = 0  # 0 = only at the end (and on SIGTERM/SIGUSR1)
    keep_last_n: int = 0  # 0 = keep every checkpoint
    load: Optional[str] = None  # resume: a checkpoint root (its 'latest') or an iter_ directory
    auto_resume: bool = True  # resume from checkpoint.save's 'latest' when it has one (before load)
    on_save_failure: str = "stop"  # stop (exit non-zero) | continue (keep training, retry later)


@dataclass
class ResilienceConfig(Section):
    """Bounded failure detection (megalign/training/watchdog.py) and in-process restart
    (megalign/training/inprocess.py)."""

    collective_timeout_minutes: float = 10.0  # process-group timeout (gloo and NCCL)
    heartbeat_interval_s: float = 2.0
    failure_timeout_s: float = 60.0  # a rank silent this long is declared dead; 0 = no watchdog
    inprocess_restart: bool = False  # restart in the same processes (nvidia-resiliency-ext)
    inprocess_max_restarts: int = 3


@dataclass
class LoggingConfig(Section):
    run_dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True


@dataclass
class Fp8Config(Section):
    """FP8 GEMMs in Transformer Engine when precision=fp8 (Megatron-Core's ``fp8_*`` fields).

    Defaults are TE's DelayedScaling defaults; parameters, gradients and the rest stay in bf16.
    """

    format: str = "hybrid"  # hybrid (e4m3 forward, e5m2 gradients) | e4m3
    recipe: str = "delayed"  # delayed | tensorwise (current scaling) | blockwise | mxfp8 (Blackwell)
    margin: int = 0
    amax_history_len: int = 1024  # delayed scaling only
    amax_compute_algo: str = "max"  # max | most_recent (delayed scaling only)
    wgrad: bool = True  # false: weight gradients in bf16
    teacher: bool = False  # the frozen teacher's forward under FP8 autocast too


@dataclass
class DebugConfig(Section):
    dump_first_batch: Optional[str] = None  # .pt file with the first micro-batch's inputs and losses


@dataclass
class Config(Section):
    seed: int = 1234  # data order, noise and initialisation; evaluation.seed is apart
    # diffusion: the masked-diffusion student (with REPR-ALIGN when align.weight > 0);
    # ar: plain causal next-token pretraining of the same model, data, layouts and checkpoints
    objective: str = "diffusion"
    precision: str = "fp32"  # fp32 | bf16 | fp8 (bf16 with FP8 GEMMs; GPU with Transformer Engine)
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


CHOICES = {
    "objective": ("diffusion", "ar"),
    "model.arch": ("llama", "gpt2"),
    "model.mask_token_init": ("mean", "unused"),
    "diffusion.loss_weighting": ("none", "inv_t"),
    "align.teacher_dtype": ("auto", "fp32", "bf16"),
    "optimizer.name": ("adam", "adamw"),
    "recompute.granularity": (None, "full", "selective"),
    "recompute.method": ("uniform", "block"),
    "schedule.lr_decay_style": ("cosine", "linear", "constant"),
    "precision": ("fp32", "bf16", "fp8"),
    "fp8.format": ("hybrid", "e4m3"),
    "fp8.recipe": ("delayed", "tensorwise", "blockwise", "mxfp8"),
    "fp8.amax_compute_algo": ("max", "most_recent"),
    "checkpoint.on_save_failure": ("stop", "continue"),
}


# ----------------------------------------------------------------------------- loading


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed; give a {base.__name__}")
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {base.__name__} fields, got {value!r}")
        return _build(base, value, key + ".")
    origin = typing.get_origin(base) or base
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -INT64_LIMIT <= value < INT64_LIMIT:
                raise ConfigError(f"{key}={value} is too large for a 64-bit integer")
            return value
    elif origin is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < INT64_LIMIT else math.inf
        elif isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key}={value} is not a finite number")
            return number
    elif origin is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, list):
            element = typing.get_args(base)
            if not element:  # a list checked where it is read (data.paths: a blend)
                return value
            return [_coerce(f"{key}[{i}]", item, element[0]) for i, item in enumerate(value)]
    raise ConfigError(
        f"{key}: expected {getattr(origin, '__name__', origin)}, got {value!r} "
        f"({type(value).__name__})"
    )


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {key!r}{f' under {prefix[:-1]!r}' if prefix else ''} "
                              f"is not a name; known keys: {names}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {names}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """``tree['a']['b'] = value`` for ``dotted`` = ``a.b`` (sections created as needed)."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value``; the value is parsed as YAML (``3``, ``1e-4``, ``true``, ``[1, 2]``, ``null``)."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    value = parse_yaml(raw, f"override '{text}'") if raw != "" else ""
    return key.strip(), value


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML, or a ConfigError in one line naming ``where``, the line and the problem."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(part for part in (err.context, err.problem) if part)
        raise ConfigError(f"{where}{at}: not valid YAML ({problem})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML ({one_line(err)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a configuration") from None


def _merge(base: dict, update: dict) -> dict:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


INT64_LIMIT = 2**63
CONFIG_DIR = "${config_dir}"


def expand_config_dir(tree, directory: str):
    """``tree`` with ``${config_dir}`` in its strings replaced by ``directory``.

    Why: files megalign writes next to a model (megalign-convert's megalign.yaml, a checkpoint's
    recorded config) name its tokenizer and weights relative to where they are, so the directory
    can be moved or shared without holding paths of the machine it was made on."""
    if isinstance(tree, dict):
        return {key: expand_config_dir(value, directory) for key, value in tree.items()}
    if isinstance(tree, list):
        return [expand_config_dir(value, directory) for value in tree]
    if isinstance(tree, str) and CONFIG_DIR in tree:
        return os.path.normpath(tree.replace(CONFIG_DIR, directory or "."))
    return tree


def load_config(paths=None, overrides: Optional[list[str]] = None) -> Config:
    """YAML file(s), merged in order (later wins), + overrides -> ``Config``; ``${config_dir}``
    in a file's values is that file's directory."""
    tree: dict = {}
    for path in [paths] if isinstance(paths, str) else (paths or []):
        path = str(path)
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        with open(path, "rb") as handle:
            data = handle.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data[: err.start].count(b"\n") + 1
            raise ConfigError(f"config file '{path}', line {line}: not UTF-8 text") from None
        part = parse_yaml(text, f"config file '{path}'")
        part = {} if part is None else part
        if not isinstance(part, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
        part = expand_config_dir(part, os.path.dirname(path))
        data = part.get("data")
        if isinstance(data, dict) and "tokenizer" in data and "eod_token" not in data:
            _forget_eod_token(tree, data["tokenizer"])
        _merge(tree, part)
    parsed = [parse_override(text) for text in overrides or []]
    given = dict(parsed)
    if "data.tokenizer" in given and "data.eod_token" not in given:
        _forget_eod_token(tree, given["data.tokenizer"])
    for key, value in parsed:
        set_dotted(tree, key, value)
    return _build(Config, tree)


def _forget_eod_token(tree: dict, tokenizer) -> None:
    """An end-of-document token belongs to the tokenizer it was given with (megalign.yaml names
    a converted model's): another tokenizer given later without one brings its own rule
    (megalign/data/tokenizer.py)."""
    data = tree.get("data")
    if isinstance(data, dict) and data.get("tokenizer") != tokenizer:
        data.pop("eod_token", None)


def config_from_dict(tree: dict, directory: Optional[str] = None) -> Config:
    """A ``Config`` from a nested dict (as stored in checkpoints, whose ``${config_dir}`` is
    ``directory``); unknown keys are errors."""
    return _build(Config, tree if directory is None else expand_config_dir(tree, directory))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- validation


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def required_vocab_size(tokenizer_vocab: int, tokenizer_mask: Optional[int]) -> int:
    """Rows the model needs: the tokenizer's vocabulary plus a mask row when it has no <mask>."""
    return tokenizer_vocab + (0 if tokenizer_mask is not None else 1)


def padded_vocab_size(cfg: Config, tokenizer_vocab: int, tokenizer_mask: Optional[int]) -> int:
    """Vocabulary rows in the embedding; independent of TP so every layout trains the same model."""
    if cfg.model.padded_vocab_size is not None:
        return cfg.model.padded_vocab_size
    need = required_vocab_size(tokenizer_vocab, tokenizer_mask)
    return _round_up(need, cfg.model.make_vocab_size_divisible_by)


def mask_token_id(cfg: Config, tokenizer_vocab: int, tokenizer_mask: Optional[int]) -> int:
    if cfg.diffusion.mask_token_id is not None:
        return cfg.diffusion.mask_token_id
    return tokenizer_mask if tokenizer_mask is not None else tokenizer_vocab


def num_query_groups(model: ModelConfig) -> int:
    return model.num_query_groups or model.num_attention_heads


def head_dim(model: ModelConfig) -> int:
    return model.head_dim or model.hidden_size // model.num_attention_heads


def _validate_resilience(r: ResilienceConfig) -> None:
    if r.collective_timeout_minutes <= 0:
        raise ConfigError(
            f"resilience.collective_timeout_minutes={r.collective_timeout_minutes} must be > 0"
        )
    if r.heartbeat_interval_s <= 0:
        raise ConfigError(f"resilience.heartbeat_interval_s={r.heartbeat_interval_s} must be > 0")
    if r.failure_timeout_s and r.failure_timeout_s < 3 * r.heartbeat_interval_s:
        raise ConfigError(
            f"resilience.failure_timeout_s={r.failure_timeout_s} must be at least 3 x "
            f"resilience.heartbeat_interval_s ({r.heartbeat_interval_s}), or 0 to turn the "
            "watchdog off; a shorter bound would declare healthy ranks dead"
        )
    if r.inprocess_restart:
        _validate_inprocess_restart(r)


def _validate_inprocess_restart(r: ResilienceConfig) -> None:
    import importlib.util

    if importlib.util.find_spec("nvidia_resiliency_ext") is None:
        raise ConfigError(
            "resilience.inprocess_restart=true needs NVIDIA's resiliency extension, which this "
            "Python cannot import: pip install 'megalign[resilience]' (nvidia-resiliency-ext), "
            "or set resilience.inprocess_restart=false"
        )
    if r.inprocess_max_restarts < 1:
        raise ConfigError(f"resilience.inprocess_max_restarts={r.inprocess_max_restarts} must be "
                          ">= 1 with resilience.inprocess_restart=true")
    if r.failure_timeout_s <= 0:
        raise ConfigError("resilience.inprocess_restart=true detects faults with "
                          "resilience.failure_timeout_s: set it > 0 (default 60)")
    if 2 * r.failure_timeout_s >= 60 * r.collective_timeout_minutes:
        raise ConfigError(
            f"resilience.collective_timeout_minutes={r.collective_timeout_minutes:g} must exceed "
            f"2 x resilience.failure_timeout_s ({2 * r.failure_timeout_s:g} s): in-process "
            "restart terminates a stuck rank after that long, and its barriers wait for the "
            "collective timeout"
        )


def _validate_evaluation(cfg: Config) -> None:
    e = cfg.evaluation
    if e.interval < 0:
        raise ConfigError(f"evaluation.interval={e.interval} must be >= 0 (0 = off)")
    for key, value in {"evaluation.samples": e.samples, "evaluation.t_grid": e.t_grid,
                       "evaluation.batch_size": e.batch_size or 1,
                       "evaluation.prompt_length": e.prompt_length,
                       "evaluation.gen_length": e.gen_length}.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    for key, value in {"evaluation.infill_span": e.infill_span,
                       "evaluation.generation_samples": e.generation_samples}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0 (0 = off)")
    if e.generation_samples > e.samples:
        raise ConfigError(f"evaluation.generation_samples={e.generation_samples} exceeds "
                          f"evaluation.samples={e.samples}: the prompts are held-out samples")
    if e.generation_samples and e.prompt_length + e.gen_length > cfg.model.seq_length:
        raise ConfigError(f"evaluation.prompt_length + evaluation.gen_length ({e.prompt_length} + "
                          f"{e.gen_length}) exceeds model.seq_length={cfg.model.seq_length}")
    if e.infill_span >= cfg.model.seq_length // 2:
        raise ConfigError(f"evaluation.infill_span={e.infill_span} must be below half of "
                          f"model.seq_length ({cfg.model.seq_length}): it needs a prefix and a "
                          "suffix")
    if e.interval and cfg.parallel.virtual_pipeline_model_parallel_size is not None:
        raise ConfigError(
            "evaluation.interval > 0 needs one model chunk per rank: the held-out forward "
            "(megalign/model/inference.py) does not run the interleaved schedule; set "
            "parallel.virtual_pipeline_model_parallel_size=null or evaluation.interval=0 "
            "and score checkpoints with megalign-eval"
        )
    if e.interval and e.samples < (e.batch_size or cfg.data.micro_batch_size):
        raise ConfigError(
            f"evaluation.samples={e.samples} is fewer than one batch "
            f"(evaluation.batch_size={e.batch_size or cfg.data.micro_batch_size})"
        )


def _validate_causal_lm(cfg: Config) -> None:
    """objective=ar trains the causal model alone: nothing to align to, no masks to learn."""
    diffusion_only = {
        "align.weight": (cfg.align.weight, 0.0),
        "diffusion.block_length": (cfg.diffusion.block_length, None),
        "diffusion.anneal_iters": (cfg.diffusion.anneal_iters, 0),
        "diffusion.loss_weighting": (cfg.diffusion.loss_weighting, "none"),
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


def data_parallel_size(cfg: Config, world_size: int) -> int:
    return world_size // (cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size)


def _check_choices(cfg: Config, choices: dict) -> None:
    for key, allowed in choices.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node not in allowed:
            raise ConfigError(f"{key}={node!r} is not one of {list(allowed)}")


def validate_model(
    cfg: Config,
    tokenizer_vocab: Optional[int] = None,
    tokenizer_mask: Optional[int] = None,
) -> None:
    """The model, its TP/PP layout and its vocabulary: what building the model needs. Training
    checks it with the rest (``validate``); inference and export check the config a checkpoint
    records with it."""
    _check_choices(cfg, {key: allowed for key, allowed in CHOICES.items()
                         if key.startswith("model.")})
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    for key, value in {"parallel.tensor_model_parallel_size": tp,
                       "parallel.pipeline_model_parallel_size": pp,
                       "model.num_layers": m.num_layers,
                       "model.hidden_size": m.hidden_size,
                       "model.num_attention_heads": m.num_attention_heads,
                       "model.seq_length": m.seq_length,
                       "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
                       "model.rotary_base": m.rotary_base}.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    for key in ("ffn_hidden_size", "num_query_groups", "head_dim", "padded_vocab_size",
                "max_position_embeddings"):
        value = getattr(m, key)
        if value is not None and value < 1:
            raise ConfigError(f"model.{key}={value} must be at least 1 (or null: the default)")
    for key in ("norm_epsilon", "init_method_std"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be > 0")
    if m.head_dim is None and m.hidden_size % m.num_attention_heads != 0:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by "
            f"model.num_attention_heads={m.num_attention_heads}; set model.head_dim"
        )
    if m.arch == "llama" and head_dim(m) % 2:
        raise ConfigError(f"model.head_dim={head_dim(m)} must be even (RoPE rotates pairs)")
    if m.arch == "gpt2" and (m.qk_norm or m.rope_scaling_factor is not None
                             or m.head_dim not in (None, m.hidden_size // m.num_attention_heads)):
        raise ConfigError("model.qk_norm, model.rope_scaling_factor and a model.head_dim other "
                          "than hidden_size / heads need model.arch=llama")
    ep = p.expert_model_parallel_size
    if ep < 1:
        raise ConfigError(f"parallel.expert_model_parallel_size={ep} must be at least 1")
    if m.num_experts is None:
        if ep > 1:
            raise ConfigError(f"parallel.expert_model_parallel_size={ep} needs experts "
                              "(model.num_experts)")
    else:
        if m.arch != "llama":
            raise ConfigError("model.num_experts needs model.arch=llama")
        if m.num_experts < 1:
            raise ConfigError(f"model.num_experts={m.num_experts} must be at least 1 (or null: "
                              "a dense model)")
        if not 1 <= m.moe_topk <= m.num_experts:
            raise ConfigError(f"model.moe_topk={m.moe_topk} must be between 1 and "
                              f"model.num_experts={m.num_experts}")
        if m.num_experts % ep:
            raise ConfigError(f"parallel.expert_model_parallel_size={ep} does not divide "
                              f"model.num_experts={m.num_experts}")
        if m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size < 1:
            raise ConfigError(f"model.moe_ffn_hidden_size={m.moe_ffn_hidden_size} must be at "
                              "least 1 (or null: model.ffn_hidden_size)")
        if not m.moe_aux_loss_coeff >= 0:
            raise ConfigError(f"model.moe_aux_loss_coeff={m.moe_aux_loss_coeff} must be >= 0")
    if m.rope_scaling_factor is not None and not m.rope_scaling_factor >= 1:
        raise ConfigError(f"model.rope_scaling_factor={m.rope_scaling_factor} must be at least 1 "
                          "(or null: unscaled)")
    if m.num_attention_heads % tp != 0:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} does not divide "
            f"model.num_attention_heads={m.num_attention_heads}; choose a TP size that divides it"
        )
    groups = num_query_groups(m)
    if m.num_attention_heads % groups != 0:
        raise ConfigError(
            f"model.num_query_groups={groups} does not divide "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if groups % tp != 0:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={tp} does not divide "
            f"model.num_query_groups={groups} (KV groups); choose a TP size that divides {groups}"
        )
    if m.num_layers % pp != 0:
        raise ConfigError(
            f"parallel.pipeline_model_parallel_size={pp} does not divide "
            f"model.num_layers={m.num_layers}; choose a PP size that divides {m.num_layers}"
        )
    if tokenizer_vocab is not None:
        need = required_vocab_size(tokenizer_vocab, tokenizer_mask)
        vocab = padded_vocab_size(cfg, tokenizer_vocab, tokenizer_mask)
        if vocab < need:
            raise ConfigError(
                f"model.padded_vocab_size={vocab} is smaller than the {need} rows the tokenizer and "
                "the mask token need"
            )
        if vocab % tp != 0:
            key = (
                "model.padded_vocab_size"
                if m.padded_vocab_size is not None
                else "model.make_vocab_size_divisible_by"
            )
            raise ConfigError(
                f"{key}: the padded vocabulary ({vocab}) is not divisible by "
                f"tensor_model_parallel_size={tp}; use a multiple of {tp}"
            )
        mask = mask_token_id(cfg, tokenizer_vocab, tokenizer_mask)
        if not 0 <= mask < vocab:
            raise ConfigError(
                f"diffusion.mask_token_id={mask} lies outside the padded vocabulary (0..{vocab - 1})"
            )


def validate_inference(
    cfg: Config,
    tokenizer_vocab: Optional[int] = None,
    tokenizer_mask: Optional[int] = None,
) -> None:
    """What sampling, evaluating or exporting a checkpoint reads of its config: the model
    (``validate_model``), the seeds and the diffusion settings."""
    validate_model(cfg, tokenizer_vocab, tokenizer_mask)
    _check_choices(cfg, {"diffusion.loss_weighting": CHOICES["diffusion.loss_weighting"]})
    for key, value in {"seed": cfg.seed, "evaluation.seed": cfg.evaluation.seed}.items():
        if not 0 <= value < 2**32:  # numpy's generators (Megatron's dataset shuffles) need this
            raise ConfigError(f"{key}={value} must lie in 0..{2**32 - 1}")
    d = cfg.diffusion
    if not 0.0 < d.eps < 0.5:
        raise ConfigError(f"diffusion.eps={d.eps} must lie in (0, 0.5)")
    if d.block_length is not None and d.block_length < 1:
        raise ConfigError(f"diffusion.block_length={d.block_length} must be >= 1 "
                          "(null: the whole sequence is one block)")
    if d.block_length and d.anneal_iters:
        raise ConfigError("diffusion.block_length and diffusion.anneal_iters are two ways of "
                          "leaving causal attention: set one of them")
    if d.anneal_iters < 0:
        raise ConfigError(f"diffusion.anneal_iters={d.anneal_iters} must be >= 0 "
                          "(0: no annealing)")


RECOMPUTE_MODULES = ("core_attn", "mlp", "moe", "layernorm")  # Megatron-Core's, for our layers


def _validate_recompute(cfg: Config) -> None:
    r, m = cfg.recompute, cfg.model
    if r.granularity is None:
        return
    if r.granularity == "selective":
        unknown = [name for name in r.modules if name not in RECOMPUTE_MODULES]
        if unknown or not r.modules:
            raise ConfigError(f"recompute.modules={r.modules}: give some of "
                              f"{list(RECOMPUTE_MODULES)}")
        if "moe" in r.modules and not m.num_experts:
            raise ConfigError("recompute.modules: 'moe' recomputes expert layers; this model has "
                              "none (model.num_experts is null): use 'mlp'")
        return
    p = cfg.parallel
    per_chunk = m.num_layers // (p.pipeline_model_parallel_size
                                 * (p.virtual_pipeline_model_parallel_size or 1))
    if not 1 <= r.num_layers <= per_chunk:
        raise ConfigError(f"recompute.num_layers={r.num_layers} must lie in 1..{per_chunk} "
                          "(the layers of one pipeline stage, or virtual stage)")
    if r.method == "uniform" and r.num_layers > 1 and cfg.align.weight > 0:
        raise ConfigError(
            f"recompute.num_layers={r.num_layers} with recompute.method=uniform recomputes "
            "several layers as one unit, and the aligned hidden states inside a unit get no "
            "gradient: use recompute.num_layers=1 or recompute.method=block")


def validate(
    cfg: Config,
    world_size: int,
    tokenizer_vocab: Optional[int] = None,
    tokenizer_mask: Optional[int] = None,
) -> None:
    """Raise ``ConfigError`` for the first impossible combination found."""
    _check_choices(cfg, CHOICES)
    validate_inference(cfg, tokenizer_vocab, tokenizer_mask)

    m, p, d = cfg.model, cfg.parallel, cfg.data
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    positive = {
        "data.micro_batch_size": d.micro_batch_size,
        "data.global_batch_size": d.global_batch_size,
        "schedule.train_iters": cfg.schedule.train_iters,
        "logging.log_interval": cfg.logging.log_interval,
        "fp8.amax_history_len": cfg.fp8.amax_history_len,
    }
    for key, value in {"checkpoint.save_interval": cfg.checkpoint.save_interval,
                       "checkpoint.keep_last_n": cfg.checkpoint.keep_last_n,
                       "fp8.margin": cfg.fp8.margin}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value} must be at least 1")
    _validate_resilience(cfg.resilience)

    vpp = p.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if pp < 2 or vpp < 2:
            raise ConfigError(
                "parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size "
                ">= 2 and a value >= 2 (or null for the non-interleaved schedule)"
            )
        if m.num_layers % (pp * vpp) != 0:
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size={vpp}: pipeline ({pp}) x virtual "
                f"({vpp}) = {pp * vpp} model chunks do not divide model.num_layers={m.num_layers}"
            )
    if p.sequence_parallel and tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
    if p.sequence_parallel and m.seq_length % tp != 0:
        raise ConfigError(
            f"model.seq_length={m.seq_length} must be divisible by tensor_model_parallel_size={tp} "
            "with parallel.sequence_parallel=true"
        )

    if world_size % (tp * pp) != 0:
        raise ConfigError(
            f"parallel: tensor ({tp}) x pipeline ({pp}) = {tp * pp} does not divide the world size "
            f"{world_size}; launch a multiple of {tp * pp} processes or change the parallel sizes"
        )
    dp = data_parallel_size(cfg, world_size)
    if cfg.model.num_experts and tp > 1 and not cfg.parallel.sequence_parallel:
        raise ConfigError("training experts with parallel.tensor_model_parallel_size > 1 needs "
                          "parallel.sequence_parallel=true (Megatron-Core's MoE layer)")
    if dp % cfg.parallel.expert_model_parallel_size:
        raise ConfigError(
            f"parallel.expert_model_parallel_size={cfg.parallel.expert_model_parallel_size} does "
            f"not divide the data-parallel size {dp}; launch more processes or use a smaller one")
    if d.global_batch_size % (d.micro_batch_size * dp) != 0:
        raise ConfigError(
            f"data.global_batch_size={d.global_batch_size} is not divisible by "
            f"data.micro_batch_size ({d.micro_batch_size}) x data-parallel size ({dp}); "
            f"use a multiple of {d.micro_batch_size * dp}"
        )
    if vpp is not None and (d.global_batch_size // (d.micro_batch_size * dp)) % pp != 0:
        raise ConfigError(
            f"data.global_batch_size={d.global_batch_size}: the interleaved schedule needs a "
            f"number of micro-batches per step divisible by pipeline_model_parallel_size={pp}; "
            f"use a multiple of {d.micro_batch_size * dp * pp}"
        )
    if cfg.align.weight < 0:
        raise ConfigError(f"align.weight={cfg.align.weight} must be >= 0")
    _validate_recompute(cfg)
    if cfg.align.teacher_microbatches < 1:
        raise ConfigError(f"align.teacher_microbatches={cfg.align.teacher_microbatches} must be "
                          ">= 1 (1 = one teacher forward per micro-batch)")
    if cfg.fp8.teacher and cfg.precision != "fp8":
        raise ConfigError(
            f"fp8.teacher=true needs precision=fp8 (got precision={cfg.precision}); "
            "set precision=fp8 or drop fp8.teacher"
        )
    if cfg.align.layers is not None:
        bad = [i for i in cfg.align.layers if not isinstance(i, int) or not 0 <= i <= m.num_layers]
        if bad or not cfg.align.layers:
            raise ConfigError(
                f"align.layers={cfg.align.layers}: give indices in 0..{m.num_layers} "
                "(0 = embedding output, i = output of block i, "
                f"{m.num_layers} = final-norm output)"
            )
    if cfg.align.layer_weights is not None:
        count = len(cfg.align.layers) if cfg.align.layers is not None else m.num_layers + 1
        if len(cfg.align.layer_weights) != count or any(w < 0 for w in cfg.align.layer_weights):
            raise ConfigError(
                f"align.layer_weights needs {count} non-negative numbers (one per aligned layer)"
            )
    if not 0 <= cfg.schedule.warmup_iters < cfg.schedule.train_iters:
        raise ConfigError(
            f"schedule.warmup_iters={cfg.schedule.warmup_iters} must lie in "
            f"0..schedule.train_iters - 1 ({cfg.schedule.train_iters - 1})"
        )
    _validate_evaluation(cfg)
    if cfg.objective == "ar":
        _validate_causal_lm(cfg)
    if not d.paths:
        raise ConfigError("data.paths is empty; give [prefix] or [weight1, prefix1, ...]")
    for key, paths in {"data.paths": d.paths, "evaluation.paths": cfg.evaluation.paths,
                       "evaluation.ood_paths": cfg.evaluation.ood_paths}.items():
        parse_blend(paths, key)
    if not d.tokenizer:
        raise ConfigError("data.tokenizer is empty; give a SentencePiece .model file")
