"""Student and teacher models: Megatron-Core ``GPTModel`` built from one ``TransformerConfig``.

The student and the teacher differ only in the attention mask type: bidirectional for the student,
causal for the teacher. With document attention both receive an explicit block-diagonal mask
(``megalign.model.attention``), so the mask type only tells the attention kernel how to read it.
"""

# Imports inside functions are deliberate here: Transformer Engine's layer spec is imported only
# where TE and a GPU are present.

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megalign.config import (
    Config,
    Fp8Config,
    ModelConfig,
    ParallelConfig,
    RecomputeConfig,
)
from megalign.errors import ConfigError
from megalign.model.core_attention import ContextParallelAttention
from megalign.model.norm import TorchNorm
from megalign.model.streams import stream_count, use_stream_positions


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GeLU (tanh approximation, HF ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


def transformer_engine_imports() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_engine_available() -> bool:
    """TE kernels are used only when TE imports and a GPU is present."""
    return torch.cuda.is_available() and transformer_engine_imports()


def check_platform(cfg: Config) -> None:
    """Configuration choices this machine's kernels cannot run (raises ``ConfigError``)."""
    if cfg.precision == "fp8":
        check_fp8(cfg)
    r = cfg.recompute
    layernorm = r.granularity == "selective" and "layernorm" in r.modules
    if layernorm and not transformer_engine_available():
        raise ConfigError("recompute.modules 'layernorm' needs Transformer Engine on a GPU; "
                          "drop it here (core_attn and mlp recompute everywhere)")
    explicit_mask = attention_mask_type(cfg, causal=cfg.objective == "ar") == AttnMaskType.arbitrary
    if (cfg.parallel.context_parallel_size > 1 and explicit_mask
            and transformer_engine_available()):
        raise ConfigError(
            "parallel.context_parallel_size > 1 with an explicit attention mask (model."
            "document_attention or diffusion.anneal_iters): Transformer Engine's context-parallel "
            "attention has no arbitrary-mask form; set model.document_attention=false and "
            "diffusion.anneal_iters=0, or parallel.context_parallel_size=1")
    if (packs_documents(cfg) and cfg.parallel.sequence_parallel and cfg.align.uses_teacher
            and cfg.align.teacher_microbatches > 1):
        raise ConfigError(
            f"align.teacher_microbatches={cfg.align.teacher_microbatches} with packed documents "
            "(THD) and sequence parallelism: a group's packed rows would not split over the "
            "tensor-parallel ranks as each micro-batch's do; set align.teacher_microbatches=1 or "
            "model.document_format=mask")
    if cfg.model.moe_token_dispatcher == "alltoall" and not torch.cuda.is_available():
        raise ConfigError("model.moe_token_dispatcher=alltoall needs CUDA (Megatron-Core's "
                          "all-to-all dispatcher synchronises through CUDA streams); use allgather "
                          "here")


def check_fp8(cfg: Config) -> None:
    """FP8 GEMMs are Transformer Engine kernels for Ada/Hopper (8.9+); MXFP8 needs Blackwell
    (10.0+)."""
    missing = [reason for reason, absent in (
        ("no GPU is visible", not torch.cuda.is_available()),
        ("transformer_engine does not import", not transformer_engine_imports()),
    ) if absent]
    if missing:
        raise ConfigError(
            f"precision=fp8 needs a GPU and Transformer Engine; here {' and '.join(missing)}. "
            "Install TE (pip install 'megalign[gpu]') or use the NGC image (docker/Dockerfile), "
            "or set precision=bf16 or precision=fp32"
        )
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise ConfigError(
            f"precision=fp8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); this "
            f"GPU has {capability[0]}.{capability[1]}: set precision=bf16"
        )
    if cfg.fp8.recipe == "mxfp8" and capability < (10, 0):
        raise ConfigError(
            f"fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability 10.0+); this GPU has "
            f"{capability[0]}.{capability[1]}: use fp8.recipe=delayed or tensorwise"
        )


def ffn_hidden_size(m: ModelConfig) -> int:
    if m.ffn_hidden_size is not None:
        return m.ffn_hidden_size
    if m.arch == "gpt2":
        return 4 * m.hidden_size
    return -(-int(8 * m.hidden_size / 3) // 64) * 64  # SwiGLU: 8/3 h rounded up to 64


def moe_ffn_hidden_size(m: ModelConfig) -> int:
    """Each expert's SwiGLU width: ``model.moe_ffn_hidden_size``, else the dense MLP's."""
    return m.moe_ffn_hidden_size or ffn_hidden_size(m)


@dataclass(frozen=True)
class ModelBuild:
    """What building one model's chunks on this rank reads: the model and parallel sections, the
    weights' dtype, and what the objective asks of attention. The run config is read once, by
    ``ModelBuild.of``; everything below takes this."""

    model: ModelConfig
    parallel: ParallelConfig
    params_dtype: torch.dtype = torch.float32
    attention: AttnMaskType = AttnMaskType.causal
    # block diffusion's noisy and clean copies of each sequence, each numbered from 0 (RoPE)
    streams: int = 1
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    fp8: Optional[Fp8Config] = None  # the GEMMs under Transformer Engine's FP8 autocast
    packed: bool = False  # documents as THD (``packs_documents``)

    @classmethod
    def of(cls, cfg: Config, *, causal: bool, params_dtype: torch.dtype,
           fp8: bool = False) -> "ModelBuild":
        """The run's model: a causal AR model (teacher, scorer, ``objective=ar``) or the
        bidirectional student, whose objective may pass an explicit mask and two streams."""
        return cls(model=cfg.model, parallel=cfg.parallel, params_dtype=params_dtype,
                   attention=attention_mask_type(cfg, causal),
                   streams=1 if causal else stream_count(cfg.diffusion.block_length,
                                                         cfg.model.seq_length,
                                                         cfg.diffusion.ar_loss_weight > 0),
                   recompute=cfg.recompute, fp8=cfg.fp8 if fp8 else None,
                   packed=packs_documents(cfg))


def transformer_config(build: ModelBuild) -> TransformerConfig:
    """Megatron-Core's config; ``build.fp8`` puts the GEMMs under TE's FP8 autocast.

    With Transformer Engine (GPU) the fused kernels are on; the local spec (CPU) has none.
    """
    m, parallel, params_dtype = build.model, build.parallel, build.params_dtype
    llama = m.arch == "llama"
    on_gpu = torch.cuda.is_available()
    fused = transformer_engine_available()
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=ffn_hidden_size(m),
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.query_groups,
        kv_channels=m.kv_channels,
        qk_layernorm=m.qk_norm,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        context_parallel_size=parallel.context_parallel_size,
        **({"cp_comm_type": parallel.cp_comm_type}
           if fused and parallel.context_parallel_size > 1 else {}),
        normalization="RMSNorm" if llama else "LayerNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=llama,
        activation_func=F.silu if llama else gelu_tanh,
        add_bias_linear=not llama,
        add_qkv_bias=m.qkv_bias or not llama,
        init_method_std=m.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=not on_gpu,
        bias_activation_fusion=fused and llama,  # fused SwiGLU; GPT-2's tanh GeLU has no fused form
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused and llama,
        gradient_accumulation_fusion=fused,  # wgrad straight into Megatron DDP's main_grad
        persist_layer_norm=False,  # apex-only; TE norms are used with TE
        **moe_config(m, parallel),
        **recompute_config(build.recompute),
        **fp8_config(build.fp8),
    )


def recompute_config(r: RecomputeConfig) -> dict:
    """Megatron-Core's activation recomputation. It acts only in training mode, so the teacher
    and the causal scorer (eval mode, no_grad) never recompute."""
    if r.granularity is None:
        return {}
    if r.granularity == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(r.modules))
    return dict(recompute_granularity="full", recompute_method=r.method,
                recompute_num_layers=r.num_layers)


