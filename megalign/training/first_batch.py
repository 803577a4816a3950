"""The first micro-batch of a step, watched on every stage (``debug.dump_first_batch``): its
inputs, its diffusion loss and its per-layer alignment distances.

Why: the dump of a run's first micro-batch is how a refactor is checked to leave training bit
for bit unchanged; one observer holds it, so the step only reports to it.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from megalign.align.loss import alignment_loss
from megalign.diffusion.objective import DiffusionBatch
from megalign.distributed import device
from megalign.platform import collectives


class FirstMicrobatch:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.record: Optional[dict] = None

    def watches(self, batch: DiffusionBatch) -> bool:
        """``batch`` is the step's first micro-batch (on every model chunk that processes it);
        the first one seen starts the record."""
        if self.record is None:
            self.record = {
                "clean_tokens": batch.clean_tokens.cpu(),
                "input_tokens": batch.input_tokens.cpu(),
                "t": batch.t.cpu(),
                "supervised": batch.supervised.cpu(),
                "sample_indices": batch.sample_indices.cpu(),
                "layer_distance": torch.zeros(self.num_layers + 1, dtype=torch.float64,
                                              device=device()),
                "diffusion_loss": torch.zeros(1, dtype=torch.float64, device=device()),
            }
            return True
        return torch.equal(self.record["sample_indices"], batch.sample_indices.cpu())

    def distances(self, index: torch.Tensor, distances: torch.Tensor) -> None:
        """This stage's (1 - mean cos) of its aligned layers ``index``."""
        self.record["layer_distance"].index_copy_(0, index, distances)

    def diffusion_loss(self, value: torch.Tensor) -> None:
        self.record["diffusion_loss"] = value

    def dump(self, layer_weights: dict[int, float], align_weight: float, aligned: bool,
             loss_weighting: str, shift: bool) -> dict:
        """The record with the loss terms summed over the stages (collective: every rank)."""
        record = self.record
        values = torch.cat([record["diffusion_loss"], record["layer_distance"]])
        collectives.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        distances = values[1:].tolist()
        dump = {k: v for k, v in record.items() if k != "layer_distance"}
        dump["diffusion_loss"] = float(values[0])
        dump["align_cos"] = {i: 1.0 - distances[i] for i in layer_weights} if aligned else {}
        dump["align_loss"] = (alignment_loss(distances, layer_weights, align_weight)
                              if aligned else 0.0)
        dump["align_weight"] = align_weight
        dump["loss_weighting"] = loss_weighting
        dump["shift"] = shift
        return dump
