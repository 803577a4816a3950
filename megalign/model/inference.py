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
                        attention_mask, inference_context=None) -> Optional[torch.Tensor]:
    """[b, s, padded vocab / TP] float32 logits of this rank's vocabulary shard on the last
    pipeline stage; None on the other stages. ``inference_context``: Megatron-Core's key/value
    cache (see ``cached_sampler_logits``)."""
    if len(chunks) != 1:
        raise ValueError("forward_logits needs one model chunk per rank (no virtual pipeline)")
    batch, seq = tokens.shape
    captured = {}

    def forward_step(_data_iterator, model):
        # Megatron-Core's inference path gathers the vocabulary over TP itself
        output = model(tokens, position_ids, attention_mask, inference_context=inference_context,
                       runtime_gather_output=True if inference_context is not None else None)

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


def _positions(tokens: torch.Tensor, attention_mask) -> torch.Tensor:
    """Position ids; prompts left-padded by the sampler number their real tokens from 0, so a
    prompt gets the same positions alone or in a batch (learned absolute positions)."""
    if attention_mask is None:
        return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    real = ~attention_mask[:, 0, -1, :]
    return (real.long().cumsum(-1) - 1).clamp(min=0)


def _shard(logits: Optional[torch.Tensor], device, first_position: int = 0,
           gathered: bool = False) -> VocabShard:
    """This rank's logits as a ``VocabShard`` (``gathered``: the whole vocabulary on each rank)."""
    tp = 1 if gathered else parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    width = logits.shape[-1] if logits is not None else 0
    return VocabShard(
        logits,
        offset=0 if gathered else parallel_state.get_tensor_model_parallel_rank() * width,
        tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None,
        pp_group=parallel_state.get_pipeline_model_parallel_group() if pp > 1 else None,
        pp_src=parallel_state.get_pipeline_model_parallel_last_rank(),
        device=device,
        first_position=first_position,
    )


def sampler_logits(chunks: list, cache: bool = False):
    """``logits_fn(tokens, attention_mask)`` for the sampler: this rank's ``VocabShard``; with
    ``cache``, a ``CachedLogits`` (``SamplerConfig.cache``)."""
    if cache:
        return CachedLogits(chunks)

    def logits_fn(tokens, attention_mask) -> VocabShard:
        positions = _positions(tokens, attention_mask)
        return _shard(forward_vocab_shard(chunks, tokens, positions, attention_mask),
                      tokens.device)

    return logits_fn


class CachedLogits:
    """The sampler's logits with a key/value cache of the positions before ``start``.

    ``refresh=True`` runs the whole sequence and keeps every layer's keys and values (Megatron-
    Core's static inference context, on each rank for its layers and heads); ``refresh=False``
    runs only positions ``start..`` against the kept keys and values of the positions before
    them, which are not recomputed: an approximation for a bidirectional model (they were
    computed when the later positions held other tokens), exact when refreshed at every step.
    """

    def __init__(self, chunks: list):
        if len(chunks) != 1:
            raise ValueError("the cached sampler needs one model chunk per rank")
        self.chunks = chunks
        self.context = None

    def __call__(self, tokens, attention_mask, start: int = 0, refresh: bool = True) -> VocabShard:
        from megatron.core.inference.contexts import StaticInferenceContext

        batch, length = tokens.shape
        if refresh or self.context is None:
            self.context = StaticInferenceContext(batch, length)
            self.context.materialize_only_last_token_logits = False
            start = 0
        self.context.sequence_len_offset = start
        positions = _positions(tokens, attention_mask)[:, start:]
        mask = attention_mask[:, :, start:, :] if attention_mask is not None else None
        logits = forward_vocab_shard(self.chunks, tokens[:, start:].contiguous(), positions, mask,
                                     inference_context=self.context)
        return _shard(logits, tokens.device, first_position=start, gathered=True)


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
