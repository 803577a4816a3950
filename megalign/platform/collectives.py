"""Every collective and point-to-point call megalign makes, on the device its group needs.

Why: gloo (CPU, and these tests) accepts tensors on any device, NCCL only CUDA tensors; a CPU
tensor handed to an NCCL collective fails at once on the first GPU run, and no CPU test can see
it. So megalign calls ``torch.distributed`` only through these helpers (``tests/test_layering.py``
checks the source), which move a tensor to the group's device when it is elsewhere and give the
result back on the caller's device, in place where the call is in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp


def group_device(group=None) -> torch.device:
    """The device collectives of ``group`` run on: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor if tensor.device == device else tensor.to(device)


def all_reduce(tensor: torch.Tensor, op=ReduceOp.SUM, group=None) -> torch.Tensor:
    """In place on ``tensor`` (which is also returned)."""
    work = _on(tensor, group_device(group))
    dist.all_reduce(work, op=op, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In place on ``tensor`` from global rank ``src`` (which is also returned)."""
    work = _on(tensor, group_device(group))
    dist.broadcast(work, src=src, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather(tensor: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape everywhere), in rank order, on ``tensor``'s device."""
    work = _on(tensor.contiguous(), group_device(group))
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, work, group=group)
    return [_on(part, tensor.device) for part in parts]


def all_gather_object(obj, group=None) -> list:
    """Every rank's picklable ``obj``, in rank order (torch moves the bytes to the group's
    device)."""
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def barrier(group=None) -> None:
    dist.barrier(group=group)


def recv(shape: tuple, dtype: torch.dtype, src: int, group=None,
         device: Optional[torch.device] = None) -> torch.Tensor:
    """A tensor from global rank ``src``, received on the group's device, returned on ``device``."""
    buffer = torch.empty(shape, dtype=dtype, device=group_device(group))
    dist.recv(buffer, src=src, group=group)
    return buffer if device is None else _on(buffer, device)


def isend(tensor: torch.Tensor, dst: int, group=None):
    """(work, the tensor being sent): keep the tensor alive until ``work.wait()``."""
    work_tensor = _on(tensor.contiguous(), group_device(group))
    return dist.isend(work_tensor, dst=dst, group=group), work_tensor
