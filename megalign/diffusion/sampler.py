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
is ever unmasked. With ``eos_id`` a sample stops once an EOS is decoded with nothing masked before
it (later positions become EOS). Prompts of different lengths are left-padded and the padding is
kept out of attention. Randomness comes from one generator seeded by ``seed``; every rank computes
the same tokens (the logits are broadcast over the pipeline), so any TP/PP layout gives the same
output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

CONFIDENCES = ("prob", "margin", "entropy")
RULES = ("confidence", "origin", "p2")


@dataclass
class SamplerConfig:
    gen_length: int = 32
    steps: int = 16
    block_length: Optional[int] = None  # None: one block (the whole answer jointly)
    temperature: float = 0.0  # 0: arg-max
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    confidence: str = "prob"
    unmasking: str = "confidence"
    eos_id: Optional[int] = None
    seed: int = 0

    def check(self) -> None:
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"confidence '{self.confidence}' is not one of {CONFIDENCES}")
        if self.unmasking not in RULES:
            raise ValueError(f"unmasking rule '{self.unmasking}' is not one of {RULES}")
        block = self.block_length or self.gen_length
        if self.gen_length < 1 or self.gen_length % block:
            raise ValueError(f"block length {block} must divide gen length {self.gen_length}")
        blocks = self.gen_length // block
        if self.steps < blocks or self.steps % blocks:
            raise ValueError(f"steps ({self.steps}) must be a multiple of the {blocks} blocks")


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _probabilities(logits: torch.Tensor, cfg: SamplerConfig) -> torch.Tensor:
    """Tempered, top-k / top-p filtered distribution over the vocabulary."""
    tempered = logits / cfg.temperature if cfg.temperature > 0 else logits
    return _filter(tempered, cfg.top_k, cfg.top_p).softmax(-1)


def _predict(logits: torch.Tensor, cfg: SamplerConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and confidences for rows of logits [n, vocab]."""
    probs = _probabilities(logits, cfg)
    if cfg.temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(-1)
    return tokens, confidence_of(probs, tokens, cfg.confidence)


def confidence_of(probs: torch.Tensor, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "prob":
        return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return (probs * probs.clamp_min(1e-12).log()).sum(-1)  # negative entropy


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
    blocked &= ~torch.eye(length, dtype=torch.bool)  # (a padded row attends to itself only)
    return tokens, start, blocked.unsqueeze(1)


@torch.no_grad()
def sample(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    prompts: list[list[int]],
    mask_id: int,
    pad_id: int,
    vocab_size: int,
    shift: bool,
    cfg: SamplerConfig,
    trace: Optional[list] = None,
) -> list[list[int]]:
    """Generated ids per prompt. ``logits_fn(tokens, attention_mask)`` -> [b, s, >=vocab]."""
    cfg.check()
    if shift and min(len(p) for p in prompts) == 0:
        raise ValueError("with the AR shift every prompt needs at least one token")
    tokens, start, mask = prepare(prompts, cfg, mask_id, pad_id)
    denoise(logits_fn, tokens, mask, start, cfg.gen_length, mask_id, vocab_size, shift, cfg, trace)
    return [tokens[row, start:].tolist() for row in range(len(prompts))]


@torch.no_grad()
def denoise(logits_fn, tokens: torch.Tensor, attention_mask, start: int, length: int,
            mask_id: int, vocab_size: int, shift: bool, cfg: SamplerConfig,
            trace: Optional[list] = None) -> torch.Tensor:
    """Fill the masked span ``tokens[:, start:start+length]`` in place (blocks left to right);
    the tokens around it (prompt, or prefix and suffix for infilling) are never changed."""
    generator = torch.Generator().manual_seed(cfg.seed)
    block = cfg.block_length or length
    steps_per_block = cfg.steps // (length // block)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for block_start in range(start, start + length, block):
        region = slice(block_start, block_start + block)
        for step in range(steps_per_block):
            if done.all():
                break
            logits = logits_fn(tokens, attention_mask)[..., :vocab_size].float().cpu()
            rows = logits[:, block_start - 1 : block_start + block - 1] if shift else logits[:, region]
            predicted, confidence = _predict(rows.reshape(-1, vocab_size), cfg, generator)
            predicted = predicted.view(tokens.shape[0], block)
            confidence = confidence.view(tokens.shape[0], block)
            current = tokens[:, region]
            masked = current == mask_id
            for row in range(tokens.shape[0]):
                if done[row]:
                    continue
                current[row] = _update(current[row], masked[row], predicted[row], confidence[row],
                                       step, steps_per_block, cfg, mask_id, generator,
                                       logits_row=rows[row])
            if trace is not None:
                trace.append(tokens.clone())
            if cfg.eos_id is not None:
                done |= _finish_at_eos(tokens, start, mask_id, cfg.eos_id)
    return tokens


def _update(current, masked, predicted, confidence, step, steps, cfg, mask_id, generator,
            logits_row):
    left = steps - step
    if cfg.unmasking == "p2":
        # decoded positions compete with their current token's confidence under this step's model
        probs = _probabilities(logits_row, cfg)
        kept = confidence_of(probs, current.clamp(max=probs.shape[-1] - 1), cfg.confidence)
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
