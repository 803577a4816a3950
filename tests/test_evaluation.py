"""Generation quality (generative perplexity and its text statistics) and the decoding defaults
that megalign-generate, the lm-eval adapter and the main job share."""

import math

import pytest
import torch

from megalign.diffusion.decoding import SamplerConfig
from megalign.evaluation.generation import (
    continuation_nll,
    generation_quality,
    is_punctuation,
    text_statistics,
)

from conftest import REPO

pytestmark = pytest.mark.unit

VOCAB = 11


class ToyCausalLM(torch.nn.Module):
    """A causal LM in plain PyTorch: logits at i from the mean embedding of tokens 0..i."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embed = torch.randn(VOCAB, 8, generator=generator)
        self.head = torch.randn(8, VOCAB, generator=generator)
        self.masks = []

    def logits_fn(self, tokens, positions, attention_mask, packed=None):
        self.masks.append(attention_mask)
        states = self.embed[tokens].cumsum(1) / (positions.unsqueeze(-1) + 1)
        return states @ self.head


def by_hand(model, prompt, continuation):
    """-log p(continuation | prompt), one token at a time from the prefix alone."""
    total = 0.0
    for j, token in enumerate(continuation):
        prefix = torch.tensor([prompt + continuation[:j]])
        logits = model.logits_fn(prefix, torch.arange(prefix.shape[1]).unsqueeze(0), None)[0, -1]
        total -= float(logits.log_softmax(-1)[token])
    return total


def test_generative_perplexity_equals_a_hand_computation():
    model = ToyCausalLM()
    prompts, continuations = [[1, 2, 3], [4]], [[5, 6, 7, 8], [9, 9]]
    scored = continuation_nll(model.logits_fn, prompts, continuations)
    each = [by_hand(model, p, c) for p, c in zip(prompts, continuations)]
    expected = sum(each)
    assert scored.counts == (4, 2)
    assert scored.sums == pytest.approx(each, rel=1e-6)
    # the scorer is given a causal mask (True = blocked above the diagonal)
    assert torch.equal(model.masks[0][0, 0], torch.ones(7, 7, dtype=torch.bool).triu(1))
    quality = generation_quality(lambda p: [c + [0, 5] for c in continuations], model.logits_fn,
                                 prompts, lambda t: "x", eos_id=0)
    assert quality["gen_tokens"] == 6  # cut at EOS (id 0)
    assert quality["gen_nll"] == pytest.approx(expected / 6, rel=1e-6)
    assert quality["gen_ppl"] == pytest.approx(math.exp(expected / 6), rel=1e-6)
    assert quality["gen_nll_samples"] == pytest.approx([each[0] / 4, each[1] / 2], rel=1e-6)
    # the ratio estimator's standard error of the token-pooled NLL, by hand
    pooled = expected / 6
    se = math.sqrt(((each[0] - 4 * pooled) ** 2 + (each[1] - 2 * pooled) ** 2) / 2) / 3
    assert quality["gen_nll_se"] == pytest.approx(se, rel=1e-6)
    assert quality["gen_ppl_se"] == pytest.approx(math.exp(pooled) * se, rel=1e-6)


def test_text_statistics_catch_degenerate_text():
    pieces = {1: ",", 2: " ,", 3: " and", 4: " the", 5: "!?", 6: " "}
    stats = text_statistics([[1, 2, 1, 2], [3, 4, 5, 6]], pieces.get)
    assert stats["gen_distinct"] == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert stats["gen_distinct_se"] == pytest.approx(0.25)  # stdev(0.5, 1) / sqrt(2)
    assert stats["gen_punctuation"] == pytest.approx(5 / 8)  # ",", " ,", ",", " ,", "!?"
    assert ([is_punctuation(t) for t in (",", " .", "a.", " ", "")]
            == [True, True, False, False, False])
    assert text_statistics([[], []], pieces.get) == {"gen_distinct": None, "gen_punctuation": None}


def test_decoding_defaults_are_blocks_of_eight_one_token_per_step():
    cfg = SamplerConfig()
    assert (cfg.gen_length, cfg.steps, cfg.block_length) == (32, 32, 8)
    assert (SamplerConfig(gen_length=64).steps,
            SamplerConfig(gen_length=64).block_length) == (64, 8)
    assert SamplerConfig(gen_length=12).block_length == 12  # 8 does not tile it: one block
    assert SamplerConfig(gen_length=16, steps=8, block_length=16).steps == 8


def test_megalign_generate_and_the_main_job_use_the_defaults():
    from megalign.cli.generate import build_parser, sampler_config

    args = build_parser().parse_args(["--checkpoint", "x", "--prompt", "y"])
    cfg = sampler_config(args, eos_id=2)
    assert (cfg.gen_length, cfg.steps, cfg.block_length, cfg.eos_id) == (32, 32, 8, 2)
    args = build_parser().parse_args(["--checkpoint", "x", "--gen-length", "16", "--steps", "4",
                                      "--block-length", "4"])
    assert (sampler_config(args, 2).steps, sampler_config(args, 2).block_length) == (4, 4)
    args = build_parser().parse_args(["--checkpoint", "x", "--threshold", "0.9", "--cache",
                                      "--cache-refresh", "2"])
    fast = sampler_config(args, 2)
    assert (fast.threshold, fast.cache, fast.cache_refresh) == (0.9, True, 2)
    assert (cfg.threshold, cfg.cache, cfg.cache_refresh) == (None, False, 0)  # off by default
    assert not cfg.dual_cache
    dual = sampler_config(build_parser().parse_args(["--checkpoint", "x", "--dual-cache"]), 2)
    assert (dual.cache, dual.dual_cache, dual.suffix) == (True, True, True)
    # the main job decodes with the CLI's defaults: it sets neither option
    script = (REPO / "examples" / "quickstart.sh").read_text()
    generate = script.split("-m megalign.cli.generate", 1)[1]
    assert "--steps" not in generate and "--block-length" not in generate and "--ar" in generate
