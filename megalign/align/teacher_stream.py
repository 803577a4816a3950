"""Forward-only p2p of the teacher's residual stream between adjacent pipeline stages.

Design. Stage k's teacher layers need stage k-1's teacher output for the same micro-batches. The
student's activations travel through Megatron-Core's 1F1B communicator, which pairs every forward
tensor with a gradient in the backward direction. The teacher needs no gradient, so its stream
does *not* ride in that communicator: it has its own process group (same ranks as the pipeline
group). The teacher runs once per group of ``align.teacher_microbatches`` consecutive
micro-batches, in the forward step of the group's first micro-batch; there stage k-1 posts a
non-blocking ``isend`` of the group's output, and stage k does a blocking ``recv`` in its forward
step for the same micro-batch. Every stage runs its forward steps in micro-batch order in the
non-interleaved 1F1B schedule, so the two sides of each pair agree on the order; the separate
communicator keeps the teacher's messages out of the student's ordering; the send being
non-blocking and posted before the student's own send of the same micro-batch rules out a wait
cycle (stage k needs nothing from stage k-1 that the student's activation of that micro-batch does
not already wait for). Sends are completed (``wait``) once per training step. Under the
interleaved schedule every rank runs its forward steps in the same (chunk, micro-batch) sequence,
so a sender's chunk-c messages and the receiver's chunk-c (or, from the last rank to the first,
chunk-c+1) receives come in the same order as well.

Bytes per micro-batch across one stage boundary (h = hidden, s = sequence [/TP under SP], b =
micro-batch, e = element size): plain diffusion training moves s*b*h*e forward (activation) and
s*b*h*e backward (its gradient); REPR-ALIGN adds s*b*h*e_teacher forward only (as one [s, g*b, h]
message per group of g micro-batches), nothing backward, and no student or teacher hidden state of
any other layer: the ratio is 1.5 when the teacher runs in the student's dtype (bf16 teacher with
fp32 pipeline: 1.25). Only scalars (per-layer cosine sums) cross stages otherwise, once per step,
for logging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalign.platform import collectives


def _pipeline_group_of_this_rank():
    """A new process group with the ranks of this rank's pipeline group (all ranks call this)."""
    mine = sorted(dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()))
    gathered = collectives.all_gather_object(mine)
    layouts = sorted({tuple(ranks) for ranks in gathered})
    group, _ = dist.new_subgroups_by_enumeration([list(ranks) for ranks in layouts])
    return group


class TeacherStream:
    def __init__(self):
        self.group = _pipeline_group_of_this_rank()
        self.prev_rank = parallel_state.get_pipeline_model_parallel_prev_rank()
        self.next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
        self._pending: list = []
        self.bytes_sent = 0

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
        return collectives.recv(shape, dtype, self.prev_rank, self.group, device)

    def send(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous()
        self._pending.append(collectives.isend(tensor, self.next_rank, self.group))
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def wait(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()
