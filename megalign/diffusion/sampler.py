"""Denoising sampler for the diffusion student (confidence-ranked unmasking).

The prompt is followed by ``gen_length`` mask tokens; over ``steps`` steps, the model predicts
every masked position at once and the most confident predictions are committed, so that the
number still masked falls linearly to zero. The shift convention is the training one: with the AR
shift, the logits at position ``i`` predict token ``i+1``. Predictions are restricted to the real
vocabulary (never the mask token or padded rows). Sampling uses a generator seeded by ``seed``,
and every rank computes the same tokens (the logits are broadcast over the pipeline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megalign.model.inference import forward_logits


@dataclass
class SamplerConfig:
    gen_length: int = 32
    steps: int = 16
    temperature: float = 0.0  # 0 = most likely token
    seed: int = 0


@torch.no_grad()
def generate(chunks: list, prompt: list[int], mask_id: int, vocab_size: int, shift: bool,
             cfg: SamplerConfig) -> list[int]:
    """The ``gen_length`` generated token ids after ``prompt``."""
    if shift and not prompt:
        raise ValueError("with the AR shift the prompt needs at least one token")
    generator = torch.Generator().manual_seed(cfg.seed)
    start = len(prompt)
    tokens = torch.tensor([prompt + [mask_id] * cfg.gen_length])
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    for step in range(cfg.steps):
        masked = (tokens[0] == mask_id).nonzero().flatten()
        masked = masked[masked >= start]
        if masked.numel() == 0:
            break
        logits = forward_logits(chunks, tokens, positions, None)[0, :, :vocab_size].cpu()
        rows = logits[masked - 1] if shift else logits[masked]
        probs = torch.softmax(rows / max(cfg.temperature, 1e-6), dim=-1) if cfg.temperature \
            else torch.softmax(rows, dim=-1)
        chosen = (torch.multinomial(probs, 1, generator=generator).squeeze(1) if cfg.temperature
                  else probs.argmax(dim=-1))
        confidence = probs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        count = -(-masked.numel() // (cfg.steps - step))  # ceil: linear schedule to zero
        commit = confidence.topk(count).indices
        tokens[0, masked[commit]] = chosen[commit]
    return tokens[0, start:].tolist()
