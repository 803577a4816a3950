"""Which positions of a sequence a context-parallel rank holds: Megatron-Core's load-balanced
layout.

The sequence is cut into ``2·cp`` chunks and rank ``r`` holds chunks ``r`` and ``2·cp − 1 − r``,
so that under a causal mask every rank has as many query-key pairs to compute (Megatron-Core's
``get_batch_on_this_cp_rank`` and the rotary embedding's ``get_pos_emb_on_this_cp_rank`` cut the
same way; a test checks the three agree).
"""

from __future__ import annotations

import torch


def rank_positions(length: int, cp_size: int, rank: int, device=None) -> torch.Tensor:
    """[length / cp] the positions of a ``length``-long sequence that rank ``rank`` holds."""
    if length % (2 * cp_size):
        raise ValueError(f"a sequence of {length} positions does not split into 2 x {cp_size} "
                         "context-parallel chunks")
    chunk = length // (2 * cp_size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = (2 * cp_size - 1 - rank) * chunk
    return torch.cat([first, torch.arange(last, last + chunk, device=device)])


def natural_order(length: int, cp_size: int, device=None) -> torch.Tensor:
    """The permutation that puts the ranks' parts, gathered in rank order, back in sequence
    order."""
    held = torch.cat([rank_positions(length, cp_size, r, device) for r in range(cp_size)])
    return torch.argsort(held)


def on_rank(tensor: torch.Tensor, dim: int, cp_size: int, rank: int) -> torch.Tensor:
    """The part of ``tensor`` (a sequence along ``dim``) that rank ``rank`` holds."""
    if cp_size == 1:
        return tensor
    positions = rank_positions(tensor.shape[dim], cp_size, rank, tensor.device)
    return tensor.index_select(dim, positions)
