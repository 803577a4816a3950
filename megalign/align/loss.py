"""Per-layer cosine alignment between student and teacher hidden states, on one pipeline stage.

``L_align = sum_l w_l * (1 - mean_{i in V} cos(h^S_l[i], h^T_l[i]))`` with the layer weights
``w`` normalised to sum to one over *all* aligned layers of the model, so the per-stage terms add
up to the full loss. ``V`` is the diffusion loss's supervised set. Under sequence parallelism a
rank holds a slice of the positions: its term is its partial sum divided by the *global* count, and
the partial terms add up over the TP group; under context parallelism likewise over the
context-parallel group (the count is summed over both; cosines stay per position and local).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from megalign.platform import collectives


@dataclass
class StageAlignment:
    loss: torch.Tensor  # this rank's share of sum_l w_l (1 - mean cos_l), differentiable
    layers: list[int]  # the aligned layers on this stage, ascending
    cos_sums: torch.Tensor  # [len(layers)] sum of cos over this rank's positions (detached)
    count: torch.Tensor  # |V| over the whole micro-batch (all TP ranks)


def supervised_positions(supervised: torch.Tensor, sequence_parallel: bool,
                         packed: bool = False) -> torch.Tensor:
    """[b, s] bool -> [s_local, b] in the layout of Megatron hidden states on this rank
    (``packed``: [b·s local, 1], the samples one after the other as THD lays them out)."""
    positions = supervised.reshape(-1, 1) if packed else supervised.transpose(0, 1)
    if sequence_parallel:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        chunk = positions.shape[0] // tp
        positions = positions[rank * chunk : (rank + 1) * chunk]
    return positions


def mirror_streams(states: dict[int, torch.Tensor],
                   sequence_parallel: bool) -> dict[int, torch.Tensor]:
    """The teacher's states [s, b, h] laid out like a two-stream student's [2s, b, h] (block
    diffusion): each position's state at its noisy and at its clean place, so position ``i`` of
    the noisy stream meets the teacher's position ``i``. Under sequence parallelism a rank's slice
    of the 2s positions is not its slice of the s teacher positions: the teacher's are gathered
    over the TP group (they carry no gradient) and this rank's slice is cut from the mirror."""
    if not sequence_parallel:
        return {index: torch.cat([state, state], dim=0) for index, state in states.items()}
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    mirrored = {}
    for index, state in states.items():
        full = torch.cat(collectives.all_gather(state.contiguous(), group=group), dim=0)
        chunk = 2 * state.shape[0]
        mirrored[index] = torch.cat([full, full], dim=0)[rank * chunk : (rank + 1) * chunk]
    return mirrored


def stage_alignment(
    student: dict[int, torch.Tensor],
    teacher: dict[int, torch.Tensor],
    supervised: torch.Tensor,
    layer_weights: dict[int, float],
    sequence_parallel: bool,
    context_group=None,
    packed: bool = False,
) -> StageAlignment:
    """``context_group``: the context-parallel group when the sequence is split over it;
    ``packed``: the states are a THD micro-batch's ([b·s, 1, h])."""
    positions = supervised_positions(supervised, sequence_parallel, packed)
    weight = positions.to(torch.float32)
    local_count = weight.sum()
    count = local_count.detach().clone()
    if sequence_parallel:
        collectives.all_reduce(count, group=parallel_state.get_tensor_model_parallel_group())
    if context_group is not None:
        collectives.all_reduce(count, group=context_group)
    denom = count.clamp(min=1.0)
    loss = torch.zeros((), dtype=torch.float32, device=weight.device)
    layers = sorted(student)
    cos_sums = []
    for index in layers:
        cos = F.cosine_similarity(student[index].float(), teacher[index].float(), dim=-1)  # [s, b]
        cos_sum = (cos * weight).sum()
        loss = loss + layer_weights[index] * (local_count - cos_sum) / denom
        cos_sums.append(cos_sum.detach())
    cos_sums = torch.stack(cos_sums) if cos_sums else weight.new_zeros(0)
    return StageAlignment(loss=loss, layers=layers, cos_sums=cos_sums, count=count)


def normalised_layer_weights(
    num_layers: int, layers: list[int] | None, weights: list[float] | None
) -> dict[int, float]:
    """Aligned index -> weight summing to one (default: all L+1 states, uniform)."""
    layers = list(range(num_layers + 1)) if layers is None else list(layers)
    weights = [1.0] * len(layers) if weights is None else [float(w) for w in weights]
    total = sum(weights)
    if total <= 0:
        raise ValueError("align.layer_weights must not all be zero")
    return {layer: w / total for layer, w in zip(layers, weights)}


def alignment_loss(distances: list, layer_weights: dict[int, float], weight: float) -> float:
    """λ · Σ_l w_l · (1 − mean cos)_l from the per-layer distances gathered from every stage:
    the logged alignment loss of a step or a micro-batch."""
    return weight * sum(w * distances[i] for i, w in layer_weights.items())
