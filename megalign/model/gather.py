"""Full-shape (TP-gathered) tensors of a model stage, keyed by PP-independent global names.

Used to compare gradients and weights across parallel layouts. Tensor-parallel parameters carry
Megatron's ``tensor_model_parallel``/``partition_dim`` attributes. The gated MLP's ``linear_fc1``
holds [gate; up] per TP shard, so its shards are gathered half by half. Experts are gathered over
their expert-tensor-parallel group, then over the expert-parallel group, whose rank r holds the
experts r * E/EP .. (r + 1) * E/EP - 1 under local indices 0 .. E/EP - 1.
"""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state

from megalign.model.gpt import global_parameter_name
from megalign.platform import collectives

_EXPERT = re.compile(r"(\.local_experts\.)(\d+)\.")


def _all_gather(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    return torch.cat(collectives.all_gather(tensor, group=group), dim=dim)


def full_tensor(name: str, param: torch.nn.Parameter, local: torch.Tensor, gated: bool,
                expert: bool = False) -> torch.Tensor:
    group = (parallel_state.get_expert_tensor_parallel_group() if expert
             else parallel_state.get_tensor_model_parallel_group())
    if not getattr(param, "tensor_model_parallel", False) or _size(group) == 1:
        return local.detach().clone()
    dim = param.partition_dim
    if gated and "linear_fc1." in name:
        gate, up = torch.chunk(local, 2, dim=dim)
        return torch.cat([_all_gather(gate, dim, group), _all_gather(up, dim, group)], dim=dim)
    return _all_gather(local, dim, group)


def _size(group) -> int:
    return torch.distributed.get_world_size(group)


def _experts_over_ranks(name: str, match: re.Match, full: torch.Tensor, experts: int) -> dict:
    """An expert's tensor (``match``: its local index in ``name``) on every expert-parallel
    rank, under its global expert index."""
    group = parallel_state.get_expert_model_parallel_group()
    local, per_rank = int(match.group(2)), experts // _size(group)
    parts = collectives.all_gather(full, group=group) if _size(group) > 1 else [full]
    return {name[: match.start(2)] + str(rank * per_rank + local) + name[match.end(2):]: part
            for rank, part in enumerate(parts)}


def full_tensors(chunks: list, kind: str) -> dict[str, torch.Tensor]:
    """``kind``: "param" (weights) or "grad" (Megatron DDP ``main_grad``; frozen parameters have
    none); every TP rank of the stage must call this."""
    tensors = {}
    for chunk in chunks:
        gated = chunk.config.gated_linear_unit
        for name, param in chunk.named_parameters():
            local = param.detach() if kind == "param" else getattr(param, "main_grad", None)
            if local is None:
                continue
            name = global_parameter_name(name, chunk)
            expert = _EXPERT.search(name)
            full = full_tensor(name, param, local, gated, expert is not None).float()
            if expert:
                tensors.update(_experts_over_ranks(name, expert, full,
                                                   chunk.config.num_moe_experts))
            else:
                tensors[name] = full
    return tensors
