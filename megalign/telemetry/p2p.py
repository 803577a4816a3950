"""Count point-to-point bytes a rank sends, split into forward (to the next pipeline stage) and
backward (to the previous one). Used by the alignment tests and ``bench/align_overhead.py``.

Every p2p send in torch goes through ``torch.distributed.isend``/``send`` (Megatron's batched ops
wrap ``isend`` in ``P2POp``), so wrapping those two functions sees them all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from megatron.core import parallel_state


@dataclass
class P2PCounts:
    forward_bytes: int = 0
    backward_bytes: int = 0
    forward_messages: int = 0
    backward_messages: int = 0
    sends: list = field(default_factory=list)  # (destination rank, shape, dtype, direction)


@contextlib.contextmanager
def count_p2p():
    counts = P2PCounts()
    next_rank = parallel_state.get_pipeline_model_parallel_next_rank()
    last_stage = parallel_state.is_pipeline_last_stage()
    originals = {name: getattr(c10d, name) for name in ("isend", "send")}
    inside: list = []

    def record(tensor, dst):
        forward = dst == next_rank and not last_stage
        nbytes = tensor.numel() * tensor.element_size()
        if forward:
            counts.forward_bytes += nbytes
            counts.forward_messages += 1
        else:
            counts.backward_bytes += nbytes
            counts.backward_messages += 1
        counts.sends.append((dst, tuple(tensor.shape), str(tensor.dtype),
                             "fwd" if forward else "bwd"))

    def wrap(name):
        original = originals[name]

        def counted(tensor, dst=None, group=None, tag=0, **kwargs):
            if inside:  # re-dispatched through a TorchFunctionMode: already counted
                return original(tensor, dst, group, tag, **kwargs)
            global_dst = dist.get_global_rank(group, kwargs["group_dst"]) if dst is None else dst
            record(tensor, global_dst)
            inside.append(True)
            try:
                return original(tensor, dst, group, tag, **kwargs)
            finally:
                inside.pop()

        return counted

    wrapped = {name: wrap(name) for name in originals}
    for name, function in wrapped.items():
        setattr(c10d, name, function)
        setattr(dist, name, function)
    try:
        yield counts
    finally:
        for name, function in originals.items():
            setattr(c10d, name, function)
            setattr(dist, name, function)
