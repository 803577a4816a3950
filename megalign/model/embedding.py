"""Initialisation of the mask token's embedding row.

The mask token lives in the padded vocabulary. ``mean`` sets its row to the mean of the real
vocabulary's rows (the reference leaves the unused row as it is, which starts training at a very
high loss). The word embedding is vocab-parallel, so the mean is reduced over the TP group. With
tied embeddings and pipeline parallelism the last stage holds a copy of the table as its output
layer, and the copy gets the same row so both stay equal.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megalign.platform import collectives


@torch.no_grad()
def _set_row_to_mean(weight: torch.Tensor, row: int, real_vocab: int) -> None:
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    rows = weight.shape[0]
    start = tp_rank * rows
    local_real = max(0, min(real_vocab - start, rows))
    total = weight[:local_real].float().sum(dim=0)
    collectives.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    if start <= row < start + rows:
        weight[row - start] = (total / real_vocab).to(weight.dtype)


def init_mask_token_embedding(model, mask_token_id: int, real_vocab: int) -> None:
    if model.pre_process:
        _set_row_to_mean(model.embedding.word_embeddings.weight, mask_token_id, real_vocab)
    if model.post_process and model.share_embeddings_and_output_weights and not model.pre_process:
        _set_row_to_mean(model.output_layer.weight, mask_token_id, real_vocab)
