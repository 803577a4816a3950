"""Forward (noising) process of masked diffusion, reproducible per sample.

A sample's noise level ``t ~ U(eps, 1 - eps)`` and its Bernoulli(t) token mask are drawn from a
generator seeded by ``(seed, global sample index)`` alone. So every TP and PP rank that sees a
sample draws the same mask, different samples (and so DP ranks) draw different ones, and a restart
that resumes at a sample index draws exactly what an uninterrupted run would have drawn.

Attention annealing draws the same way: a sample's ``[s, s]`` uniform matrix comes from its own
generator (another stream of the same seed), and the future position ``j > i`` is open to ``i``
when its entry is below the sample's annealing fraction, so the masks open monotonically as the
fraction grows, identically on every rank and after a restart.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 63) - 1


def sample_seed(seed: int, sample_index: int) -> int:
    """Mix (seed, index) into one generator seed (splitmix64 finaliser: nearby inputs
    decorrelate)."""
    z = (seed * 0x9E3779B97F4A7C15 + sample_index + 1) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK64


def sample_noise(
    sample_indices: torch.Tensor, length: int, seed: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``t`` [b] and token mask [b, length] (True = replaced by the mask token)."""
    ts, masks = [], []
    for index in sample_indices.tolist():
        generator = torch.Generator().manual_seed(sample_seed(seed, int(index)))
        t = eps + (1.0 - 2.0 * eps) * torch.rand((), generator=generator)
        ts.append(t)
        masks.append(torch.rand(length, generator=generator) < t)
    return torch.stack(ts), torch.stack(masks)


def masks_at(sample_indices: torch.Tensor, length: int, seed: int, t: float,
             draw: int) -> torch.Tensor:
    """Masks at a given noise level ``t`` (evaluation grids); ``draw`` picks an independent
    stream."""
    masks = []
    for index in sample_indices.tolist():
        generator = torch.Generator().manual_seed(sample_seed(seed + 7919 * (draw + 1), int(index)))
        masks.append(torch.rand(length, generator=generator) < t)
    return torch.stack(masks)


ANNEAL_STREAM = 104729  # the annealing draws' offset to the seed


def anneal_fraction(sample_indices: torch.Tensor, anneal_iters: int,
                    global_batch_size: int) -> torch.Tensor:
    """[b] share of future positions each sample's student may attend: 0 for the first sample,
    rising linearly with the sample index to 1 at iteration ``anneal_iters`` (sample index
    ``anneal_iters * global_batch_size``) and after."""
    return (sample_indices.double() / (anneal_iters * global_batch_size)).clamp(max=1.0)


def open_future(sample_indices: torch.Tensor, fractions: torch.Tensor, length: int,
                seed: int) -> torch.Tensor:
    """[b, length, length] True where query ``i`` may attend the later position ``j > i`` (the
    positions before it are always open)."""
    later = torch.ones(length, length, dtype=torch.bool).triu(1)
    masks = []
    for index, fraction in zip(sample_indices.tolist(), fractions.tolist()):
        generator = torch.Generator().manual_seed(sample_seed(seed + ANNEAL_STREAM, int(index)))
        masks.append(later & (torch.rand(length, length, generator=generator) < fraction))
    return torch.stack(masks)
