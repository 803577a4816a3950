"""What a mixture-of-experts student's routers did in a training step: the load-balancing loss
per layer and how evenly each layer's experts were loaded.

Megatron-Core records each MoE layer's auxiliary loss (divided by its coefficient) in a
module-level tracker as its router runs in training with gradients (the frozen teacher, under
``no_grad``, records nothing); it reduces the tracker with an averaging all-reduce that gloo lacks,
so megalign reduces it itself. Expert load is counted by forward hooks on the student's routers.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megalign.platform import collectives

TRACKED = "load_balancing_loss"  # Megatron-Core's name for the Switch auxiliary loss


def aux_loss_per_layer(num_microbatches: int, coefficient: float) -> Optional[list[float]]:
    """Each layer's load-balancing loss as added to the step's loss (coefficient included, mean
    over micro-batches and data-parallel ranks); None when no MoE layer recorded one. Every rank
    must call this; the tracker is cleared for the next step."""
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if TRACKED not in tracker:
        return None
    values = tracker[TRACKED]["values"].detach().clone().double()
    tracker[TRACKED]["values"].zero_()
    # layers live on one stage each; under sequence and context parallelism each TP and CP
    # rank holds its positions' share of a layer's loss; data-parallel ranks (experts' included)
    # are averaged
    for group in (parallel_state.get_pipeline_model_parallel_group(),
                  parallel_state.get_tensor_model_parallel_group(),
                  parallel_state.get_context_parallel_group(),
                  parallel_state.get_data_parallel_group()):
        collectives.all_reduce(values, group=group)
    values = values.cpu() / (parallel_state.get_data_parallel_world_size() * num_microbatches)
    return (values * coefficient).tolist()


class ExpertLoad:
    """Tokens routed to each expert of each layer by the student's routers (training only)."""

    def __init__(self, chunks: list, num_layers: int, num_experts: int):
        self.shape = (num_layers, num_experts)
        self.counts: Optional[torch.Tensor] = None  # on the routers' device: no sync per layer
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router: TopKRouter, _inputs, output) -> None:
        if router.training and torch.is_grad_enabled():
            _probs, routing_map = output
            if self.counts is None:
                self.counts = torch.zeros(self.shape, dtype=torch.float64,
                                          device=routing_map.device)
            self.counts[router.layer_number - 1] += routing_map.sum(0).double()

    def imbalance(self) -> list[float]:
        """Per layer, the busiest expert's tokens over the mean (1 = perfectly even), over every
        rank since the last call. Every rank must call this."""
        counts = (torch.zeros(self.shape, dtype=torch.float64) if self.counts is None
                  else self.counts)
        counts = collectives.all_reduce(counts.clone()).cpu()
        self.counts = None
        mean = counts.mean(-1).clamp(min=1e-12)
        return (counts.max(-1).values / mean).tolist()
