"""The core attention of the local layer spec (what runs without Transformer Engine), with context
parallelism.

Why: Megatron-Core's own (``DotProductAttention``) refuses context parallelism; its CP attention is
Transformer Engine's, which needs a GPU. So without TE the sequence could never be split, and
nothing about CP could be tested on a CPU. This module is ``DotProductAttention`` (the same
arithmetic, which it calls) that, under CP, gathers the keys and values of the whole sequence over
the context-parallel group (Megatron-Core's sequence-parallel gather on that group: its backward
reduce-scatters, so each key's gradient reaches the rank that owns it) and attends this rank's
queries to them. It is exact for every mask: the rank's rows of the whole sequence's mask, which
the batch carries (``megalign.model.context_parallel``), or the causal rows it builds from the
positions this rank holds. It also takes packed documents (THD, Megatron-Core's
``PackedSeqParams``), which ``DotProductAttention`` refuses: the samples are laid out as
``DotProductAttention`` takes them and attend under their documents' mask, the same arithmetic as
the explicit-mask layout. Without CP or packing it is ``DotProductAttention`` unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megalign.model.attention import packed_mask
from megalign.model.context_parallel import natural_order, rank_positions


class ContextParallelAttention(DotProductAttention):
    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        cp_size = config.context_parallel_size
        # DotProductAttention refuses CP at construction only; its arithmetic does not depend on
        # it (the one config object stays shared with the rest of the model)
        config.context_parallel_size = 1
        try:
            super().__init__(config, layer_number, attn_mask_type, attention_type,
                             attention_dropout, softmax_scale, cp_comm_type, pg_collection)
        finally:
            config.context_parallel_size = cp_size
        self.cp_size = cp_size
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None

    def _group(self):
        return self.cp_group or parallel_state.get_context_parallel_group()

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params, attn_mask_type)
        if self.cp_size == 1:
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        group = self._group()
        order = natural_order(key.shape[0] * self.cp_size, self.cp_size, key.device)
        # [s/cp, b, g, d] of this rank -> [s, b, g, d] of the whole sequence, in order
        key, value = (gather_from_sequence_parallel_region(x, True, group=group)
                      .index_select(0, order) for x in (key, value))
        if attention_mask is None and self.attn_mask_type == AttnMaskType.causal:
            attention_mask = causal_rows(query.shape[0], self.cp_size, group.rank(),
                                         query.device)
        return super().forward(query, key, value, attention_mask, attn_mask_type,
                               attention_bias, packed_seq_params)


    def _packed(self, query, key, value, packed, attn_mask_type):
        """THD: [t, heads, d] of b samples of s positions, packed one after the other ->
        ``DotProductAttention`` on [s, b, heads, d] with the documents' mask -> [t, heads·d]."""
        if self.cp_size > 1:
            raise NotImplementedError("packed documents (THD) under context parallelism")
        length = packed.max_seqlen_q
        samples = query.shape[0] // length

        def unpacked(x):  # [t, g, d] -> [s, b, g, d]
            return x.view(samples, length, *x.shape[1:]).transpose(0, 1).contiguous()

        mask = _documents_mask(packed, causal=self.attn_mask_type == AttnMaskType.causal)
        context = super().forward(unpacked(query), unpacked(key), unpacked(value), mask,
                                  attn_mask_type)
        return context.transpose(0, 1).reshape(samples * length, -1)  # [s, b, h] -> [t, h]


_masks: dict = {}  # (id of the micro-batch's PackedSeqParams, causal) -> its mask


def _documents_mask(packed, causal: bool) -> torch.Tensor:
    """The mask of a THD micro-batch's documents, made once for all the layers that attend over
    it (as the explicit-mask layout hands every layer one mask), kept until the next batch."""
    key = (id(packed), causal)
    if key not in _masks:
        if not any(k[0] == id(packed) for k in _masks):
            _masks.clear()
        _masks[key] = (packed, packed_mask(packed, causal))  # (holding packed keeps its id)
    return _masks[key][1]


def causal_rows(local_length: int, cp_size: int, rank: int, device) -> torch.Tensor:
    """[1, 1, s/cp, s] causal mask (True = blocked) of the positions this rank holds."""
    length = local_length * cp_size
    rows = rank_positions(length, cp_size, rank, device)
    return (torch.arange(length, device=device).unsqueeze(0) > rows.unsqueeze(1))[None, None]
