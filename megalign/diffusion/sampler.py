"""Denoising sampler for diffusion students: prompts + mask tokens, refined over S steps.

Per step, the model predicts every generated position at once (with the AR shift of training:
the logits at position ``i`` predict token ``i+1``); logits are tempered, then top-k / top-p
filtered, then sampled (or the arg-max at temperature 0). A *confidence* is attached to each
prediction: the sampled token's probability (``prob``), the top-1 minus top-2 probability
(``margin``) or the negative entropy (``entropy``). Unmasking rules:

* ``confidence``: commit the ``ceil(masked / steps_left)`` most confident predictions, so the
  number still masked falls linearly to zero; decoded tokens are final;
* ``origin``: each masked position is committed with probability ``1 / steps_left`` (the
  reverse process of the linear schedule, as MDLM's ancestral sampler);
* ``p2``: after step i of S keep ``ceil(N (i+1) / S)`` generated positions and re-mask the rest,
  choosing the lowest-confidence ones *including already decoded tokens*, so early choices can
  be revised.

Block-wise (semi-autoregressive) decoding splits the ``gen_length`` positions into blocks of
``block_length`` decoded left to right with ``steps / blocks`` steps each; only the current block
is ever unmasked. The defaults are what diffusion LMs are decoded with in practice: blocks of 8
(``default_block_length``) and one token per step (``steps = gen_length``). With ``eos_id`` a
sample stops once an EOS is decoded with nothing masked before it (later positions become EOS). Prompts of different lengths are left-padded and the padding is
kept out of attention. Randomness comes from one generator seeded by ``seed`` (sampling at
temperature > 0 is ``argmax(p / E)`` with ``E ~ Exp(1)`` per vocabulary entry, which is what
``torch.multinomial`` draws for one sample); every rank draws the same numbers and ends with the
same tokens, so any TP/PP layout gives the same output.

Faster decoding: ``threshold`` commits every masked position of the block whose confidence reaches
it (at least one per step); ``cache`` keeps the keys and values of the positions before the block
(``megalign.model.inference.CachedLogits``); ``suffix=False`` feeds the model the tokens up to the
current block's end only. ``attention="block_causal"`` is how a block-diffusion student decodes
(``for_model``): each position attends its own block and the earlier ones, so the cached keys and
values of finished blocks are exactly what a full recomputation gives.

Vocab-parallel logits are not gathered. ``logits_fn`` may return a ``VocabShard`` (this rank's
slice of the vocabulary on the last pipeline stage, ``megalign.model.inference.sampler_logits``);
only per-position scalars then cross the tensor-parallel group: the row maximum, the sum of
``exp`` (softmax normaliser), the arg-max (value, then lowest index), the chosen token's
probability, the entropy sum, the local top-2 probabilities for ``margin``, and for ``top_k`` the
local top-k values (k per rank) to find the k-th largest. These are exact: the same formulas as on
one rank, up to the order of floating-point sums (tested against one rank on identical logits for
every temperature / top-k / top-p / confidence / rule combination). Only ``top_p`` without
``top_k`` needs the whole sorted distribution, so it all-gathers the rows being decoded
([block positions, vocab], never [b, s, vocab]); with ``top_k`` it sorts just the gathered top-k
candidates (values and ids). The last stage then broadcasts each position's token and
confidences (3 numbers) over the pipeline. A real model's logits still differ in their last bits
between layouts (TP all-reduces), so a decision resting on a float near-tie can differ: e.g.
``entropy`` confidence on a barely trained model, whose entropies all sit near log(vocab).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from megalign.config import Config
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.objective import streams
from megalign.model.vocab_shard import VocabShard
from megalign.platform import collectives

CONFIDENCES = ("prob", "margin", "entropy")
RULES = ("confidence", "origin", "p2")


DEFAULT_BLOCK_LENGTH = 8


def default_block_length(gen_length: int) -> int:
    """Blocks of ``DEFAULT_BLOCK_LENGTH`` tokens when they tile the answer, else one block.

    Why: AR-initialised diffusion students keep a left-to-right bias; decoding short blocks left
    to right with about one token per step (as LLaDA, Dream and Fast-dLLM recommend) is what
    makes their samples readable, where decoding the whole answer jointly in few steps is not."""
    return DEFAULT_BLOCK_LENGTH if gen_length % DEFAULT_BLOCK_LENGTH == 0 else gen_length


@dataclass
class SamplerConfig:
    gen_length: int = 32
    steps: Optional[int] = None  # None: gen_length (one token committed per step)
    block_length: Optional[int] = None  # None: default_block_length(gen_length)
    temperature: float = 0.0  # 0: arg-max
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    confidence: str = "prob"
    unmasking: str = "confidence"
    eos_id: Optional[int] = None
    seed: int = 0
    # commit every masked position of the block whose confidence reaches this (at least one per
    # step), so a block takes as many steps as it needs; None: the step schedule above
    threshold: Optional[float] = None
    # keep the keys and values of the positions before the current block (prompt and finished
    # blocks) and recompute only the block and what follows it; refreshed when a block starts,
    # and every ``cache_refresh`` steps when > 0 (1: every step, exactly the uncached sampler)
    cache: bool = False
    cache_refresh: int = 0
    # the masked positions after the current block are part of the model's input; False: the
    # input ends where the current block ends (how block-diffusion models decode), so a step
    # computes the prefix and the block only, and with ``cache`` the block alone
    suffix: bool = True
    # with ``cache`` and ``suffix``, also keep the keys and values of the positions after the
    # current block (Fast-dLLM's dual cache): a step computes the block only (and, with the AR
    # shift, the position before it)
    dual_cache: bool = False
    # "block_causal": each position attends its own block and the earlier ones only (blocks of
    # ``block_length`` counted from the generation start), how a block-diffusion student is
    # trained (``for_model``); the cache is then exact
    attention: str = "bidirectional"

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = self.gen_length
        if self.block_length is None:
            self.block_length = default_block_length(self.gen_length)

    def check(self) -> None:
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence '{self.confidence}' is not one of {CONFIDENCES}")
        if self.unmasking not in RULES:
            raise ValueError(f"unmasking rule '{self.unmasking}' is not one of {RULES}")
        block = self.block_length
        if self.gen_length < 1 or block < 1 or self.gen_length % block:
            raise ValueError(f"block length {block} must divide gen length {self.gen_length}")
        blocks = self.gen_length // block
        if self.steps < blocks or self.steps % blocks:
            raise ValueError(f"steps ({self.steps}) must be a multiple of the {blocks} blocks")
        if self.threshold is not None and self.unmasking != "confidence":
            raise ValueError(f"a confidence threshold commits by confidence: it does not combine "
                             f"with the '{self.unmasking}' unmasking rule")
        if self.attention not in ("bidirectional", "block_causal"):
            raise ValueError(f"attention '{self.attention}' is not bidirectional or block_causal")
        if self.attention == "block_causal" and self.suffix:
            raise ValueError("block-causal decoding sees nothing after the current block: it "
                             "needs suffix=False")
        if self.dual_cache and not (self.cache and self.suffix):
            raise ValueError("the dual cache keeps the positions after the block: it needs the "
                             "cache and the suffix")
        if self.cache_refresh < 0:
            raise ValueError(f"cache refresh interval {self.cache_refresh} must be >= 0")


def for_model(cfg: Config, sampler: SamplerConfig) -> SamplerConfig:
    """``sampler`` as the model was trained: a block-diffusion student (``diffusion.block_length``)
    decodes its blocks left to right, block-causally, without the positions after the block."""
    if streams(cfg) == 1:
        return sampler
    return replace(sampler, block_length=cfg.diffusion.block_length, suffix=False,
                   attention="block_causal")


def _reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        collectives.all_reduce(x, op=op, group=group)
    return x


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """[n, k] per rank -> [n, k * ranks] (rank order)."""
    if group is None:
        return x
    return torch.cat(collectives.all_gather(x, group=group), dim=-1)


def _argmax(values: torch.Tensor, offset: int, group) -> torch.Tensor:
    """Global index of each row's maximum; the lowest index on ties, as ``torch.argmax``."""
    local = values.argmax(-1)
    best = values.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    top = _reduce(best.clone(), collectives.ReduceOp.MAX, group)
    none = torch.full_like(local, torch.iinfo(local.dtype).max)
    index = torch.where(best == top, local + offset, none)
    return _reduce(index, collectives.ReduceOp.MIN, group)


