"""Bytes per rank of a training run, predicted from its config before anything is allocated.

Why: a conversion holds a student (weights, fp32 gradients, Adam states), a frozen teacher and the
activations of the micro-batches the pipeline schedule keeps in flight; whether that fits on a GPU
should be known before a multi-node job queues, not after it runs out of memory. Megatron-LM
prints a theoretical estimate for plain pretraining; this one also counts the teacher (net of the
frozen tensors it shares with the student), the aligned teacher states held until each micro-batch's
backward, block diffusion's two streams, the causal scorer of generated samples and, on CPU, the
score-sized gradients of the unfused attention's backward.

Parameters are counted tensor by tensor under the names Megatron-Core gives them, so the
``optimizer.freeze`` patterns select exactly what they select in training (tests compare the table
with a built model). Activations are the tensors autograd keeps per layer in the local
(non-Transformer-Engine) spec, counted from its code and checked against the tensors saved by a
real forward pass; Transformer Engine's fused layers save less (flash attention keeps no
sequence x sequence scores), so on GPUs the activation figure is an upper bound. Every rank of one
pipeline stage holds the same amounts (tensor and expert parallel shards are even), so the plan is
per stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from megatron.core.transformer.enums import AttnMaskType

from megalign.config import Config
from megalign.model.gpt import (
    ModelBuild,
    ffn_hidden_size,
    moe_ffn_hidden_size,
    teacher_dtype,
)

FP32, BF16, INT64 = 4, 2, 8
ITEMS = {  # key: what a reader sees
    "student_parameters": "student parameters",
    "gradients": "gradients (fp32 DDP buffer, trainable only)",
    "optimizer_states": "optimizer (Adam moments, fp32 main weights under bf16)",
    "teacher_parameters": "teacher parameters (net of shared frozen tensors)",
    "scorer_parameters": "causal scorer of generated samples",
    "activations": "activations of the micro-batches in flight",
    "teacher_states": "aligned teacher states held for the backward",
    "loss_workspace": "logits' softmax and gradient (last stage)",
    "score_buffer": "attention score buffer (local spec, kept between steps)",
    "attention_backward": "attention backward's score gradients (local spec, one layer)",
}


@dataclass
class StageMemory:
    """One pipeline stage's bytes per rank (every TP / DP rank of the stage holds the same)."""

    stage: int
    bytes: dict[str, int]
    parameters: int  # student elements on one rank
    trainable: int
    in_flight: int  # micro-batches (chunks' when interleaved) whose activations are held
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


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


def is_frozen(name: str, cfg: Config) -> bool:
    """Whether ``optimizer.freeze`` freezes ``name`` (a tied output layer goes with the embedding,
    as in ``megalign.training.trainer.freeze_parameters``)."""
    tied = ("embedding.word_embeddings.weight", "output_layer.weight")
    names = list(tied) if cfg.model.tie_embeddings and name in tied else [name]
    return any(re.search(pattern, n) for pattern in cfg.optimizer.freeze for n in names)


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


def in_flight(cfg: Config, stage: int, microbatches: int) -> int:
    """Chunk-micro-batches whose activations stage ``stage`` holds at its peak under 1F1B:
    Megatron-Core's warm-up forwards plus the steady state's one."""
    p = cfg.parallel
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    if pp == 1:
        return 1
    if vpp is None:
        return min(pp - stage, microbatches)
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, microbatches * vpp)


# ----------------------------------------------------------------------------- the plan


