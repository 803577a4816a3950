"""Forward-only logits through any TP/PP layout.

Runs Megatron-Core's schedule with ``forward_only=True`` (pipeline stages exchange activations as
in training). ``forward_vocab_shard`` returns the last stage's vocab-parallel logits as they are;
``forward_logits`` gathers them over TP and broadcasts them over the pipeline group, so every rank
holds the full [b, s, vocab] (scoring, AR decoding); ``sampler_logits`` hands the shards to the
diffusion sampler, which reduces per-position scalars instead (see megalign/diffusion/sampler.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megalign.model.vocab_shard import VocabShard
from megalign.platform import collectives


@torch.no_grad()
def forward_vocab_shard(chunks: list, tokens: torch.Tensor, position_ids: torch.Tensor,
                        attention_mask) -> Optional[torch.Tensor]:
    """[b, s, padded vocab / TP] float32 logits of this rank's vocabulary shard on the last
    pipeline stage; None on the other stages."""
    if len(chunks) != 1:
        raise ValueError("forward_logits needs one model chunk per rank (no virtual pipeline)")
    batch, seq = tokens.shape
    captured = {}

    def forward_step(_data_iterator, model):
        output = model(tokens, position_ids, attention_mask)

        def keep(logits):
            captured["logits"] = logits.float().contiguous()
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
    return captured.get("logits")


@torch.no_grad()
def forward_logits(chunks: list, tokens: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask) -> torch.Tensor:
    """[b, s, vocab] float32 logits of the whole model for one batch, on every rank."""
    logits = forward_vocab_shard(chunks, tokens, position_ids, attention_mask)
    if logits is not None:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits).contiguous()
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return logits
    group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    shape = torch.tensor(list(logits.shape) if logits is not None else [0, 0, 0])
    collectives.broadcast(shape, src=last, group=group)
    if logits is None:
        logits = torch.empty(shape.tolist(), dtype=torch.float32, device=tokens.device)
    return collectives.broadcast(logits, src=last, group=group)


def sampler_logits(chunks: list):
    """``logits_fn(tokens, attention_mask)`` for the sampler: this rank's ``VocabShard``."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()

    def logits_fn(tokens, attention_mask) -> VocabShard:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        if attention_mask is not None:
            # prompts left-padded by the sampler: number each row's real tokens from 0, so a
            # prompt gets the same positions alone or in a batch (learned absolute positions)
            real = ~attention_mask[:, 0, -1, :]
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        logits = forward_vocab_shard(chunks, tokens, positions, attention_mask)
        width = logits.shape[-1] if logits is not None else 0
        return VocabShard(
            logits,
            offset=parallel_state.get_tensor_model_parallel_rank() * width,
            tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None,
            pp_group=parallel_state.get_pipeline_model_parallel_group() if pp > 1 else None,
            pp_src=parallel_state.get_pipeline_model_parallel_last_rank(),
            device=tokens.device,
        )

    return logits_fn


def ar_decode(chunks, prompt: list[int], length: int, vocab: int, temperature: float,
              seed: int) -> list[int]:
    """Left-to-right decoding with a causal model (the full sequence is recomputed each token)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    for _ in range(length):
        x = torch.tensor([tokens])
        logits = forward_logits(chunks, x, torch.arange(len(tokens)).unsqueeze(0), None)
        row = logits[0, -1, :vocab].cpu()
        if temperature > 0:
            tokens.append(int(torch.multinomial((row / temperature).softmax(-1), 1, generator=generator)))
        else:
            tokens.append(int(row.argmax()))
    return tokens[len(prompt):]
