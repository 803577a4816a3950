"""Forward-only logits through any TP/PP layout.

Runs Megatron-Core's schedule with ``forward_only=True`` (pipeline stages exchange activations as
in training). ``forward_vocab_shard`` returns the last stage's vocab-parallel logits as they are;
``forward_logits`` gathers them over TP and broadcasts them over the pipeline group, so every rank
holds the full [b, s, vocab] (scoring, AR decoding); ``sampler_logits`` hands the shards to the
diffusion sampler, which reduces per-position scalars instead (see megalign/diffusion/sampler.py).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

from megalign.model.context_parallel import natural_order, on_rank
from megalign.model.vocab_shard import VocabShard
from megalign.platform import collectives


@torch.no_grad()
def forward_vocab_shard(chunks: list, tokens: torch.Tensor, position_ids: torch.Tensor,
                        attention_mask, inference_context=None,
                        packed=None) -> Optional[torch.Tensor]:
    """[b, s, padded vocab / TP] float32 logits of this rank's vocabulary shard on the last
    pipeline stage; None on the other stages. ``inference_context``: Megatron-Core's key/value
    cache (see ``cached_sampler_logits``); ``packed``: the documents of ``tokens`` [1, b·s] as
    THD."""
    if len(chunks) != 1:
        raise ValueError("forward_logits needs one model chunk per rank (no virtual pipeline)")
    batch, seq = tokens.shape
    captured = {}

    def forward_step(_data_iterator, model):
        # Megatron-Core's inference path gathers the vocabulary over TP itself
        output = model(tokens, position_ids, attention_mask, inference_context=inference_context,
                       runtime_gather_output=True if inference_context is not None else None,
                       packed_seq_params=packed)

        def keep(logits):
            captured["logits"] = logits.float().contiguous()
            return logits.new_zeros(()), {}

        return output, keep

    if any(module.training for module in chunks[0].modules()):
        chunks[0].eval()  # (setting it on every call walks the module tree: skipped when eval)
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(()),
        model=chunks[0],
        num_microbatches=1,
        seq_length=seq * parallel_state.get_context_parallel_world_size(),  # the whole sequence
        micro_batch_size=batch,
        forward_only=True,
    )
    return captured.get("logits")


@torch.no_grad()
def forward_logits(chunks: list, tokens: torch.Tensor, position_ids: torch.Tensor,
                   attention_mask, packed=None) -> torch.Tensor:
    """[b, s, vocab] float32 logits of the whole model for one batch, on every rank. Under
    context parallelism each rank runs its part of the sequence (its rows of the mask) and the
    parts are gathered back in order; ``packed``: the batch's documents as THD (the model takes
    the samples as one row)."""
    if packed is not None:
        logits = _forward_logits(chunks, tokens.reshape(1, -1), position_ids.reshape(1, -1),
                                 None, packed)
        return logits.view(*tokens.shape, -1)
    return _forward_logits(chunks, tokens, position_ids, attention_mask)


def _forward_logits(chunks: list, tokens: torch.Tensor, position_ids: torch.Tensor,
                    attention_mask, packed=None) -> torch.Tensor:
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        rank = parallel_state.get_context_parallel_rank()
        tokens, position_ids = (on_rank(x, 1, cp, rank) for x in (tokens, position_ids))
        if attention_mask is not None:
            attention_mask = on_rank(attention_mask, 2, cp, rank)
    logits = forward_vocab_shard(chunks, tokens, position_ids, attention_mask, packed=packed)
    if logits is not None:
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits).contiguous()
        if cp > 1:
            parts = collectives.all_gather(logits.transpose(0, 1),
                                           group=parallel_state.get_context_parallel_group())
            order = natural_order(tokens.shape[1] * cp, cp, logits.device)
            logits = torch.cat(parts).index_select(0, order).transpose(0, 1).contiguous()
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


def sampler_logits(chunks: list, cache: bool = False, dual: bool = False):
    """The sampler's ``LogitsSource`` (``megalign.diffusion.decoding``): this rank's
    ``VocabShard`` of the whole sequence; with ``cache``, a ``CachedLogits``
    (``SamplerConfig.cache`` and ``dual_cache``)."""
    if cache:
        return CachedLogits(chunks, dual)

    def logits_fn(tokens, attention_mask, _window=None) -> VocabShard:
        positions = _positions(tokens, attention_mask)
        return _shard(forward_vocab_shard(chunks, tokens, positions, attention_mask),
                      tokens.device)

    return logits_fn


def cache_layout(start: int, stop: int, length: int) -> torch.Tensor:
    """The position held by each cache slot: the positions before the window, those after it,
    then the window, so the window is the cache's last slots."""
    return torch.cat([torch.arange(start), torch.arange(stop, length), torch.arange(start, stop)])