def plan(cfg: Config, vocab_size: int, world_size: int, gpu: bool) -> list[StageMemory]:
    """Bytes per rank for each pipeline stage of ``cfg`` on ``world_size`` ranks (``gpu``:
    Transformer Engine's attention, and the teacher's "auto" dtype is bf16)."""
    p, m = cfg.parallel, cfg.model
    dp = world_size // p.replica_size
    microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
    mixed = cfg.precision != "fp32"
    weight_bytes = BF16 if mixed else FP32
    teacher_bytes = FP32 if teacher_dtype(cfg.align, cfg.precision, gpu) == torch.float32 else BF16
    aligned = cfg.align.weight > 0
    positions, batch = student_build(cfg).streams * m.seq_length, cfg.data.micro_batch_size
    local = positions // p.context_parallel_size  # a context-parallel rank's share
    group = cfg.align.teacher_microbatches
    aligned_layers = set(range(m.num_layers + 1) if cfg.align.layers is None
                         else cfg.align.layers)  # zero-weight layers are recorded too
    vpp = p.virtual_pipeline_model_parallel_size or 1
    stages = []
    for stage in range(p.pipeline_model_parallel_size):
        chunks = [chunk_parameters(cfg, vocab_size, stage, c) for c in range(vpp)]
        table = [entry for chunk in chunks for entry in chunk]
        total = sum(n for _, n in table)
        frozen = sum(n for name, n in table if is_frozen(name, cfg))
        trainable = total - frozen
        per_parameter = FP32 * 3 if mixed else FP32 * 2
        optimizer = trainable * per_parameter
        if cfg.optimizer.distributed:  # experts' states shard over the ranks holding the same
            experts = sum(n for name, n in table  # experts (data parallel / expert parallel)
                          if ".experts." in name and not is_frozen(name, cfg))
            optimizer = ((trainable - experts) * per_parameter // dp
                         + experts * per_parameter // (dp // p.expert_model_parallel_size))
        bytes_ = {"student_parameters": total * weight_bytes, "gradients": trainable * FP32,
                  "optimizer_states": optimizer}
        notes = []
        if aligned:
            head = 0 if cfg.align.log_teacher_loss else sum(
                n for name, n in table if name == "output_layer.weight")
            shared = 0
            if cfg.align.share_frozen and teacher_bytes == weight_bytes:
                shared = sum(n for name, n in table
                             if is_frozen(name, cfg) and name != "output_layer.weight")
            elif cfg.align.share_frozen and frozen:
                notes.append("frozen tensors not shared: the teacher's dtype differs")
            bytes_["teacher_parameters"] = (total - head - shared) * teacher_bytes
        if cfg.evaluation.interval and cfg.evaluation.generation_samples:
            bytes_["scorer_parameters"] = total * weight_bytes
        held = in_flight(cfg, stage, microbatches)
        layers = len(chunk_layers(cfg, stage, 0))
        activation_bytes = weight_bytes  # bf16 activations under mixed precision
        kept, recomputing = chunk_activation_bytes(cfg, layers, positions, batch,
                                                   activation_bytes, flash=gpu)
        bytes_["activations"] = (held * (kept + attention_mask_bytes(cfg, positions, batch, gpu))
                                 + recomputing)
        if aligned:
            sp = p.tensor_model_parallel_size if p.sequence_parallel else 1
            per_state = local * batch * m.hidden_size // sp
            states = sum(1 for c in range(vpp) for i in aligned_layers
                         if i in stage_states(cfg, stage, c)) / vpp
            state_bytes = per_state * teacher_bytes + (2 * per_state * FP32 if mixed else 0)
            microbatches_held = held + group - 1
            bytes_["teacher_states"] = int(states * microbatches_held * state_bytes)
        if stage == p.pipeline_model_parallel_size - 1:
            logits = local * batch * vocab_size // p.tensor_model_parallel_size
            # the fp32 logits' softmax and its gradient (and the bf16 logits they came from)
            bytes_["loss_workspace"] = logits * (2 * FP32 + (weight_bytes if mixed else 0))
        if not gpu:  # Megatron-Core's global buffer for the local spec's attention scores
            heads = m.num_attention_heads // p.tensor_model_parallel_size
            student = batch * heads * local * positions * activation_bytes
            teacher = (group * batch * heads * m.seq_length ** 2 // p.context_parallel_size
                       * teacher_bytes if aligned else 0)
            bytes_["score_buffer"] = (max(student, teacher) if teacher_bytes == activation_bytes
                                      else student + teacher)
            # the backward of one layer's unfused attention holds two score-sized gradients at
            # once (of the probabilities, then of the scores through the softmax and the mask)
            bytes_["attention_backward"] = 2 * batch * heads * local * positions * FP32
        stages.append(StageMemory(stage, bytes_, total, trainable, held, notes))
    return stages


def stage_states(cfg: Config, stage: int, chunk: int) -> range:
    """Hidden-state indices (0 = embedding output, i + 1 = layer i's output) a chunk produces."""
    layers = chunk_layers(cfg, stage, chunk)
    first = 0 if stage == 0 and chunk == 0 else layers.start + 1
    return range(first, layers.stop + 1)


def describe(stages: list[StageMemory]) -> list[str]:
    """The plan as lines a user reads: per stage, each item and the total, in MiB."""
    lines = []
    for stage in stages:
        lines.append(f"stage {stage.stage}: {mib(stage.total)} per rank ({stage.parameters:,} "
                     f"student parameters, {stage.trainable:,} trainable; {stage.in_flight} "
                     "micro-batches in flight)")
        lines += [f"  {ITEMS[key]:<58} {mib(value):>12}" for key, value in stage.bytes.items()]
        lines += [f"  note: {note}" for note in stage.notes]
    return lines


def mib(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"
