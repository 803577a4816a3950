"""Record the L+1 aligned hidden states of whatever part of a ``GPTModel`` lives on this stage.

Aligned state ``0`` is the embedding output, ``i`` (1 <= i < L) the residual stream after block
``i``, and ``L`` the final-norm output (block L's raw output is not aligned, as in the reference).
States are kept as produced ([s, b, h], sequence-sharded under sequence parallelism), so the
student's stay in its autograd graph.

A recorder records only inside its scope, around the one forward whose states are wanted::

    with recorder.recording_scope() as states:
        output = model(...)

so a forward outside it (held-out evaluation, sampling) leaves nothing behind, and the layers that
activation recomputation runs again during the backward pass (after the scope closed) cannot
replace the states or hold the recomputed activations alive.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from megatron.core.models.gpt import GPTModel


class HiddenStateRecorder:
    def __init__(self, model: GPTModel, wanted: set[int]):
        num_layers = model.config.num_layers
        self.indices: list[int] = []
        self._states: Optional[dict[int, torch.Tensor]] = None  # the open scope's, else None
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
            if self._states is not None:
                self._states[index] = output[0] if isinstance(output, tuple) else output

        module.register_forward_hook(record)
        self.indices.append(index)

    @property
    def recording(self) -> bool:
        return self._states is not None

    @contextmanager
    def recording_scope(self) -> Iterator[dict[int, torch.Tensor]]:
        """The states of the forward run inside, by aligned index (filled as the layers run)."""
        self._states = states = {}
        try:
            yield states
        finally:
            self._states = None
