"""Teacher-logit distillation: KL(teacher ‖ student) of the next-token distributions, computed on
the vocabulary shards the tensor-parallel ranks hold, without gathering the vocabulary.

Per position, with z the logits over the whole vocabulary V (each TP rank holding V / TP of them),
p = softmax(z_teacher) and q = softmax(z_student): KL = Σ_V p · (log p − log q), where
log p = z − max − log Σ exp(z − max) and the max and the sum run over the shards (two all-reduces
per distribution), then Σ_V over the shards (one more). The student's cross-entropy comes from the
same log q (−log q at the target, which one shard holds), so the logits are read once and never
written: Megatron-Core's vocab-parallel cross-entropy works on its input in place, which the KL
could not read afterwards. The gradient with respect to the student's shard is
grad_ce · (q − onehot(target)) + grad_kl · (q − p); each rank keeps its shard of q and p for it,
as Megatron-Core's cross-entropy keeps its softmax. The teacher's logits are constants.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from torch.distributed import ReduceOp

from megalign.platform import collectives


def vocab_shard(rows: int):
    """(the first vocabulary row of this rank's ``rows``-row shard, the tensor-parallel group or
    None for one rank): the last two arguments of the functions below."""
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return 0, None
    return (parallel_state.get_tensor_model_parallel_rank() * rows,
            parallel_state.get_tensor_model_parallel_group())


def _log_softmax(logits: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the vocabulary whose shards the ranks of ``group`` hold (float32)."""
    logits = logits.float()
    peak = logits.max(dim=-1, keepdim=True).values
    if group is not None:
        collectives.all_reduce(peak, op=ReduceOp.MAX, group=group)
    shifted = logits - peak
    total = shifted.exp().sum(dim=-1, keepdim=True)
    if group is not None:
        collectives.all_reduce(total, group=group)
    return shifted - total.log()


def _at_target(values: torch.Tensor, labels: torch.Tensor, vocab_start: int, group):
    """(values at each position's target, which one shard holds, the target's index in this
    shard, whether this shard holds it)."""
    shard = values.shape[-1]
    local = labels - vocab_start
    inside = (local >= 0) & (local < shard)
    index = local.clamp(0, shard - 1)
    picked = values.gather(-1, index.unsqueeze(-1)).squeeze(-1) * inside
    if group is not None:
        collectives.all_reduce(picked, group=group)
    return picked, index, inside


class _CrossEntropyAndKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, vocab_start, group):
        log_q, log_p = _log_softmax(student, group), _log_softmax(teacher, group)
        p = log_p.exp()
        kl = (p * (log_p - log_q)).sum(dim=-1)
        if group is not None:
            collectives.all_reduce(kl, group=group)
        target, index, inside = _at_target(log_q, labels, vocab_start, group)
        ctx.save_for_backward(log_q.exp_(), p, index, inside)  # q, in place of log q
        ctx.dtype = student.dtype
        return -target, kl

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        q, p, index, inside = ctx.saved_tensors
        grad = q * (grad_ce + grad_kl).unsqueeze(-1) - p * grad_kl.unsqueeze(-1)
        grad.scatter_add_(-1, index.unsqueeze(-1), (-grad_ce * inside).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None


def cross_entropy_and_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         labels: torch.Tensor, vocab_start: int, group=None):
    """([...] the student's cross-entropy at ``labels``, [...] KL(teacher ‖ student)) per position
    from [..., V / TP] logit shards whose first row is ``vocab_start`` (``group``: the
    tensor-parallel group, None for one rank); differentiable in ``student_logits``."""
    return _CrossEntropyAndKL.apply(student_logits, teacher_logits.detach(), labels, vocab_start,
                                    group)


@torch.no_grad()
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                  group=None) -> torch.Tensor:
    """[...] the cross-entropy at ``labels`` from [..., V / TP] logit shards, leaving the logits
    as they are (the teacher's loss, logged; not differentiable)."""
    return -_at_target(_log_softmax(logits, group), labels, vocab_start, group)[0]