def _at(values: torch.Tensor, ids: torch.Tensor, offset: int, group) -> torch.Tensor:
    """``values[row, ids[row]]`` for global ids (the owning rank contributes, the others 0)."""
    local = ids - offset
    owned = (local >= 0) & (local < values.shape[-1])
    picked = values.gather(-1, local.clamp(0, values.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return _reduce(torch.where(owned, picked, torch.zeros_like(picked)), collectives.ReduceOp.SUM, group)


def _filtered(x: torch.Tensor, ids: torch.Tensor, cfg: "SamplerConfig", group) -> torch.Tensor:
    """Tempered logits [n, width] with top-k / top-p filtered entries at -inf."""
    x = x / cfg.temperature if cfg.temperature > 0 else x
    if not cfg.top_k and cfg.top_p >= 1.0:
        return x
    width = x.shape[-1]
    # candidates: each rank's top-k (top-p alone: every entry, i.e. the rows are gathered); an
    # entry tied with the k-th value beyond a rank's own k is kept by top-k but not a candidate
    values, local = x.topk(min(cfg.top_k, width) if cfg.top_k else width, dim=-1)
    values, candidates = _gather(values, group), _gather(ids[local], group)
    if cfg.top_k:
        kth = values.topk(min(cfg.top_k, values.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
        values = values.masked_fill(values < kth, float("-inf"))
    if cfg.top_p < 1.0:
        # sorted by value, ties by id, so the kept set does not depend on the layout
        by_id = candidates.argsort(-1)
        values, candidates = values.gather(-1, by_id), candidates.gather(-1, by_id)
        order = values.argsort(dim=-1, descending=True, stable=True)
        probs = values.gather(-1, order).softmax(-1)
        keep = probs.cumsum(-1) - probs <= cfg.top_p  # the smallest set reaching top_p
        kept = candidates.gather(-1, order) - int(ids[0])
        kept = torch.where(keep & (kept >= 0) & (kept < width), kept, torch.full_like(kept, width))
        mask = torch.zeros(x.shape[0], width + 1, dtype=torch.bool, device=x.device)
        x = x.masked_fill(~mask.scatter_(-1, kept, True)[:, :width], float("-inf"))
    return x


def _predict(shard: VocabShard, rows: slice, current: torch.Tensor, cfg: "SamplerConfig",
             generator, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of ``current`` [b, block]: the predicted token, its confidence, and the
    confidence of the current token (what p2 compares), all [b, block] on the CPU."""
    n = current.numel()
    noise = (torch.empty(n, vocab_size).exponential_(1, generator=generator)
             if cfg.temperature > 0 else None)  # drawn on every rank: the generator stays in step
    results = torch.zeros(3, n, dtype=torch.float64, device=shard.device)
    if shard.logits is not None:
        x = shard.logits[:, rows].float().reshape(n, -1)
        width, group, offset = x.shape[-1], shard.tp_group, shard.offset
        ids = torch.arange(offset, offset + width, device=x.device)
        x = _filtered(x.masked_fill(ids >= vocab_size, float("-inf")), ids, cfg, group)
        top = _reduce(x.max(-1).values, collectives.ReduceOp.MAX, group)
        weights = (x - top.unsqueeze(-1)).exp()
        probs = weights / _reduce(weights.sum(-1), collectives.ReduceOp.SUM, group).unsqueeze(-1)
        if noise is not None:
            draws = torch.ones(n, width)
            draws[:, : max(0, min(width, vocab_size - offset))] = noise[:, offset : offset + width]
            tokens = _argmax(probs / draws.to(x.device), offset, group)
        else:
            tokens = _argmax(probs, offset, group)
        if cfg.confidence == "prob":
            confidence = kept = _at(probs, tokens, offset, group)
            if cfg.unmasking == "p2":
                held = current.reshape(-1).to(x.device).clamp(max=vocab_size - 1)
                kept = _at(probs, held, offset, group)
        elif cfg.confidence == "margin":
            top2 = _gather(probs.topk(min(2, width), dim=-1).values, group).topk(2, dim=-1).values
            confidence = kept = top2[:, 0] - top2[:, 1]
        else:  # negative entropy
            confidence = kept = _reduce((probs * probs.clamp_min(1e-12).log()).sum(-1),
                                        collectives.ReduceOp.SUM, group)
        results = torch.stack([tokens.double(), confidence.double(), kept.double()])
    if shard.pp_group is not None:
        collectives.broadcast(results, src=shard.pp_src, group=shard.pp_group)
    results = results.cpu().view(3, *current.shape)
    return results[0].long(), results[1].float(), results[2].float()


def prepare(prompts: list[list[int]], cfg: SamplerConfig, mask_id: int, pad_id: int):
    """Left-padded [b, s] tokens, the index where generation starts, and a [b,1,s,s] mask."""
    longest = max(len(p) for p in prompts)
    start = longest
    length = longest + cfg.gen_length
    tokens = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), length), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) : longest] = torch.tensor(prompt, dtype=torch.long)
        valid[row, longest - len(prompt) :] = True
    tokens[:, start:] = mask_id
    blocked = ~valid.unsqueeze(1) | ~valid.unsqueeze(2)  # padding sees nothing and is not seen
    if cfg.attention == "block_causal":
        blocks = torch.div(torch.arange(length) - start, cfg.block_length, rounding_mode="floor")
        blocked |= blocks.unsqueeze(0) > blocks.unsqueeze(1)
    blocked &= ~torch.eye(length, dtype=torch.bool)  # (a padded row attends to itself only)
    return tokens, start, blocked.unsqueeze(1)


@torch.no_grad()
def sample(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prompts: list[list[int]],
    vocab: Vocabulary,
    shift: bool,
    cfg: SamplerConfig,
    trace: Optional[list] = None,
) -> list[list[int]]:
    """Generated ids per prompt. ``logits_fn(tokens, attention_mask)`` -> [b, s, >=vocab] logits
    or this rank's ``VocabShard``."""
    cfg.check()
    if shift and min(len(p) for p in prompts) == 0:
        raise ValueError("with the AR shift every prompt needs at least one token")
    tokens, start, mask = prepare(prompts, cfg, vocab.mask, vocab.pad)
    denoise(logits_fn, tokens, mask, start, cfg.gen_length, vocab, shift, cfg, trace)
    return [tokens[row, start:].tolist() for row in range(len(prompts))]


@torch.no_grad()
def denoise(logits_fn, tokens: torch.Tensor, attention_mask, start: int, length: int,
            vocab: Vocabulary, shift: bool, cfg: SamplerConfig,
            trace: Optional[list] = None) -> torch.Tensor:
    """Fill the masked span ``tokens[:, start:start+length]`` in place (blocks left to right);
    the tokens around it (prompt, or prefix and suffix for infilling) are never changed. With
    ``cfg.cache``, ``logits_fn(tokens, mask, first, refresh, stop)`` gives the logits of positions
    ``first..`` (``first..stop`` with the dual cache; ``megalign.model.inference.CachedLogits``);
    without ``cfg.suffix`` it sees the tokens up to the current block's end only."""
    mask_id, vocab_size = vocab.mask, vocab.size
    if not cfg.suffix and start + length < tokens.shape[1]:
        raise ValueError("decoding without the suffix drops everything after the current block: "
                         "it cannot fill a span with text after it (infilling)")
    generator = torch.Generator().manual_seed(cfg.seed)
    block = cfg.block_length
    steps_per_block = cfg.steps // (length // block)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for block_start in range(start, start + length, block):
        region = slice(block_start, block_start + block)
        rows = slice(block_start - 1, block_start + block - 1) if shift else region
        end = tokens.shape[1] if cfg.suffix else region.stop
        seen = tokens[:, :end]
        seen_mask = attention_mask[:, :, :end, :end] if attention_mask is not None else None
        step = 0
        while not done.all():
            if cfg.threshold is None and step == steps_per_block:
                break  # the step schedule
            if cfg.threshold is not None and not (tokens[~done][:, region] == mask_id).any():
                break  # as many steps as the block needs
            if cfg.cache:
                refresh = step == 0 or (cfg.cache_refresh > 0 and step % cfg.cache_refresh == 0)
                shard = logits_fn(seen, seen_mask, rows.start, refresh, region.stop)
            else:
                shard = logits_fn(seen, seen_mask)
            if not isinstance(shard, VocabShard):
                shard = VocabShard(shard)
            first = shard.first_position
            current = tokens[:, region]
            predicted, confidence, kept = _predict(
                shard, slice(rows.start - first, rows.stop - first), current, cfg, generator,
                vocab_size)
            masked = current == mask_id
            for row in range(tokens.shape[0]):
                if done[row]:
                    continue
                if cfg.threshold is not None:
                    current[row] = _commit_confident(current[row], masked[row], predicted[row],
                                                     confidence[row], cfg.threshold)
                else:
                    current[row] = _update(current[row], masked[row], predicted[row],
                                           confidence[row], kept[row], step, steps_per_block, cfg,
                                           mask_id, generator)
            step += 1
            if trace is not None:
                trace.append(tokens.clone())
            if cfg.eos_id is not None:
                done |= _finish_at_eos(tokens, start, mask_id, cfg.eos_id)
    return tokens


def _commit_confident(current, masked, predicted, confidence, threshold: float):
    """Every masked position whose confidence reaches ``threshold``; the most confident one when
    none does (Fast-dLLM's parallel decoding)."""
    positions = masked.nonzero().flatten()
    if positions.numel() == 0:
        return current
    chosen = positions[confidence[positions] >= threshold]
    if chosen.numel() == 0:
        chosen = positions[confidence[positions].argmax()].reshape(1)
    result = current.clone()
    result[chosen] = predicted[chosen]
    return result


def _update(current, masked, predicted, confidence, kept, step, steps, cfg, mask_id, generator):
    left = steps - step
    if cfg.unmasking == "p2":
        # decoded positions compete with their current token's confidence under this step's model
        candidate = torch.where(masked, predicted, current)
        score = torch.where(masked, confidence, kept)
        keep = -(-len(current) * (step + 1) // steps)
        order = score.argsort(descending=True)
        result = torch.full_like(current, mask_id)
        result[order[:keep]] = candidate[order[:keep]]
        return result
    positions = masked.nonzero().flatten()
    if positions.numel() == 0:
        return current
    if cfg.unmasking == "origin":
        chosen = positions[torch.rand(positions.numel(), generator=generator) < 1.0 / left]
        if left == 1:
            chosen = positions
    else:
        count = -(-positions.numel() // left)
        chosen = positions[confidence[positions].topk(count).indices]
    result = current.clone()
    result[chosen] = predicted[chosen]
    return result


def _finish_at_eos(tokens, start, mask_id, eos_id) -> torch.Tensor:
    """Rows with a decoded EOS and nothing masked before it; positions after it become EOS."""
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for row in range(tokens.shape[0]):
        generated = tokens[row, start:]
        eos = (generated == eos_id).nonzero().flatten()
        if eos.numel() and not (generated[: eos[0]] == mask_id).any():
            generated[eos[0]:] = eos_id
            finished[row] = True
    return finished


def until_eos(ids: list[int], eos_id: Optional[int]) -> list[int]:
    """``ids`` up to (without) the first ``eos_id``."""
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids
