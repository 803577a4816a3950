"""lm-evaluation-harness adapter: a megalign diffusion student as the ``lm_eval`` model "megalign".

    megalign-harness --checkpoint RUN/checkpoints --tasks my_task --include_path my_tasks/ \\
        [--model_args mc_samples=16,steps=32] [--limit N] [--num_fewshot K] [--output results.json]

(``python -m megalign.cli.harness`` is the same command.) Importing this module registers the
model, so ``lm_eval.simple_evaluate(model="megalign", model_args={"checkpoint": ...})`` works
too; the plain ``lm_eval`` command does not import it. The checkpoint is loaded like
``megalign-generate`` does in one process: resharded to TP=1, PP=1.

* ``loglikelihood(context, continuation)``: minus the Monte-Carlo negative ELBO of the
  continuation given the context. Only continuation tokens are masked, at the noise levels
  ``t_k = (k + 1/2) / K`` of ``mc_samples`` = K (the midpoint grid of ``megalign-eval``), each
  token independently with probability ``t_k`` from a generator seeded by (``seed``, the request's
  tokens, k); the estimate is ``-(1/K) sum_k sum_{masked} CE / t_k``, exactly the training loss
  with ``diffusion.loss_weighting=inv_t`` on that mask and the checkpoint's ``diffusion.shift``.
  It is a lower bound of log p(continuation | context) in expectation, not the log-likelihood: do
  not compare it with AR models' numbers, and expect variance for short continuations (raise
  ``mc_samples``). ``is_greedy`` is approximated by one step: with the whole continuation masked,
  is the arg-max at every position the continuation's token?
* ``generate_until``: the denoising sampler (``megalign/diffusion/sampler.py``; greedy unless
  the task sets ``temperature`` > 0) on ``max_gen_toks`` mask tokens, cut at EOS and then at the
  first of the ``until`` strings.
* ``loglikelihood_rolling`` (perplexity tasks) is not implemented: see its error.

With the AR shift every context needs at least one token (position i predicts token i+1); an empty
context is refused rather than conditioned on an EOD token, after which the training convention
never predicts anything.
"""

from __future__ import annotations

import json
import zlib
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megalign.diffusion.decoding import SamplerConfig, until_eos
from megalign.diffusion.masking import masks_at
from megalign.diffusion.objective import MaskedDiffusion, make_batch
from megalign.diffusion.sampler import for_model, sample
from megalign.evaluation.heldout import sample_losses
from megalign.loading import load_student, open_checkpoint
from megalign.model.attention import attention_mask, document_ids
from megalign.model.inference import forward_logits, sampler_logits


def _flag(value) -> bool:
    """A yes/no model argument: lm_eval passes ``model_args`` as text."""
    return str(value).lower() in ("1", "true", "yes")


