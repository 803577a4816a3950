"""The decoding rules of a masked diffusion LM: prompts + mask tokens, refined over S steps.

This module imports torch and nothing else, because it exists twice on purpose: megalign's
sampler (``megalign/diffusion/sampler.py``) imports it, and ``megalign-convert --to hf`` copies it
beside ``modeling_megalign.py`` (transformers loads it as the modeling file's sibling), so an
exported model decodes by the same rules without megalign.

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
sample stops once an EOS is decoded with nothing masked before it (later positions become EOS).
Prompts of different lengths are left-padded and the padding is kept out of attention.
Randomness comes from one generator seeded by ``seed`` (sampling at temperature > 0 is
``argmax(p / E)`` with ``E ~ Exp(1)`` per vocabulary entry, which is what ``torch.multinomial``
draws for one sample); every rank draws the same numbers and ends with the same tokens.

Faster decoding: ``threshold`` commits every masked position of the block whose confidence reaches
it (at least one per step); ``cache`` keeps the keys and values of the positions before the block;
``suffix=False`` feeds the model the tokens up to the current block's end only; ``dual_cache``
keeps the positions after the block too (Fast-dLLM). ``attention="block_causal"`` is how a
block-diffusion student decodes (``for_block_diffusion``): each position attends its own block and
the earlier ones, so the cached keys and values of finished blocks are exactly what a full
recomputation gives.

Logits come from a ``LogitsSource``, called ``source(tokens, attention_mask, window)`` for every
way of producing them (whole model, key/value-cached, dual-cached, exported); ``window`` says
which positions the step needs and whether a cache must be refreshed, and a source without a
cache ignores it. A source returns the logits as a tensor or as a ``Logits`` holding part of the
vocabulary: the rules below reduce per-position scalars over the ranks that hold the rest
(``Logits.reduce`` / ``gather`` / ``share``), so vocabulary-parallel logits are never gathered
whole. Only ``top_p`` without ``top_k`` needs each decoded row's whole distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, Protocol, Union, get_args

import torch

Confidence = Literal["prob", "margin", "entropy"]
Unmasking = Literal["confidence", "origin", "p2"]
Attention = Literal["bidirectional", "block_causal"]
CONFIDENCES, RULES, ATTENTIONS = get_args(Confidence), get_args(Unmasking), get_args(Attention)
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
    confidence: Confidence = "prob"
    unmasking: Unmasking = "confidence"
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
    # trained (``for_block_diffusion``); the cache is then exact
    attention: Attention = "bidirectional"
    # the model's AR shift (``diffusion.shift``): position i predicts token i + 1, so a generated
    # position reads the logits of the one before it; a property of the trained model
    shift: bool = True

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
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention '{self.attention}' is not one of {ATTENTIONS}")
        if self.attention == "block_causal" and self.suffix:
            raise ValueError("block-causal decoding sees nothing after the current block: it "
                             "needs suffix=False")
        if self.dual_cache and not (self.cache and self.suffix):
            raise ValueError("the dual cache keeps the positions after the block: it needs the "
                             "cache and the suffix")
        if self.cache_refresh < 0:
            raise ValueError(f"cache refresh interval {self.cache_refresh} must be >= 0")


def for_block_diffusion(sampler: SamplerConfig, block_length: int) -> SamplerConfig:
    """``sampler`` as a block-diffusion student trained with blocks of ``block_length`` decodes:
    its blocks left to right, block-causally, without the positions after the block."""
    return replace(sampler, block_length=block_length, suffix=False, attention="block_causal")


@dataclass(frozen=True)
class Window:
    """What one step needs of a source: the logits of positions ``first..stop`` (a source may
    return more), and whether a cache kept since the last refresh may still be used."""

    first: int
    stop: int
    refresh: bool


class Logits:
    """Logits [b, s, width] of vocabulary entries ``offset..offset + width`` whose row 0 is
    position ``first_position`` of the sequence. This base holds the whole vocabulary; a
    vocabulary-parallel holder overrides the three reductions over the ranks holding the rest
    (``logits`` may then be None on ranks that receive the results through ``share``)."""

    def __init__(self, logits: Optional[torch.Tensor], first_position: int = 0, offset: int = 0):
        self.logits = logits
        self.first_position = first_position
        self.offset = offset

    @property
    def device(self) -> torch.device:
        return self.logits.device

    def reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """``op`` ("max", "min" or "sum") of ``x`` over the ranks holding the vocabulary."""
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[n, k] per rank -> [n, k * ranks] (rank order)."""
        return x

    def share(self, results: torch.Tensor) -> torch.Tensor:
        """The results of the ranks holding logits, on every rank."""
        return results


