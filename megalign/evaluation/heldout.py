"""Held-out metrics of a diffusion student and of its AR teacher, for megalign-eval and the
in-training evaluation alike.

Diffusion NELBO per token: ``E_t[(1/t) sum_{masked} CE] / positions``, estimated on a fixed
midpoint grid of noise levels (t_k = (k + 1/2) / K) with masks drawn from (evaluation.seed, sample
index, k): deterministic, the same for any layout and any training seed, and per level exactly the
training loss with ``diffusion.loss_weighting=inv_t`` on that mask. Each metric comes as an
``Estimate`` (per-sample values and the standard error over samples). Infilling: the middle
tokens of each sample are
masked and restored by the sampler from the prefix and suffix. AR NLL: ordinary next-token loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalign.data.dataset import build_datasets, micro_batches
from megalign.diffusion.decoding import SamplerConfig
from megalign.diffusion.masking import masks_at
from megalign.diffusion.objective import causal_lm_batch, make_batch, sample_loss_terms
from megalign.diffusion.sampler import denoise
from megalign.evaluation.statistics import Estimate, estimate
from megalign.model.attention import attention_mask, document_ids
from megalign.model.inference import forward_logits


def heldout_batches(paths: list, split: str, tokenizer, seq_length: int, seed: int, samples: int,
                    batch_size: int, cache_dir: str, document_attention: bool = True,
                    device=None, loss_mask: bool = False) -> list:
    """The first ``samples`` samples (whole batches) of the validation split of ``paths`` under
    ``split``: disjoint from the training split of the same split string by construction (Megatron
    splits by document ranges), and the same for every run of the same data and ``seed``
    (``evaluation.seed``), whatever the run's own seed."""
    _, valid, _ = build_datasets(paths, tokenizer, seq_length, split, seed, [0, samples, 0],
                                 cache_dir, document_attention, loss_mask)
    if valid is None or len(valid) < batch_size:
        raise ValueError(f"the validation split ({split}) of {paths} holds "
                         f"{0 if valid is None else len(valid)} samples, fewer than one batch "
                         f"of {batch_size}")
    batches = [b for _, b in zip(range(min(samples, len(valid)) // batch_size),
                                 micro_batches(valid, 0, batch_size, 0, 1))]
    if device is not None:
        for batch in batches:
            for key in ("tokens", "position_ids", "response"):
                if key in batch:
                    batch[key] = batch[key].to(device)
    return batches


def full_logits_fn(chunks: list, vocab_size: int):
    """``logits_fn(tokens, positions, mask, packed=None)`` -> [b, s, vocab] logits of the real
    vocabulary on every rank, whatever the TP/PP layout (``packed``: the documents as THD)."""

    def logits_fn(tokens, positions, attention_mask, packed=None):
        return forward_logits(chunks, tokens, positions, attention_mask,
                              packed)[..., :vocab_size]

    return logits_fn


def sample_losses(logits_fn, batch, weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """([b] loss sums, [b] normalisers) of one ``DiffusionBatch`` under the training loss with
    ``weighting`` (``inv_t``: the NELBO's terms), from full-vocabulary logits."""
    logits = logits_fn(batch.input_tokens, batch.position_ids, batch.student_mask,
                       batch.packed)
    ce = F.cross_entropy(logits.float().transpose(1, 2), batch.labels, reduction="none")
    return sample_loss_terms(ce, batch, weighting)


def diffusion_nelbo(logits_fn, batches, objective, vocab, grid: int, seed: int) -> Estimate:
    """NELBO per position over ``batches`` of raw dataset items (``Estimate.counts``: each
    sample's positions); ``objective``: the ``MaskedDiffusion`` that makes the examples, ``seed``
    (``evaluation.seed``) the masks on the grid."""
    sums, counts = [], []
    for raw in batches:
        total = torch.zeros(raw["tokens"].shape[0], dtype=torch.float64)
        for k in range(grid):
            t = (k + 0.5) / grid
            masked = masks_at(raw["sample_index"], raw["tokens"].shape[1], seed, t, k)
            noise = (torch.full((masked.shape[0],), t), masked)
            batch = make_batch(raw["tokens"], raw["position_ids"], raw["sample_index"], objective,
                               vocab, noise=noise, response=raw.get("response"))
            loss_sums, positions = sample_losses(logits_fn, batch, "inv_t")
            total += loss_sums.double().cpu() / grid
        sums += total.tolist()
        counts += positions.tolist()
    return estimate(sums, counts)


def causal_nll(logits_fn, batches, vocab, document_attention: bool,
               packed: bool = False) -> Estimate:
    """Mean next-token negative log-likelihood of a causal model over the positions that
    ``objective: ar`` trains (``Estimate.counts``: each sample's supervised positions;
    ``packed``: the documents as THD)."""
    sums, counts = [], []
    for raw in batches:
        batch = causal_lm_batch(raw["tokens"], raw["position_ids"], raw["sample_index"], vocab,
                                document_attention, packed)
        loss_sums, supervised = sample_losses(logits_fn, batch, "none")
        sums += loss_sums.tolist()
        counts += supervised.tolist()
    return estimate(sums, counts)


def infilling(logits_fn, batches, objective, vocab, span: int,
              steps: int) -> tuple[Estimate, Estimate]:
    """(exact-match rate, token accuracy) over samples: the middle ``span`` tokens of each sample
    are masked and recovered by the sampler from the prefix and suffix around them."""
    exact, correct = [], []
    for raw in batches:
        clean = raw["tokens"][:, :-1]
        start = clean.shape[1] // 2 - span // 2
        tokens = clean.clone()
        tokens[:, start : start + span] = vocab.mask
        blocked = (attention_mask(document_ids(clean, vocab.eod), causal=False)
                   if objective.document_attention else None)
        positions = raw["position_ids"]
        denoise(lambda x, m, _window: logits_fn(x, positions, m), tokens, blocked, start, vocab,
                SamplerConfig(gen_length=span, steps=steps, shift=objective.diffusion.shift))
        hit = tokens[:, start : start + span] == clean[:, start : start + span]
        exact += hit.all(dim=1).tolist()
        correct += hit.sum(dim=1).tolist()
    return estimate(exact, [1] * len(exact)), estimate(correct, [span] * len(correct))


def ar_nll(logits_fn, batches) -> tuple[float, int]:
    """(mean next-token negative log-likelihood, tokens) of a causal model."""
    total, tokens = 0.0, 0
    for raw in batches:
        inputs, labels = raw["tokens"][:, :-1], raw["tokens"][:, 1:]
        positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)
        logits = logits_fn(inputs, positions, None)
        total += float(F.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
        tokens += labels.numel()
    return total / tokens, tokens
