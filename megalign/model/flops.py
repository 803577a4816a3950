"""Floating-point operations of a training step, counted the way Megatron-LM and the scaling-law
papers count them: 2 per multiply-add of every matrix product, the backward pass twice the
forward, attention's score and value products over the full sequence, norms and softmax left out.

Why: an aligned step runs the teacher's forward besides the student's forward and backward, so a
speed-up in steps is not one in compute; the FLOPs per step make the comparison independent of
the machine, beside the step time measured on it.
"""

from __future__ import annotations

from megalign.config import Config
from megalign.model.gpt import ffn_hidden_size, moe_ffn_hidden_size


def layer_matmul_parameters(cfg: Config) -> int:
    """Weights of one transformer layer's matrix products (QKV, output projection, MLP) that a
    token passes through: under a mixture of experts the router, its top k experts and the
    shared expert with its gate."""
    m = cfg.model
    h = m.hidden_size
    attention = m.num_attention_heads * m.kv_channels  # = hidden_size unless head_dim is set
    qkv = h * (attention + 2 * m.query_groups * m.kv_channels)
    if m.num_experts:
        widths = m.moe_topk * moe_ffn_hidden_size(m) + (m.moe_shared_expert_ffn_hidden_size or 0)
        mlp = 3 * h * widths + h * m.num_experts + (h if m.moe_shared_expert_gate else 0)
    else:
        mlp = (3 if m.arch == "llama" else 2) * h * ffn_hidden_size(m)
    return qkv + attention * h + mlp


def forward_flops_per_token(cfg: Config, vocab_size: int, positions: int,
                            lm_head: bool = True) -> int:
    """Forward FLOPs per input position of the model on sequences of ``positions``."""
    m = cfg.model
    attention = m.num_attention_heads * m.kv_channels
    layers = m.num_layers * (2 * layer_matmul_parameters(cfg) + 4 * positions * attention)
    return layers + (2 * m.hidden_size * vocab_size if lm_head else 0)


def step_flops(cfg: Config, vocab_size: int, aligned: bool, streams: int = 1,
               teacher_head: bool = False) -> int:
    """FLOPs of one optimizer step: the student's forward and backward over the global batch's
    positions (``streams`` = 2 under block diffusion and the hybrid objective) and, when
    ``aligned`` (the teacher runs), the frozen teacher's forward over the clean sequences, without
    its LM head unless ``teacher_head`` (distillation)."""
    sequences = cfg.data.global_batch_size
    seq = cfg.model.seq_length
    student = 3 * forward_flops_per_token(cfg, vocab_size, streams * seq) * streams * seq
    teacher = (forward_flops_per_token(cfg, vocab_size, seq, lm_head=teacher_head) * seq
               if aligned else 0)
    return sequences * (student + teacher)