class LogitsSource(Protocol):
    def __call__(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 window: Window) -> Union[torch.Tensor, Logits]: ...


def _argmax(values: torch.Tensor, offset: int, held: Logits) -> torch.Tensor:
    """Global index of each row's maximum; the lowest index on ties, as ``torch.argmax``."""
    local = values.argmax(-1)
    best = values.gather(-1, local.unsqueeze(-1)).squeeze(-1)
    top = held.reduce(best.clone(), "max")
    none = torch.full_like(local, torch.iinfo(local.dtype).max)
    return held.reduce(torch.where(best == top, local + offset, none), "min")


def _at(values: torch.Tensor, ids: torch.Tensor, offset: int, held: Logits) -> torch.Tensor:
    """``values[row, ids[row]]`` for global ids (the owning rank contributes, the others 0)."""
    local = ids - offset
    owned = (local >= 0) & (local < values.shape[-1])
    picked = values.gather(-1, local.clamp(0, values.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return held.reduce(torch.where(owned, picked, torch.zeros_like(picked)), "sum")


def _filtered(x: torch.Tensor, ids: torch.Tensor, cfg: SamplerConfig, held: Logits):
    """Tempered logits [n, width] with top-k / top-p filtered entries at -inf."""
    x = x / cfg.temperature if cfg.temperature > 0 else x
    if not cfg.top_k and cfg.top_p >= 1.0:
        return x
    width = x.shape[-1]
    # candidates: each rank's top-k (top-p alone: every entry, i.e. the rows are gathered); an
    # entry tied with the k-th value beyond a rank's own k is kept by top-k but not a candidate
    values, local = x.topk(min(cfg.top_k, width) if cfg.top_k else width, dim=-1)
    values, candidates = held.gather(values), held.gather(ids[local])
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


def predict(held: Logits, rows: slice, current: torch.Tensor, cfg: SamplerConfig, generator,
            vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of ``current`` [b, block] (logits rows ``rows``): the predicted token, its
    confidence, and the confidence of the current token (what p2 compares), [b, block] on CPU."""
    n = current.numel()
    noise = (torch.empty(n, vocab_size).exponential_(1, generator=generator)
             if cfg.temperature > 0 else None)  # drawn on every rank: the generator stays in step
    results = torch.zeros(3, n, dtype=torch.float64, device=held.device)
    if held.logits is not None:
        x = held.logits[:, rows].float().reshape(n, -1)
        width, offset = x.shape[-1], held.offset
        ids = torch.arange(offset, offset + width, device=x.device)
        x = _filtered(x.masked_fill(ids >= vocab_size, float("-inf")), ids, cfg, held)
        top = held.reduce(x.max(-1).values, "max")
        weights = (x - top.unsqueeze(-1)).exp()
        probs = weights / held.reduce(weights.sum(-1), "sum").unsqueeze(-1)
        if noise is not None:
            draws = torch.ones(n, width)
            draws[:, : max(0, min(width, vocab_size - offset))] = noise[:, offset : offset + width]
            tokens = _argmax(probs / draws.to(x.device), offset, held)
        else:
            tokens = _argmax(probs, offset, held)
        if cfg.confidence == "prob":
            confidence = kept = _at(probs, tokens, offset, held)
            if cfg.unmasking == "p2":
                current_ids = current.reshape(-1).to(x.device).clamp(max=vocab_size - 1)
                kept = _at(probs, current_ids, offset, held)
        elif cfg.confidence == "margin":
            top2 = held.gather(probs.topk(min(2, width), dim=-1).values).topk(2, dim=-1).values
            confidence = kept = top2[:, 0] - top2[:, 1]
        else:  # negative entropy
            confidence = kept = held.reduce((probs * probs.clamp_min(1e-12).log()).sum(-1), "sum")
        results = torch.stack([tokens.double(), confidence.double(), kept.double()])
    results = held.share(results).cpu().view(3, *current.shape)
    return results[0].long(), results[1].float(), results[2].float()


def prepare(prompts: list[list[int]], cfg: SamplerConfig, mask_id: int, pad_id: int):
    """Left-padded [b, s] tokens, the index where generation starts, and a [b,1,s,s] mask
    (True = blocked)."""
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
def sample(source: LogitsSource, prompts: list[list[int]], cfg: SamplerConfig, *, mask_id: int,
           pad_id: int, vocab_size: int, trace: Optional[list] = None) -> list[list[int]]:
    """Generated ids per prompt (``vocab_size``: the tokens that may be sampled)."""
    cfg.check()
    if cfg.shift and min(len(p) for p in prompts) == 0:
        raise ValueError("with the AR shift every prompt needs at least one token")
    tokens, start, mask = prepare(prompts, cfg, mask_id, pad_id)
    denoise(source, tokens, mask, start, cfg, mask_id=mask_id, vocab_size=vocab_size, trace=trace)
    return [tokens[row, start:].tolist() for row in range(len(prompts))]


@torch.no_grad()
def denoise(source: LogitsSource, tokens: torch.Tensor, attention_mask, start: int,
            cfg: SamplerConfig, *, mask_id: int, vocab_size: int,
            trace: Optional[list] = None) -> torch.Tensor:
    """Fill the masked span ``tokens[:, start:start + cfg.gen_length]`` (CPU) in place, blocks
    left to right; the tokens around it (prompt, or prefix and suffix for infilling) are never
    changed. Without ``cfg.suffix`` the source sees the tokens up to the current block's end."""
    length = cfg.gen_length
    if not cfg.suffix and start + length < tokens.shape[1]:
        raise ValueError("decoding without the suffix drops everything after the current block: "
                         "it cannot fill a span with text after it (infilling)")
    generator = torch.Generator().manual_seed(cfg.seed)
    block = cfg.block_length
    steps_per_block = cfg.steps // (length // block)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for block_start in range(start, start + length, block):
        region = slice(block_start, block_start + block)
        rows = slice(block_start - 1, block_start + block - 1) if cfg.shift else region
        end = tokens.shape[1] if cfg.suffix else region.stop
        seen = tokens[:, :end]
        seen_mask = attention_mask[:, :, :end, :end] if attention_mask is not None else None
        step = 0
        while not done.all():
            if cfg.threshold is None and step == steps_per_block:
                break  # the step schedule
            if cfg.threshold is not None and not (tokens[~done][:, region] == mask_id).any():
                break  # as many steps as the block needs
            refresh = (not cfg.cache or step == 0
                       or (cfg.cache_refresh > 0 and step % cfg.cache_refresh == 0))
            held = source(seen, seen_mask, Window(rows.start, region.stop, refresh))
            if isinstance(held, torch.Tensor):
                held = Logits(held)
            first = held.first_position
            current = tokens[:, region]
            predicted, confidence, kept = predict(
                held, slice(rows.start - first, rows.stop - first), current, cfg, generator,
                vocab_size)
            masked = current == mask_id
            for row in range(tokens.shape[0]):
                if done[row]:
                    continue
                if cfg.threshold is not None:
                    current[row] = commit_confident(current[row], masked[row], predicted[row],
                                                    confidence[row], cfg.threshold)
                else:
                    current[row] = unmask(current[row], masked[row], predicted[row],
                                          confidence[row], kept[row], step, steps_per_block, cfg,
                                          mask_id, generator)
            step += 1
            if trace is not None:
                trace.append(tokens.clone())
            if cfg.eos_id is not None:
                done |= finish_at_eos(tokens, start, mask_id, cfg.eos_id)
    return tokens


def commit_confident(current, masked, predicted, confidence, threshold: float):
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


def unmask(current, masked, predicted, confidence, kept, step, steps, cfg: SamplerConfig,
           mask_id, generator):
    """One step of ``cfg.unmasking`` on one row of the block."""
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


def finish_at_eos(tokens, start, mask_id, eos_id) -> torch.Tensor:
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
