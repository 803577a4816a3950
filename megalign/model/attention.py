"""Per-document attention for packed documents: an explicit mask (Megatron convention: boolean,
True = blocked) or Megatron-Core's ``PackedSeqParams`` (THD: the documents of a micro-batch one
after the other, their boundaries in ``cu_seqlens``)."""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


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


def packed_documents(doc_ids: torch.Tensor) -> PackedSeqParams:
    """The documents of a [b, s] micro-batch (``document_ids``) as THD: the b samples flattened one
    after the other, a document boundary wherever the document index changes and at every sample
    start. ``max_seqlen`` is the sample length s, a bound on every document (Transformer Engine
    takes a bound; no device-to-host copy)."""
    samples, length = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    flat = torch.nonzero(starts.flatten()).flatten()
    end = torch.tensor([samples * length], device=doc_ids.device)
    cu_seqlens = torch.cat([flat, end]).to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=length, max_seqlen_kv=length)


def packed_mask(packed: PackedSeqParams, causal: bool) -> torch.Tensor:
    """The [b, 1, s, s] mask of a THD micro-batch of samples of ``max_seqlen_q`` positions: what
    ``attention_mask`` gives for the documents ``packed`` describes."""
    cu_seqlens, length = packed.cu_seqlens_q, packed.max_seqlen_q
    total = int(cu_seqlens[-1])
    starts = torch.zeros(total, dtype=torch.long, device=cu_seqlens.device)
    starts[cu_seqlens[1:-1].long()] = 1
    return attention_mask(starts.cumsum(0).view(total // length, length), causal)


def concatenated(packs: list[PackedSeqParams]) -> PackedSeqParams:
    """THD micro-batches one after the other (the teacher's group of micro-batches)."""
    if len(packs) == 1:
        return packs[0]
    parts, offset = [packs[0].cu_seqlens_q], packs[0].cu_seqlens_q[-1]
    for pack in packs[1:]:
        parts.append(pack.cu_seqlens_q[1:] + offset)
        offset = offset + pack.cu_seqlens_q[-1]
    cu_seqlens = torch.cat(parts)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=packs[0].max_seqlen_q, max_seqlen_kv=packs[0].max_seqlen_kv)
