"""Attention masks for packed documents (Megatron convention: boolean, True = blocked)."""

from __future__ import annotations

import torch


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] index of the packed document each position belongs to; an EOD ends its document."""
    ends = (tokens == eod).long()
    return torch.cumsum(ends, dim=1) - ends


def attention_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """[b, 1, s, s] mask keeping attention inside each document (and to the past if ``causal``)."""
    blocked = doc_ids.unsqueeze(2) != doc_ids.unsqueeze(1)
    if causal:
        s = doc_ids.shape[1]
        future = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).triu(1)
        blocked = blocked | future
    return blocked.unsqueeze(1)
