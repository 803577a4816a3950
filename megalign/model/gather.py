"""Full-shape (TP-gathered) tensors of a model stage, keyed by PP-independent global names.

Used to compare gradients and weights across parallel layouts. Tensor-parallel parameters carry
Megatron's ``tensor_model_parallel``/``partition_dim`` attributes. The gated MLP's ``linear_fc1``
holds [gate; up] per TP shard, so its shards are gathered half by half.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megalign.model.gpt import global_parameter_name
from megalign.platform import collectives


def _all_gather(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.cat(collectives.all_gather(
        tensor, group=parallel_state.get_tensor_model_parallel_group()), dim=dim)


def full_tensor(name: str, param: torch.nn.Parameter, local: torch.Tensor, gated: bool) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return local.detach().clone()
    dim = param.partition_dim
    if gated and "linear_fc1." in name:
        gate, up = torch.chunk(local, 2, dim=dim)
        return torch.cat([_all_gather(gate, dim), _all_gather(up, dim)], dim=dim)
    return _all_gather(local, dim)


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
            full = full_tensor(name, param, local, gated).float()
            tensors[global_parameter_name(name, chunk)] = full
    return tensors
