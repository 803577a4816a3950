"""What one rank holds of a batch's vocabulary-parallel logits (the sampler reduces over it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class VocabShard:
    """Logits of vocabulary entries ``[offset, offset + width)`` held by this rank.

    ``tp_group``: the ranks holding the other entries (None: this rank has them all). ``logits``
    is None on pipeline stages without the output layer; they receive each position's results
    from global rank ``pp_src`` over ``pp_group``."""

    logits: Optional[torch.Tensor]  # [b, s, width]
    offset: int = 0
    tp_group: Optional[object] = None
    pp_group: Optional[object] = None
    pp_src: int = 0
    device: torch.device = torch.device("cpu")
    first_position: int = 0  # logits row 0 is this position of the sequence (cached decoding)
