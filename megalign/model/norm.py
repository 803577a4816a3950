"""The layer norms of the local (non-Transformer-Engine) spec, sequence parallelism included.

Megatron-Core's ``WrappedTorchNorm`` refuses sequence parallelism only because it does not mark
its parameters. Under SP every TP rank normalises its own slice of the positions, so a norm
weight's gradient on one rank is a partial sum; ``finalize_model_grads`` all-reduces it over the
TP group for parameters marked ``sequence_parallel``, as Transformer Engine's and apex's norms
are. With the mark, SP runs (and is tested) on CPU over gloo.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

_NORMS = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}


class TorchNorm:
    """``torch.nn.LayerNorm``/``RMSNorm`` per ``config.normalization`` (Megatron builds it with
    the arguments of its norm classes), parameters marked for SP gradient reduction."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        norm = _NORMS[config.normalization](hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
