"""megalign's diffusion sampler: the decoding rules of ``megalign.diffusion.decoding`` applied to a
megalign model and vocabulary, through any TP/PP layout.

The model's logits come as each rank's ``VocabShard`` (``megalign.model.inference``:
``sampler_logits`` and ``CachedLogits``), which reduces per-position scalars over the
tensor-parallel group instead of gathering the vocabulary: the row maximum, the sum of ``exp``
(softmax normaliser), the arg-max (value, then lowest index), the chosen token's probability,
the entropy sum, the local top-2 probabilities for ``margin``, and for ``top_k`` the local top-k
values (k per rank) to find the k-th largest. These are exact: the same formulas as on one rank,
up to the order of floating-point sums (tested against one rank on identical logits for every
temperature / top-k / top-p / confidence / rule combination). Only ``top_p`` without ``top_k``
needs the whole sorted distribution, so it all-gathers the rows being decoded ([block positions,
vocab], never [b, s, vocab]); with ``top_k`` it sorts just the gathered top-k candidates. The
last stage then broadcasts each position's token and confidences (3 numbers) over the pipeline,
so every rank ends with the same tokens and any layout gives the same output. A real model's
logits still differ in their last bits between layouts (TP all-reduces), so a decision resting
on a float near-tie can differ: e.g. ``entropy`` confidence on a barely trained model, whose
entropies all sit near log(vocab).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from megalign.config import Config
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion import decoding
from megalign.diffusion.decoding import LogitsSource, SamplerConfig
from megalign.diffusion.objective import block_diffusion


def for_model(cfg: Config, sampler: SamplerConfig) -> SamplerConfig:
    """``sampler`` as the model was trained: with its AR shift (``diffusion.shift``), and for a
    block-diffusion student (``diffusion.block_length``) its blocks left to right,
    block-causally, without the positions after the block."""
    sampler = replace(sampler, shift=cfg.diffusion.shift)
    if not block_diffusion(cfg.diffusion, cfg.model.seq_length):
        return sampler
    return decoding.for_block_diffusion(sampler, cfg.diffusion.block_length)


def sample(source: LogitsSource, prompts: list[list[int]], vocab: Vocabulary,
           cfg: SamplerConfig, trace: Optional[list] = None) -> list[list[int]]:
    """Generated ids per prompt, sampled from ``vocab``'s tokens."""
    return decoding.sample(source, prompts, cfg, mask_id=vocab.mask, pad_id=vocab.pad,
                           vocab_size=vocab.size, trace=trace)


def denoise(source: LogitsSource, tokens: torch.Tensor, attention_mask, start: int,
            vocab: Vocabulary, cfg: SamplerConfig) -> torch.Tensor:
    """Fill ``tokens[:, start:start + cfg.gen_length]`` in place (infilling: text may follow)."""
    return decoding.denoise(source, tokens, attention_mask, start, cfg, mask_id=vocab.mask,
                            vocab_size=vocab.size)
