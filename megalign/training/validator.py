"""Held-out evaluation during training (``evaluation.*``): when to evaluate and what.

Forward only, in the training layout, without a checkpoint and without consuming training
randomness; the numbers are megalign-eval's (megalign/evaluation/): diffusion NELBO per token on
held-out samples, and as configured the NELBO on a corpus never trained on, infilling, and the
generative perplexity of sampled continuations under the AR model the run started from. A causal
model (``objective: ar``) is scored by its next-token NLL on the same samples instead. Every
metric is reported with its standard error over samples and, for paired comparisons between runs
(the samples and masks follow ``evaluation.seed`` alone), its per-sample values (``*_samples``).
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Optional

from megalign.config import Config, evaluation_batch_size
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.decoding import SamplerConfig
from megalign.diffusion.objective import MaskedDiffusion
from megalign.diffusion.sampler import for_model
from megalign.evaluation.generation import student_generation_quality
from megalign.evaluation.heldout import (
    causal_nll,
    diffusion_nelbo,
    full_logits_fn,
    heldout_batches,
    infilling,
)
from megalign.evaluation.statistics import Estimate


def reported(name: str, metric: Estimate) -> dict:
    """``name``, its standard error and its per-sample values, as validation.jsonl records them."""
    return {name: metric.value, f"{name}_se": metric.se, f"{name}_samples": metric.per_sample}


class Validator:
    def __init__(self, cfg: Config, tokenizer, cache_dir: str, device,
                 scorer: Optional[list] = None):
        """``scorer``: the causal AR model's chunks (``evaluation.generation_samples``)."""
        e = cfg.evaluation
        self.cfg, self.tokenizer, self.scorer = cfg, tokenizer, scorer
        self.objective = MaskedDiffusion.of(cfg)
        self.heldout, self.ood = [], []
        if e.interval:
            batch_size = evaluation_batch_size(cfg)
            read = partial(heldout_batches, tokenizer=tokenizer, seq_length=cfg.model.seq_length,
                           seed=e.seed, samples=e.samples, batch_size=batch_size,
                           cache_dir=cache_dir, document_attention=cfg.model.document_attention,
                           device=device)
            self.heldout = read(e.paths or cfg.data.paths, e.split or cfg.data.split,
                                loss_mask=cfg.data.sft and not e.paths)
            if e.ood_paths:  # every document of the unseen corpus is held out
                self.ood = read(e.ood_paths, "0,100,0")

    def should_validate(self, iteration: int) -> bool:
        """At the start (the converted AR model), every ``evaluation.interval`` and at the end."""
        interval = self.cfg.evaluation.interval
        return bool(interval) and (iteration % interval == 0
                                   or iteration == self.cfg.schedule.train_iters)

    def validate(self, students: list, vocab: Vocabulary) -> dict:
        """The metrics of the current student."""
        start = time.perf_counter()
        try:
            result = self._metrics(students, vocab)
        finally:
            for chunk in students:
                chunk.train()
        return {**result, "eval_time_s": time.perf_counter() - start}

    def _metrics(self, students: list, vocab: Vocabulary) -> dict:
        cfg, e, tokenizer = self.cfg, self.cfg.evaluation, self.tokenizer
        student = full_logits_fn(students, vocab.size)
        if cfg.objective == "ar":
            score, name = partial(causal_nll, student, vocab=vocab,
                                  document_attention=cfg.model.document_attention,
                                  packed=self.objective.packed), "val_nll"
        else:
            score, name = partial(diffusion_nelbo, student, objective=self.objective,
                                  vocab=vocab, grid=e.t_grid, seed=e.seed), "val_nelbo"
        heldout = score(self.heldout)
        result = {**reported(name, heldout), "val_positions": int(sum(heldout.counts)),
                  "val_ppl_upper_bound": math.exp(min(heldout.value, 700))}
        if self.ood:
            result.update(reported(name.replace("val_", "val_ood_"), score(self.ood)))
        if e.infill_span:
            exact, accuracy = infilling(student, self.heldout, self.objective, vocab,
                                        e.infill_span, e.infill_span)
            result.update(infill_exact_match=exact.value, infill_exact_match_se=exact.se,
                          infill_token_accuracy=accuracy.value,
                          infill_token_accuracy_se=accuracy.se)
        if self.scorer is not None:
            sampler = for_model(cfg, SamplerConfig(gen_length=e.gen_length, eos_id=vocab.eod))
            result.update(student_generation_quality(
                students, full_logits_fn(self.scorer, vocab.size), self.heldout,
                e.generation_samples, e.prompt_length, sampler, vocab, tokenizer))
        return result
