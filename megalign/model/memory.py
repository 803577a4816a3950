"""What a model chunk holds per rank, counted from the config before anything is built: its
parameters (tensor by tensor, under the names Megatron-Core gives them, so ``optimizer.freeze``
patterns select what they select in training), the activations autograd keeps per layer, the
explicit attention mask, the attention's scores and their gradients, and the last stage's logits.
``megalign.training.memory_plan`` adds these up with what the teacher, the optimizer and
evaluation report for themselves.

Activations are the tensors autograd keeps per layer in the local (non-Transformer-Engine) spec,
counted from its code and checked against the tensors saved by a real forward pass (tests);
Transformer Engine's fused layers save less (flash attention keeps no sequence x sequence scores),
so on GPUs the activation figure is an upper bound. Every rank of one pipeline stage holds the
same amounts (tensor and expert parallel shards are even).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType

from megalign.config import Config
from megalign.model.gpt import ModelBuild, ffn_hidden_size, moe_ffn_hidden_size

FP32, BF16, INT64 = 4, 2, 8


# ----------------------------------------------------------------------------- parameters


def chunk_layers(cfg: Config, stage: int, chunk: int) -> range:
    """Global indices of the layers model chunk ``chunk`` of pipeline stage ``stage`` holds
    (Megatron-Core's assignment: chunk c of rank p holds block c * pp + p of L / (pp * v))."""
    p = cfg.parallel
    per_chunk = cfg.model.num_layers // p.chunks
    first = (chunk * p.pipeline_model_parallel_size + stage) * per_chunk
    return range(first, first + per_chunk)


def layer_parameters(cfg: Config, index: int) -> list[tuple[str, int]]:
    """(name, elements on one rank) of transformer layer ``index`` under the local spec."""
    m, p = cfg.model, cfg.parallel
    tp, ep = p.tensor_model_parallel_size, p.expert_model_parallel_size
    h, d = m.hidden_size, m.kv_channels
    llama = m.arch == "llama"
    qkv_rows = (m.num_attention_heads + 2 * m.query_groups) * d // tp
    prefix = f"decoder.layers.{index}."
    norms = ["weight"] if llama else ["weight", "bias"]
    table = [(f"{prefix}input_layernorm.{n}", h) for n in norms]
    table.append((f"{prefix}self_attention.linear_qkv.weight", qkv_rows * h))
    if m.qkv_bias or not llama:
        table.append((f"{prefix}self_attention.linear_qkv.bias", qkv_rows))
    if m.qk_norm:
        table += [(f"{prefix}self_attention.q_layernorm.weight", d),
                  (f"{prefix}self_attention.k_layernorm.weight", d)]
    table.append((f"{prefix}self_attention.linear_proj.weight",
                  h * m.num_attention_heads * d // tp))
    if not llama:
        table.append((f"{prefix}self_attention.linear_proj.bias", h))
    table += [(f"{prefix}pre_mlp_layernorm.{n}", h) for n in norms]
    if m.num_experts:
        f = moe_ffn_hidden_size(cfg.model)
        table.append((f"{prefix}mlp.router.weight", m.num_experts * h))
        for local in range(m.num_experts // ep):  # rank 0 of the expert group's names
            expert = f"{prefix}mlp.experts.local_experts.{local}."
            table += [(f"{expert}linear_fc1.weight", 2 * f // tp * h),
                      (f"{expert}linear_fc2.weight", h * f // tp)]
        shared = m.moe_shared_expert_ffn_hidden_size
        if shared:  # split over TP like a dense MLP; its gate replicated
            expert = f"{prefix}mlp.shared_experts."
            table += [(f"{expert}linear_fc1.weight", 2 * shared // tp * h),
                      (f"{expert}linear_fc2.weight", h * shared // tp)]
            if m.moe_shared_expert_gate:
                table.append((f"{expert}gate_weight", h))
        return table
    f = ffn_hidden_size(cfg.model)
    table.append((f"{prefix}mlp.linear_fc1.weight", (2 if llama else 1) * f // tp * h))
    if not llama:
        table.append((f"{prefix}mlp.linear_fc1.bias", f // tp))
    table.append((f"{prefix}mlp.linear_fc2.weight", h * f // tp))
    if not llama:
        table.append((f"{prefix}mlp.linear_fc2.bias", h))
    return table


def chunk_parameters(cfg: Config, vocab_size: int, stage: int, chunk: int) -> list[tuple[str, int]]:
    """(global name, elements on one rank) of one model chunk, as ``global_parameter_name``
    names the built model's parameters."""
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    first = stage == 0 and chunk == 0
    last = stage == p.pipeline_model_parallel_size - 1 and chunk == vpp - 1
    rows = vocab_size // tp * m.hidden_size
    table = []
    if first:
        table.append(("embedding.word_embeddings.weight", rows))
        if m.arch == "gpt2":
            positions = m.max_position_embeddings or m.seq_length
            table.append(("embedding.position_embeddings.weight", positions * m.hidden_size))
    for index in chunk_layers(cfg, stage, chunk):
        table += layer_parameters(cfg, index)
    if last:
        norms = ["weight"] if m.arch == "llama" else ["weight", "bias"]
        table += [(f"decoder.final_layernorm.{n}", m.hidden_size) for n in norms]
        if not m.tie_embeddings or not first:  # tied on one stage: the embedding is the output
            table.append(("output_layer.weight", rows))
    return table


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(cfg: Config, positions: int, batch: int, element: int,
                           flash: bool = False) -> int:
    """Bytes autograd keeps for one transformer layer's backward, one micro-batch of ``batch``
    sequences of ``positions``, activations of ``element`` bytes (the local spec; selective
    recomputation as configured, full recomputation in ``chunk_activation_bytes``). Under context
    parallelism a rank holds ``positions / cp`` of each sequence, and its attention the keys and
    values of all ``positions`` (gathered over the context-parallel group) and the scores of its
    queries against them.

    Counted from the local spec's code: each norm keeps its input, its output (RMSNorm) and one or
    two statistics per position; the QKV and fc1 projections their inputs; rotary embedding its cos
    and sin for queries and keys; core attention the queries, the keys and values (repeated to every
    head under GQA, else views that keep the fused QKV output whole), the softmax output (also in
    fp32 under bf16) and the context; SwiGLU its fused input and both halves; an MoE layer its
    router's choices, the permuted tokens and each expert's SwiGLU per routed token (and a shared
    expert's SwiGLU per token, its gate's score and the output it scales). ``flash``:
    Transformer Engine's fused attention, which keeps a softmax statistic per head and position
    instead of the scores (the rest counted as the local spec, not measured).
    """
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    sp = tp if p.sequence_parallel else 1
    keys = positions  # what each query attends over
    positions //= p.context_parallel_size  # this rank's
    tokens = positions * batch
    h, d = m.hidden_size, m.kv_channels
    heads, groups = m.num_attention_heads // tp, m.query_groups // tp
    llama = m.arch == "llama"
    selective = cfg.recompute.modules if cfg.recompute.granularity == "selective" else []
    # norms and the QKV and fc1 inputs, sequence-sharded under SP. torch's RMSNorm computes in
    # fp32 and keeps its input and output in fp32 (and its statistic) whatever the dtype;
    # LayerNorm keeps its input and two statistics in the activations' dtype.
    if llama:
        norms = 2 * (2 * h * FP32 + FP32)
    else:
        norms = 2 * (h + 2) * element
    hidden_bytes = tokens * (norms + 2 * h * element) // sp
    qkv, context = (heads + 2 * groups) * d, heads * d
    gqa, core = groups != heads, "core_attn" in selective
    scores = gathered = 0
    cp = p.context_parallel_size > 1
    if not llama:  # queries, keys and values are views of the QKV output
        attention = qkv + context
        scores = batch * heads * positions * keys
        if cp:  # the keys and values of every position, gathered
            gathered = batch * keys * 2 * heads * d
    else:
        attention = context + heads * d  # the context; the queries after rotary embedding
        if core:  # the checkpoint keeps core attention's inputs (values: a view of QKV)
            attention += (groups * d if gqa else heads * d) + qkv
        elif cp:  # the keys and values of every position, gathered (repeated under GQA)
            gathered = batch * keys * 2 * heads * d
            scores = batch * heads * positions * keys
        else:
            attention += heads * d + (heads * d if gqa else qkv)  # keys; values
            scores = batch * heads * positions * keys
        qk_norm = 0
        if m.qk_norm and element == FP32:  # each norm's output and statistic; its input is a
            qk_norm = (heads + groups) * (d + 1) * FP32  # view, except the queries' with several
            if gqa:  # groups on this rank; under GQA the keys' view keeps the QKV output whole
                qk_norm += ((heads * d if groups > 1 else 0) + (0 if core else qkv)) * FP32
        elif m.qk_norm:  # torch's RMSNorm: input and output in fp32 and the statistic
            qk_norm = (heads + groups) * (2 * d + 1) * FP32
    attention_bytes = (tokens * attention + gathered
                       + (4 * positions * d if llama else 0)) * element
    if cp:  # the order the gathered keys and values are put back in
        attention_bytes += keys * INT64
    if llama:
        attention_bytes += tokens * qk_norm
    softmax = scores * (element + FP32 if element < FP32 else element)
    if flash and scores:
        softmax = batch * heads * positions * FP32
    if m.num_experts:  # the router sees this rank's tokens, the experts all of the TP group's
        local = tokens // sp
        routed = tokens * m.moe_topk
        f = moe_ffn_hidden_size(cfg.model) // tp
        if "moe" in selective:  # the whole layer is recomputed from its input
            return hidden_bytes + attention_bytes + softmax
        mlp = (routed * (h + 6 * f + 1)) * element
        router = (local * m.moe_topk * (8 + FP32) + routed * 8
                  + tokens * m.num_experts * (1 + FP32))  # approximate under SP (tests: 1%)
        shared = m.moe_shared_expert_ffn_hidden_size
        if shared:  # a dense SwiGLU over the TP group's tokens
            mlp += tokens * 5 * (shared // tp) * element
            if m.moe_shared_expert_gate:  # the gate's score and the output it scales
                mlp += local * (h + 1) * element
        return hidden_bytes + attention_bytes + softmax + mlp + router
    f = ffn_hidden_size(cfg.model) // tp
    mlp = 0 if "mlp" in selective else tokens * (5 if llama else 2) * f
    return hidden_bytes + attention_bytes + mlp * element + softmax


def student_build(cfg: Config) -> ModelBuild:
    """How the run builds its trained model (the dtype does not matter to what is counted)."""
    return ModelBuild.of(cfg, causal=cfg.objective == "ar", params_dtype=torch.float32)


def attention_mask_bytes(cfg: Config, positions: int, batch: int, gpu: bool = False) -> int:
    """The explicit boolean attention mask (document attention, block diffusion, annealing),
    kept once per chunk and micro-batch by the first layer that uses it; without Transformer
    Engine packed documents (THD) are attended under their mask too (megalign's core attention)."""
    build = student_build(cfg)
    explicit = build.attention == AttnMaskType.arbitrary or (build.packed and not gpu)
    rows = positions // cfg.parallel.context_parallel_size  # this rank's queries
    return batch * rows * positions if explicit else 0


def chunk_activation_bytes(cfg: Config, layers: int, positions: int, batch: int,
                           element: int, flash: bool = False) -> tuple[int, int]:
    """(bytes one micro-batch keeps for ``layers`` layers of a chunk, bytes of the recomputed
    unit while the backward recomputes it: held for one micro-batch at a time). Under full
    recomputation a recomputed unit keeps only its input."""
    full = layer_activation_bytes(cfg, positions, batch, element, flash)
    r = cfg.recompute
    if r.granularity != "full":
        return layers * full, 0
    p = cfg.parallel
    sp = p.tensor_model_parallel_size if p.sequence_parallel else 1
    unit_input = (positions // p.context_parallel_size * batch * cfg.model.hidden_size // sp
                  * element)
    if r.method == "uniform":  # units of num_layers layers
        units = -(-layers // r.num_layers)
        return units * unit_input, min(r.num_layers, layers) * full
    recomputed = min(r.num_layers, layers)  # block: the chunk's first num_layers, one by one
    return recomputed * unit_input + (layers - recomputed) * full, full if recomputed else 0


def stage_states(cfg: Config, stage: int, chunk: int) -> range:
    """Hidden-state indices (0 = embedding output, i + 1 = layer i's output) a chunk produces."""
    layers = chunk_layers(cfg, stage, chunk)
    first = 0 if stage == 0 and chunk == 0 else layers.start + 1
    return range(first, layers.stop + 1)


def attention_score_bytes(cfg: Config, batch: int, rows: int, keys: int, element: int) -> int:
    """One layer's attention scores on this rank (its heads): ``batch`` sequences, ``rows``
    queries each against ``keys`` keys, of ``element`` bytes."""
    heads = cfg.model.num_attention_heads // cfg.parallel.tensor_model_parallel_size
    return batch * heads * rows * keys * element


def attention_backward_bytes(cfg: Config, positions: int, batch: int) -> int:
    """The backward of one layer's unfused attention (the local spec) holds two score-sized fp32
    gradients at once: of the probabilities, then of the scores through the softmax and mask."""
    rows = positions // cfg.parallel.context_parallel_size
    return 2 * attention_score_bytes(cfg, batch, rows, positions, FP32)


def loss_workspace_bytes(cfg: Config, vocab_size: int, positions: int, batch: int) -> int:
    """The last stage's logits of this rank's positions (its vocabulary shard): their fp32 softmax
    and its gradient, and under mixed precision the bf16 logits they came from."""
    local = positions // cfg.parallel.context_parallel_size
    logits = local * batch * vocab_size // cfg.parallel.tensor_model_parallel_size
    return logits * (2 * FP32 + (BF16 if cfg.precision != "fp32" else 0))