@register_model("megalign")
class MegalignLM(TemplateLM):
    """A diffusion student checkpoint behind lm_eval's ``LM`` interface (see the module doc)."""

    def __init__(self, checkpoint: str, mc_samples: int = 8, seed: int = 0,
                 steps: Optional[int] = None, block_length: Optional[int] = None,
                 unmasking: str = "confidence", confidence: str = "prob",
                 max_gen_toks: int = 32, threshold: Optional[float] = None, cache=False,
                 dual_cache=False, **_harness_args):  # batch_size, device: not used
        super().__init__()
        self.opened = open_checkpoint(checkpoint, [])
        self.tokenizer = self.opened.tokenizer
        self.cfg = self.opened.cfg
        self.chunks = load_student(self.opened)
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.steps = None if steps is None else int(steps)  # None: the sampler's defaults
        self.block_length = None if block_length is None else int(block_length)
        self.unmasking = unmasking
        self.confidence = confidence
        self.max_gen_toks = int(max_gen_toks)
        self.threshold = None if threshold is None else float(threshold)
        self.dual_cache = _flag(dual_cache)
        self.cache = self.dual_cache or _flag(cache)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def logits(self, tokens: torch.Tensor, attention_mask) -> torch.Tensor:
        """[b, s, tokenizer vocabulary] logits of the student (positions 0..s-1)."""
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        return forward_logits(self.chunks, tokens, positions,
                              attention_mask)[..., :self.tokenizer.vocab_size]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.cfg.diffusion.shift and any(context == ""
                                            for context, _ in (r.args for r in requests)):
            raise ValueError(
                "megalign: an empty context cannot be scored with diffusion.shift=true (the first "
                "continuation token has no position predicting it); give every request a context"
            )
        return super().loglikelihood(requests, disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = []
        for (text, context, continuation) in requests:
            nelbo = continuation_nelbo(self._logits_fn, context, continuation,
                                       MaskedDiffusion.of(self.cfg),
                                       self.opened.vocab, self.mc_samples, self.seed)
            greedy = self._is_greedy(context, continuation)
            self.cache_hook.add_partial("loglikelihood", text, (-nelbo, greedy))
            results.append((-nelbo, greedy))
        return results

    def _logits_fn(self, tokens, _positions, attention_mask, _packed=None):
        return self.logits(tokens, attention_mask)

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        """One-step approximation: the arg-max with the whole continuation masked."""
        tokens = torch.tensor([context + [self.opened.vocab.mask] * len(continuation)])
        blocked = attention_mask(document_ids(tokens, self.tokenizer.eod), causal=False)
        logits = self.logits(tokens, blocked)[0]
        start = len(context)
        rows = logits[start - 1 : -1] if self.cfg.diffusion.shift else logits[start:]
        return rows.argmax(-1).tolist() == continuation

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "megalign: loglikelihood_rolling (perplexity tasks) is not implemented for diffusion "
            "models; use megalign-eval for held-out NELBO / perplexity bounds, or multiple-choice "
            "and generate_until tasks here"
        )

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            sampler, until = self._sampler(gen_kwargs)
            prompt = self.tok_encode(context)[-(self.cfg.model.seq_length - sampler.gen_length):]
            logits_fn = sampler_logits(self.chunks, sampler.cache, sampler.dual_cache)
            ids = sample(logits_fn, [prompt], self.opened.vocab, sampler)[0]
            text = cut_at_stop(self.tok_decode(until_eos(ids, self.tokenizer.eod)), until)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs

    def _sampler(self, gen_kwargs: dict) -> tuple[SamplerConfig, list[str]]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        length = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        if length >= self.cfg.model.seq_length:
            raise ValueError(f"megalign: max_gen_toks {length} leaves no room for a prompt in the "
                             f"model's context of {self.cfg.model.seq_length} tokens")
        # do_sample=false: greedy whatever the temperature
        sampled = gen_kwargs.get("do_sample", True)
        temperature = float(gen_kwargs.get("temperature") or 0.0) if sampled else 0.0
        cfg = for_model(self.cfg, SamplerConfig(gen_length=length, steps=self.steps,
                                                block_length=self.block_length,
                                                temperature=temperature,
                                                top_k=int(gen_kwargs.get("top_k") or 0),
                                                top_p=float(gen_kwargs.get("top_p") or 1.0),
                                                confidence=self.confidence,
                                                unmasking=self.unmasking,
                                                eos_id=self.tokenizer.eod, seed=self.seed,
                                                threshold=self.threshold, cache=self.cache,
                                                dual_cache=self.dual_cache))
        cfg.check()
        return cfg, until


def continuation_nelbo(logits_fn, context: list[int], continuation: list[int], objective, vocab,
                       samples: int, seed: int) -> float:
    """Monte-Carlo negative ELBO of ``continuation`` given ``context`` (see the module doc)."""
    length = len(context) + len(continuation)
    # one extra token, as a Megatron sample has, so that make_batch keeps all `length` as input
    tokens = torch.tensor([context + continuation + [vocab.pad]]).expand(samples, -1)
    index = torch.tensor([zlib.crc32(json.dumps([context, continuation]).encode())])
    t = torch.tensor([(k + 0.5) / samples for k in range(samples)])
    masked = torch.zeros(samples, length + 1, dtype=torch.bool)
    for k in range(samples):
        masked[k, len(context):length] = masks_at(index, len(continuation), seed, float(t[k]), k)[0]
    positions = torch.arange(length).unsqueeze(0).expand(samples, -1)
    batch = make_batch(tokens, positions, index.expand(samples), objective, vocab,
                       noise=(t, masked))
    loss_sums, _ = sample_losses(logits_fn, batch, "inv_t")
    return float(loss_sums.sum()) / samples


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
    return text[:cut]
