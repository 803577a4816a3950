"""Quality of what a diffusion student generates, at any scale: generative perplexity.

The student continues held-out prompts with the sampler; a fixed causal AR model (the teacher the
run started from) scores the continuations: its mean negative log-likelihood per generated token
(``gen_nll``, and ``gen_ppl = exp(gen_nll)``), as MDLM and SEDD report it. Degenerate text (one
word repeated, runs of commas) also scores a low perplexity, so two statistics of the text are
reported beside it and must be read with it: the share of distinct tokens per continuation
(``gen_distinct``, averaged over continuations) and the share of generated tokens that are
punctuation only (``gen_punctuation``). Each comes with its standard error over prompts
(``*_se``) and the per-prompt values (``*_samples``) for paired comparisons.
"""

from __future__ import annotations

import math
import unicodedata
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from megalign.diffusion.decoding import until_eos
from megalign.diffusion.sampler import sample
from megalign.evaluation.statistics import Estimate, estimate
from megalign.model.attention import attention_mask
from megalign.model.inference import sampler_logits


def heldout_prompts(batches: list, count: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens of the first ``count`` held-out samples (raw dataset batches)."""
    prompts = [row[:length].tolist() for batch in batches for row in batch["tokens"]]
    if len(prompts) < count:
        raise ValueError(f"{count} generation prompts asked for, only {len(prompts)} held-out "
                         "samples loaded")
    return prompts[:count]


def continuation_nll(ar_logits_fn: Callable, prompts: list[list[int]],
                     continuations: list[list[int]]) -> Estimate:
    """Per continuation, the sum of -log p_AR(token | prompt, earlier tokens) over its tokens and
    their number (an empty continuation counts 0 of 0).

    ``ar_logits_fn(tokens, positions, attention_mask)`` -> [b, s, vocab] logits of a causal model;
    each prompt and its continuation are scored as one unpadded sequence."""
    sums, counts = [], []
    for prompt, continuation in zip(prompts, continuations):
        if not continuation:
            sums.append(0.0)
            counts.append(0)
            continue
        tokens = torch.tensor([prompt + continuation])
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        causal = attention_mask(torch.zeros_like(tokens), causal=True)  # one document
        logits = ar_logits_fn(tokens, positions, causal)[0].float()
        predicting = logits[len(prompt) - 1 : tokens.shape[1] - 1]
        targets = torch.tensor(continuation, device=predicting.device)
        sums.append(float(F.cross_entropy(predicting, targets, reduction="sum")))
        counts.append(len(continuation))
    return estimate(sums, counts)


def is_punctuation(text: str) -> bool:
    """True for a token whose text, without whitespace, is one or more punctuation characters."""
    text = "".join(text.split())
    return bool(text) and all(unicodedata.category(c).startswith("P") for c in text)


def text_statistics(continuations: list[list[int]], decode_token: Callable[[int], str]) -> dict:
    """Mean share of distinct tokens per continuation and share of punctuation-only tokens, with
    their standard errors over the non-empty continuations."""
    nonempty = [ids for ids in continuations if ids]
    if not nonempty:
        return {"gen_distinct": None, "gen_punctuation": None}
    distinct = estimate([len(set(ids)) / len(ids) for ids in nonempty], [1] * len(nonempty))
    punctuation = estimate([sum(is_punctuation(decode_token(t)) for t in ids) for ids in nonempty],
                           [len(ids) for ids in nonempty])
    return {"gen_distinct": distinct.value, "gen_distinct_se": distinct.se,
            "gen_punctuation": punctuation.value, "gen_punctuation_se": punctuation.se,
            "gen_distinct_samples": distinct.per_sample}


def generation_quality(sample_fn: Callable[[list[list[int]]], list[list[int]]],
                       ar_logits_fn: Callable, prompts: list[list[int]],
                       decode_token: Callable[[int], str], eos_id: Optional[int]) -> dict:
    """Sample a continuation of every prompt with ``sample_fn`` (cut at ``eos_id``) and score it.

    Returns ``gen_nll``, ``gen_ppl``, ``gen_distinct``, ``gen_punctuation`` (None when every
    continuation is empty), their standard errors (``gen_ppl_se`` by the delta method), the
    per-prompt NLL (``gen_nll_samples``; None for an empty continuation) and ``gen_tokens``."""
    continuations = [until_eos(ids, eos_id) for ids in sample_fn(prompts)]
    scored = continuation_nll(ar_logits_fn, prompts, continuations)
    count = int(sum(scored.counts))
    nll = scored.value if count else None
    ppl = None if nll is None else math.exp(min(nll, 700))
    return {"gen_nll": nll, "gen_nll_se": scored.se if count else None, "gen_ppl": ppl,
            "gen_ppl_se": None if nll is None else ppl * scored.se,
            **text_statistics(continuations, decode_token), "gen_tokens": count,
            "gen_nll_samples": [v if n else None for v, n in zip(scored.per_sample,
                                                                   scored.counts)]}


def student_generation_quality(students: list, ar_logits_fn: Callable, batches: list, count: int,
                               prompt_length: int, sampler, vocab, tokenizer) -> dict:
    """``generation_quality`` of a diffusion student's model chunks on the first ``count``
    held-out samples' first ``prompt_length`` tokens, decoded with ``sampler``."""
    return generation_quality(
        lambda prompts: sample(sampler_logits(students, sampler.cache, sampler.dual_cache),
                               prompts, vocab, sampler),
        ar_logits_fn, heldout_prompts(batches, count, prompt_length),
        lambda token: tokenizer.decode([token]), vocab.eod)