@contextlib.contextmanager
def _rotary_in_slot_order(chunk: torch.nn.Module, layout: torch.Tensor):
    """Rotary angles by position, not by slot: Megatron-Core numbers a sequence's rotary positions
    by index (cache slot), so while the slots hold permuted positions each slot is given the
    angles of the position it holds. Learned absolute positions read ``position_ids`` instead."""
    model = get_attr_wrapped_model(chunk, "decoder", return_model_obj=True)  # the GPTModel
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        yield
        return
    if model.config.flash_decode:
        raise ValueError("the dual cache reorders rotary angles, which flash decoding "
                         "precomputes: turn flash_decode off")

    def by_position(_module, _args, angles):
        if angles.shape[0] != layout.numel():
            raise RuntimeError(f"rotary angles for {angles.shape[0]} slots, the cache holds "
                               f"{layout.numel()}")
        return angles[layout.to(angles.device)]

    handle = rotary.register_forward_hook(by_position)
    try:
        yield
    finally:
        handle.remove()


class CachedLogits:
    """The sampler's logits with a key/value cache of the positions outside a window.

    Called as the decoding rules' ``LogitsSource`` (``megalign.diffusion.decoding.Window``): a
    refreshing window runs the whole sequence and keeps every layer's keys and values (Megatron-
    Core's static inference context, on each rank for its layers and heads); otherwise it runs
    only the window against the kept keys and values of the other positions, which are not
    recomputed: an approximation for a bidirectional model (they were computed when the window
    held other tokens), exact when refreshed at every step. The window is ``start..`` to the end
    of the sequence, or with ``dual`` (Fast-dLLM's dual cache) ``start..stop``: the positions
    after it are cached too, and the cache holds them before the window (``cache_layout``) because
    Megatron-Core's cache attends the slots up to the window's end. Attention is order-free and
    each slot keeps its position's ids and rotary angles, so only the summation order changes.
    """

    def __init__(self, chunks: list, dual: bool = False):
        if len(chunks) != 1:
            raise ValueError("the cached sampler needs one model chunk per rank")
        self.chunks = chunks
        self.dual = dual
        self.context = None
        self.layout = None

    def __call__(self, tokens, attention_mask, window) -> VocabShard:
        """The logits of ``window.first..`` (``..window.stop`` with ``dual``); the whole sequence,
        kept in the cache, when ``window.refresh``."""
        batch, length = tokens.shape
        start = window.first
        stop = window.stop if self.dual else length
        layout = cache_layout(start, stop, length).to(tokens.device)
        if window.refresh or self.context is None:
            self.context = StaticInferenceContext(batch, length)
            self.context.materialize_only_last_token_logits = False
            self.layout = layout
            first = 0
        elif not torch.equal(layout, self.layout):
            raise ValueError(f"the cache holds another window than {start}..{stop}: refresh it")
        else:
            first = length - (stop - start)
        self.context.sequence_len_offset = first
        slots = layout[first:]
        positions = _positions(tokens, attention_mask)[:, slots]
        mask = (attention_mask[:, :, slots][:, :, :, layout]
                if attention_mask is not None else None)
        reordered = stop < length
        with (_rotary_in_slot_order(self.chunks[0], layout) if reordered
              else contextlib.nullcontext()):
            logits = forward_vocab_shard(self.chunks, tokens[:, slots].contiguous(), positions,
                                         mask, inference_context=self.context)
        if logits is not None and reordered:
            logits = logits[:, -(stop - start):]
        shown = start if reordered else first
        return _shard(logits, tokens.device, first_position=shown, gathered=True)


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
            tokens.append(int(torch.multinomial((row / temperature).softmax(-1), 1,
                                                generator=generator)))
        else:
            tokens.append(int(row.argmax()))
    return tokens[len(prompt):]
