"""Forward-only full-vocabulary logits through any TP/PP layout.

Runs Megatron-Core's schedule with ``forward_only=True`` (pipeline stages exchange activations as
in training), gathers the vocab-parallel logits on the last stage and broadcasts them over the
pipeline group, so every rank can pick the same next tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func


@torch.no_grad()
def forward_logits(chunks: list, tokens: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask) -> torch.Tensor:
    """[b, s, vocab] float32 logits of the whole model for one batch, on every rank."""
    if len(chunks) != 1:
        raise ValueError("forward_logits needs one model chunk per rank (no virtual pipeline)")
    batch, seq = tokens.shape
    captured = {}

    def forward_step(_data_iterator, model):
        output = model(tokens, position_ids, attention_mask)

        def keep(logits):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            captured["logits"] = full.float().contiguous()
            return logits.new_zeros(()), {}

        return output, keep

    chunks[0].eval()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(()),
        model=chunks[0],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=batch,
        forward_only=True,
    )
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return captured["logits"]
    group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    logits = captured.get("logits")
    shape = torch.tensor(list(logits.shape) if logits is not None else [0, 0, 0])
    dist.broadcast(shape, src=last, group=group)
    if logits is None:
        logits = torch.empty(shape.tolist(), dtype=torch.float32, device=tokens.device)
    dist.broadcast(logits, src=last, group=group)
    return logits
