"""What one rank holds of a batch's vocabulary-parallel logits (the sampler reduces over it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megalign.platform import collectives

_OPS = {"max": collectives.ReduceOp.MAX, "min": collectives.ReduceOp.MIN,
        "sum": collectives.ReduceOp.SUM}


@dataclass
class VocabShard:
    """Logits of vocabulary entries ``[offset, offset + width)`` held by this rank.

    ``tp_group``: the ranks holding the other entries (None: this rank has them all). ``logits``
    is None on pipeline stages without the output layer; they receive each position's results
    from global rank ``pp_src`` over ``pp_group``. The reductions are the ones
    ``megalign.diffusion.decoding.Logits`` declares, over these groups."""

    logits: Optional[torch.Tensor]  # [b, s, width]
    offset: int = 0
    tp_group: Optional[object] = None
    pp_group: Optional[object] = None
    pp_src: int = 0
    device: torch.device = torch.device("cpu")
    first_position: int = 0  # logits row 0 is this position of the sequence (cached decoding)

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        if self.tp_group is not None:
            collectives.all_reduce(x, op=_OPS[op], group=self.tp_group)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return x
        return torch.cat(collectives.all_gather(x, group=self.tp_group), dim=-1)

    def share(self, results: torch.Tensor) -> torch.Tensor:
        if self.pp_group is not None:
            collectives.broadcast(results, src=self.pp_src, group=self.pp_group)
        return results
