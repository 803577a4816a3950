"""Record the L+1 aligned hidden states of whatever part of a ``GPTModel`` lives on this stage.

Aligned state ``0`` is the embedding output, ``i`` (1 <= i < L) the residual stream after block
``i``, and ``L`` the final-norm output (block L's raw output is not aligned, as in the reference).
States are kept as produced ([s, b, h], sequence-sharded under sequence parallelism), so the
student's stay in its autograd graph. A recorder records from the start of its model's forward
until ``pop``: layers that activation recomputation runs again during the backward pass must not
replace the states (they would hold the recomputed activations alive).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


class HiddenStateRecorder:
    def __init__(self, model: GPTModel, wanted: set[int]):
        self.states: dict[int, torch.Tensor] = {}
        num_layers = model.config.num_layers
        self.indices: list[int] = []
        self._recording = False
        model.register_forward_pre_hook(self._start)
        if model.pre_process and 0 in wanted:
            self._hook(model.embedding, 0)
        for layer in model.decoder.layers:
            if layer.layer_number < num_layers and layer.layer_number in wanted:
                self._hook(layer, layer.layer_number)
        if model.decoder.final_layernorm is not None and num_layers in wanted:
            self._hook(model.decoder.final_layernorm, num_layers)
        self.indices.sort()

    def _hook(self, module: torch.nn.Module, index: int) -> None:
        def record(_module, _inputs, output):
            if self._recording:
                self.states[index] = output[0] if isinstance(output, tuple) else output

        module.register_forward_hook(record)
        self.indices.append(index)

    def _start(self, _module, _inputs) -> None:
        self._recording = True

    def pop(self) -> dict[int, torch.Tensor]:
        """This forward's states; records nothing more until the model's next forward."""
        self._recording = False
        states, self.states = self.states, {}
        return states