def fp8_config(fp8: Optional[Fp8Config]) -> dict:
    """Transformer Engine's FP8 recipe for Megatron-Core (``None``: no FP8 GEMMs)."""
    if fp8 is None:
        return {}
    return dict(fp8=fp8.format, fp8_recipe=fp8.recipe, fp8_margin=fp8.margin,
                fp8_amax_history_len=fp8.amax_history_len,
                fp8_amax_compute_algo=fp8.amax_compute_algo, fp8_wgrad=fp8.wgrad)


def moe_config(m: ModelConfig, parallel: ParallelConfig) -> dict:
    """Megatron-Core's MoE settings: a softmax router, dropless, the configured token dispatcher
    (all-gather, the one that runs on CPU/gloo, by default), one ``SequentialMLP`` of SwiGLU
    experts per layer, and Qwen2-MoE's gated shared expert when the model has one."""
    if m.num_experts is None:
        return {}
    # the dispatcher moves tokens, it does not change what they compute: a checkpoint trained
    # with alltoall on GPUs samples and evaluates on a CPU with allgather (training refuses it
    # there: check_platform)
    dispatcher = m.moe_token_dispatcher if torch.cuda.is_available() else "allgather"
    return dict(num_moe_experts=m.num_experts, moe_router_topk=m.moe_topk,
                moe_ffn_hidden_size=moe_ffn_hidden_size(m),
                moe_router_pre_softmax=m.moe_router_pre_softmax,
                moe_router_score_function="softmax", moe_router_load_balancing_type="aux_loss",
                moe_aux_loss_coeff=m.moe_aux_loss_coeff,
                moe_token_dispatcher_type=dispatcher, moe_grouped_gemm=False,
                moe_shared_expert_intermediate_size=m.moe_shared_expert_ffn_hidden_size,
                moe_shared_expert_gate=m.moe_shared_expert_gate,
                expert_model_parallel_size=parallel.expert_model_parallel_size)


def layer_spec(m: ModelConfig, attn_mask_type: AttnMaskType):
    """TE spec on GPUs with Transformer Engine; otherwise Megatron-Core's local spec with torch
    norms that also run under sequence parallelism (``megalign.model.norm``) and megalign's core
    attention, which also runs under context parallelism (``megalign.model.core_attention``)."""
    if transformer_engine_available():
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=m.num_experts, moe_grouped_gemm=False, qk_layernorm=m.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(num_experts=m.num_experts, moe_grouped_gemm=False,
                                        qk_layernorm=m.qk_norm)
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = TorchNorm
        spec.submodules.self_attention.submodules.core_attention = ContextParallelAttention
        if m.qk_norm:
            attention = spec.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = TorchNorm
    spec.submodules.self_attention.params["attn_mask_type"] = attn_mask_type
    return spec


def block_spec(build: ModelBuild, config: TransformerConfig, vp_stage=None):
    """The layers of this stage, and (local spec) the final norm as ``TorchNorm`` too."""
    spec = layer_spec(build.model, build.attention)
    if transformer_engine_available():
        return spec
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=TorchNorm)


def build_chunks(build: ModelBuild, vocab_size: int) -> list:
    """All model chunks of this rank: one, or ``virtual_pipeline_model_parallel_size`` of them."""
    vpp = build.parallel.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    return [build_gpt(build, vocab_size, vp_stage=v) for v in stages]


def packs_documents(cfg: Config) -> bool:
    """Whether the run's micro-batches carry their documents as THD (Megatron-Core
    ``PackedSeqParams``) instead of an explicit mask: ``model.document_format``, whose "auto" is
    THD where Transformer Engine runs. Block diffusion, annealing and the hybrid objective's two
    streams always take a mask, as does context parallelism (its THD partition is not
    implemented)."""
    m, d = cfg.model, cfg.diffusion
    if not m.document_attention or m.document_format == "mask":
        return False
    diffusion = cfg.objective != "ar"
    if diffusion and (d.anneal_iters or d.ar_loss_weight
                      or (d.block_length and d.block_length < m.seq_length)):
        return False
    if m.document_format == "thd":
        return True
    return transformer_engine_available() and cfg.parallel.context_parallel_size == 1


def attention_mask_type(cfg: Config, causal: bool) -> AttnMaskType:
    """How the run's model attends: causal (the AR model) or bidirectional, through an explicit
    mask (``megalign.model.attention``) under document attention, block diffusion, annealing or
    the hybrid objective, or inside each packed document under THD (the mask type then says
    causal or not)."""
    d = cfg.diffusion
    two_streams_or_annealed = d.anneal_iters or d.block_length or d.ar_loss_weight
    explicit = cfg.model.document_attention or (not causal and two_streams_or_annealed)
    if explicit and not packs_documents(cfg):
        return AttnMaskType.arbitrary  # explicit mask from megalign.model.attention
    return AttnMaskType.causal if causal else AttnMaskType.no_mask


def build_gpt(build: ModelBuild, vocab_size: int, vp_stage=None) -> GPTModel:
    """One model chunk of this rank (layers of this PP stage / virtual stage, TP shard of each)."""
    m = build.model
    config = transformer_config(build)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec(build, config, vp_stage),
        vocab_size=vocab_size,
        max_sequence_length=m.max_position_embeddings or m.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope" if m.arch == "llama" else "learned_absolute",
        rotary_base=m.rotary_base,
        rope_scaling=m.rope_scaling_factor is not None,
        rope_scaling_factor=m.rope_scaling_factor or 8.0,  # (Megatron-Core's default, unused)
        vp_stage=vp_stage,
    )
    if (build.streams == 2 or build.packed) and m.arch == "llama":
        # two streams (block diffusion, the hybrid objective), or a THD micro-batch's samples,
        # each numbered from 0
        use_stream_positions(model)
    if m.arch == "gpt2" and model.pre_process:
        # Megatron-Core makes the learned position embedding in fp32 whatever params_dtype is;
        # Float16Module converts a student's, nothing converts the teacher's or the scorer's
        model.embedding.position_embeddings.to(build.params_dtype)
    if not torch.cuda.is_available():
        return model
    return model.cuda(torch.cuda.current_device())


def cast_chunk(chunk: GPTModel, dtype: torch.dtype) -> None:
    """Cast a built chunk (weights, and the activations pipeline stages exchange) to ``dtype``
    for inference, computing as if it had been built in ``dtype``: Megatron-Core fixes some
    arithmetic at construction from ``config.bf16``, e.g. the local spec's attention softmax
    runs in float32 for a bf16 model (left as built, it ran in bf16 after the cast, unlike a
    model trained in bf16 and unlike the transformers export)."""
    chunk.to(dtype)
    config = chunk.config  # one object shared by the chunk's modules
    config.params_dtype = config.pipeline_dtype = dtype
    config.bf16 = dtype == torch.bfloat16
    for module in chunk.modules():
        if isinstance(module, FusedScaleMaskSoftmax):
            module.input_in_bf16 = config.bf16
            module.input_in_float16 = module.input_in_fp16 or module.input_in_bf16


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def global_parameter_name(name: str, model: GPTModel) -> str:
    """Replace the stage-local layer index in ``name`` by the global one (PP-independent)."""
    match = _LAYER.search(name)
    if match is None:
        return name
    local = int(match.group(2))
    layer_number = model.decoder.layers[local].layer_number  # 1-based, global
    return name[: match.start(2)] + str(layer_number - 1) + name[match.end(2) :]
