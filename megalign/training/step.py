"""The per-micro-batch forward step given to Megatron-Core's schedules, and per-step statistics.

Under ``objective: ar`` the same step trains the causal model on next-token batches (no teacher);
its "diffusion loss" is then the next-token loss. Under the hybrid objective
(``diffusion.ar_loss_weight``) it is the diffusion and next-token terms weighted together, as
minimised; each term is also kept as its own mean. With distillation (``align.kd_weight``) the
last stage's student returns its logits, the loss path computes the cross-entropy and the KL to
the teacher's logits from them (``megalign.align.distill``), and the "diffusion loss" includes
``kd_weight`` x the KL summed over the supervised positions (the same normaliser); the mean KL is
kept too.

Every pipeline stage reads the same micro-batch (the masks are a function of the sample index)
and runs, in order: the teacher's layers of this stage on the clean tokens (REPR-ALIGN only; once
per group of ``align.teacher_microbatches``, in the group's first forward step, which reads the
group's micro-batches ahead), the student's layers on the masked tokens, then this stage's
alignment term, attached to the stage's output so its gradient enters the local graph. The last
stage's diffusion loss goes through the schedule's loss path. Scalars for logging are summed here
and reduced once per step; the losses and per-layer alignment distances stay device tensors until
then, so recording them costs no host sync.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from megalign.align.distill import cross_entropy_and_kl, vocab_shard
from megalign.align.injection import attach_loss
from megalign.align.loss import alignment_loss, mirror_streams, stage_alignment
from megalign.align.teacher import Teacher
from megalign.config import Config
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.objective import (
    DiffusionBatch,
    MaskedDiffusion,
    causal_lm_batch,
    loss_terms,
    make_batch,
)
from megalign.distributed import device
from megalign.model.hidden_states import HiddenStateRecorder
from megalign.platform import collectives
from megalign.telemetry.experts import aux_loss_per_layer
from megalign.training.first_batch import FirstMicrobatch


@dataclass
class StepStats:
    """Sums over this step's micro-batches on this rank (zeros for what lives on other stages)."""

    num_layers: int
    diffusion: torch.Tensor = None  # [1] float64: the diffusion loss (last stage)
    teacher: torch.Tensor = None  # [1] float64: the teacher's AR loss (log_teacher_loss)
    layer_distance: torch.Tensor = None  # [L+1] float64: per aligned layer, sum of (1 - mean cos)
    # [2] float64: the hybrid objective's diffusion and next-token terms, each its own mean
    terms: torch.Tensor = None
    kd: torch.Tensor = None  # [1] float64: the mean KL to the teacher's logits (distillation)

    def __post_init__(self):
        self.diffusion = torch.zeros(1, dtype=torch.float64, device=device())
        self.terms = torch.zeros(2, dtype=torch.float64, device=device())
        self.kd = torch.zeros(1, dtype=torch.float64, device=device())
        self.teacher = torch.zeros(1, dtype=torch.float64, device=device())
        self.layer_distance = torch.zeros(self.num_layers + 1, dtype=torch.float64, device=device())


@dataclass
class StepResult:
    diffusion_loss: float
    align_loss: float
    align_cos: list  # per aligned layer (None for layers not aligned)
    teacher_loss: Optional[float] = None  # with align.log_teacher_loss
    # mixture of experts: each layer's load-balancing loss as added to the loss (coefficient in)
    moe_aux_loss: Optional[list] = None
    # the hybrid objective: its diffusion and next-token terms, each its own mean (diffusion_loss
    # is then the two weighted together, as minimised)
    dlm_loss: Optional[float] = None
    ar_loss: Optional[float] = None
    kd_loss: Optional[float] = None  # distillation: the mean KL (diffusion_loss includes it)

    @property
    def loss(self) -> float:
        """What the step minimised: diffusion (or next-token) + alignment + load balancing."""
        return self.diffusion_loss + self.align_loss + sum(self.moe_aux_loss or ())


class DiffusionStep:
    def __init__(
        self,
        cfg: Config,
        students: list,
        teacher: Optional[Teacher],
        layer_weights: dict[int, float],
        vocab: Vocabulary,
    ):
        self.cfg = cfg
        self.objective = MaskedDiffusion.of(cfg)
        self.teacher = teacher
        self.layer_weights = layer_weights
        self.vocab = vocab
        self._chunk_of = {id(chunk): index for index, chunk in enumerate(students)}
        self._computes_loss = [chunk.post_process for chunk in students]
        self.aligns = teacher is not None and cfg.align.weight > 0
        self.distils = teacher is not None and cfg.align.kd_weight > 0
        self.recorders = (
            [HiddenStateRecorder(chunk, set(layer_weights)) for chunk in students]
            if self.aligns
            else None
        )
        # where each chunk's aligned layers go in the per-step sums (on the device: no copy per use)
        self._aligned_index = [
            torch.tensor(recorder.indices, dtype=torch.long, device=device())
            for recorder in self.recorders or []
        ]
        self.teacher_group = cfg.align.teacher_microbatches if teacher is not None else 1
        # the sequence split over the context-parallel group (Megatron-Core's DDP averages the
        # gradients over data x context ranks; each rank's loss terms are its share of the sums)
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.cp_group = parallel_state.get_context_parallel_group() if self.cp_size > 1 else None
        self.begin(num_microbatches=1, grad_scale_func=None, record_first=False)

    def begin(self, num_microbatches: int, grad_scale_func, record_first: bool) -> None:
        self.num_microbatches = num_microbatches
        self.grad_scale_func = grad_scale_func
        self.stats = StepStats(self.cfg.model.num_layers)
        self.first = FirstMicrobatch(self.cfg.model.num_layers) if record_first else None
        chunks = len(self._computes_loss)
        self._started = [0] * chunks  # micro-batches of this step read so far, per chunk
        self._ready = [deque() for _ in range(chunks)]  # (batch, teacher output) read ahead

    def _aux_scale(self) -> float:
        scale = self.cp_size / self.num_microbatches
        if self.grad_scale_func is not None:
            # Megatron's schedules pass the loss scale a tensor on the model's device too
            scale = float(self.grad_scale_func(torch.ones(1, device=device())).item()) * scale
        return scale

    def make_batch(self, raw: dict) -> DiffusionBatch:
        """This rank's part of the micro-batch (made whole, then split over context ranks)."""
        if self.cfg.objective == "ar":
            batch = causal_lm_batch(raw["tokens"].to(device()), raw["position_ids"].to(device()),
                                    raw["sample_index"], self.vocab,
                                    self.cfg.model.document_attention, self.objective.packed)
        else:
            batch = make_batch(raw["tokens"].to(device()), raw["position_ids"].to(device()),
                               raw["sample_index"], self.objective, self.vocab,
                               with_teacher=self.teacher is not None, training=True,
                               response=raw.get("response"))
        return batch.for_context_rank(self.cp_size, self.cp_rank)

    def _over_context(self, total: torch.Tensor, count: torch.Tensor):
        """(sum, count) of the whole sequence from this rank's share (a no-op without CP)."""
        if self.cp_group is None:
            return total.detach(), count
        both = torch.stack([total.detach().double(), count.double()])
        collectives.all_reduce(both, group=self.cp_group)
        return both[0], both[1].to(count.dtype)

    def __call__(self, data_iterator, model):
        """Megatron's forward_step_func; ``model`` is one student chunk in Megatron DDP
        (and ``Float16Module`` in bf16)."""
        chunk = self._chunk_of[id(unwrap_model(model))]
        last_stage = self._computes_loss[chunk]
        batch, teacher = self._next_microbatch(data_iterator, chunk)
        first = self.first is not None and self.first.watches(batch)
        if teacher is not None and teacher.token_loss is not None:
            loss_sum, count = self._over_context(*loss_terms(teacher.token_loss, replace(
                batch, supervised=batch.supervised_targets, streams=1, next_token=None), "none"))
            self.stats.teacher += (loss_sum / count.clamp(min=1)).double()
        recording = (self.recorders[chunk].recording_scope() if self.aligns
                     else nullcontext({}))
        with recording as student_states:
            output = model(
                batch.as_model_takes(batch.input_tokens),
                batch.as_model_takes(batch.position_ids),
                batch.student_mask,
                # with distillation the loss path takes the logits
                labels=(batch.as_model_takes(batch.labels) if last_stage and not self.distils
                        else None),
                packed_seq_params=batch.packed,
            )
        if self.aligns:
            alignment = stage_alignment(
                student_states,
                teacher.states if batch.streams == 1 else
                mirror_streams(teacher.states, self.cfg.parallel.sequence_parallel),
                batch.aligned,
                self.layer_weights,
                self.cfg.parallel.sequence_parallel,
                self.cp_group,
                packed=batch.packed is not None,
            )
            if alignment.layers:
                output = attach_loss(output, self.cfg.align.weight * alignment.loss,
                                     self._aux_scale())
            self._record_alignment(alignment, chunk, first)
        return output, partial(self._loss, batch, first,
                               teacher.logits if self.distils and last_stage else None)

    def _next_microbatch(self, data_iterator, chunk: int):
        """This chunk's next micro-batch and its teacher output. The teacher runs once per group
        of ``align.teacher_microbatches`` micro-batches, so the group is read at its first one."""
        ready = self._ready[chunk]
        if not ready:
            remaining = self.num_microbatches - self._started[chunk]
            count = max(1, min(self.teacher_group, remaining))
            batches = [self.make_batch(next(data_iterator)) for _ in range(count)]
            outputs = self.teacher.forward(batches, chunk) if self.teacher is not None else [None]
            ready.extend(zip(batches, outputs))
        self._started[chunk] += 1
        return ready.popleft()

    def _record_alignment(self, alignment, chunk: int, first: bool) -> None:
        cos_sums = alignment.cos_sums
        if self.cfg.parallel.sequence_parallel:
            collectives.all_reduce(cos_sums, group=parallel_state.get_tensor_model_parallel_group())
        if self.cp_group is not None:
            collectives.all_reduce(cos_sums, group=self.cp_group)
        distances = ((alignment.count - cos_sums) / alignment.count.clamp(min=1.0)).double()
        index = self._aligned_index[chunk]
        self.stats.layer_distance.index_add_(0, index, distances)
        if first:
            self.first.distances(index, distances)

    def _loss(self, batch: DiffusionBatch, first: bool, teacher_logits: Optional[torch.Tensor],
              output: torch.Tensor):
        """``output``: the per-token cross-entropy, or with distillation the logits' shard."""
        per_token_ce, kl = output, None
        if teacher_logits is not None:
            if batch.streams == 2:  # [noisy; clean]: both streams mirror the sequence's positions
                teacher_logits = torch.cat([teacher_logits, teacher_logits], dim=1)
            per_token_ce, kl = cross_entropy_and_kl(output, teacher_logits,
                                                    batch.as_model_takes(batch.labels),
                                                    *vocab_shard(output.shape[-1]))
        per_token_ce = per_token_ce.view(batch.labels.shape)  # [1, b·s] of packed documents
        loss_sum, count = loss_terms(per_token_ce, batch, self.cfg.diffusion.loss_weighting)
        if kl is not None:
            loss_sum = loss_sum + self._distillation(kl.view(batch.labels.shape), batch)
        whole_sum, count = self._over_context(loss_sum, count)
        value = (whole_sum / count.clamp(min=1)).double().reshape(1)
        self.stats.diffusion += value
        if batch.next_token is not None:
            self._record_terms(per_token_ce, batch)
        if first:
            self.first.diffusion_loss(value)
        # the schedule divides by the whole sequence's count; DDP's mean over the context ranks
        # then leaves the whole sequence's loss
        share = loss_sum * self.cp_size if self.cp_size > 1 else loss_sum
        return share, count, {"diffusion_loss": value}

    def _distillation(self, kl: torch.Tensor, batch: DiffusionBatch) -> torch.Tensor:
        """``align.kd_weight`` x the KL to the teacher's next-token distribution summed over the
        supervised positions (each stream's against the teacher's same position); its mean is
        kept for the log."""
        supervised = batch.supervised.to(kl.dtype)
        total = (kl * supervised).sum()
        whole, count = self._over_context(total, batch.supervised.sum())
        self.stats.kd += (whole / count.clamp(min=1)).double()
        return self.cfg.align.kd_weight * total

    def _record_terms(self, per_token_ce: torch.Tensor, batch: DiffusionBatch) -> None:
        """The hybrid objective's two terms, each as its own mean, for the log."""
        diffusion = self._over_context(*loss_terms(
            per_token_ce, replace(batch, next_token=None), self.cfg.diffusion.loss_weighting))
        next_token = self._over_context((per_token_ce.float() * batch.next_token).sum(),
                                        batch.next_token.sum())
        self.stats.terms += torch.stack([(total / count.clamp(min=1)).double()
                                         for total, count in (diffusion, next_token)])

    def reduce(self) -> StepResult:
        """Means over micro-batches and DP ranks; per-layer values gathered from every stage."""
        L = self.cfg.model.num_layers
        distances = self.stats.layer_distance
        values = torch.cat([self.stats.diffusion, self.stats.teacher, self.stats.terms,
                            self.stats.kd, distances])
        values = _sum_over_pipeline_then_mean_over_dp(values) / self.num_microbatches
        distances = values[5:].tolist()
        align_cos = [
            (1.0 - distances[i]) if i in self.layer_weights and self.aligns else None
            for i in range(L + 1)
        ]
        align_loss = 0.0
        if self.aligns:
            align_loss = alignment_loss(distances, self.layer_weights, self.cfg.align.weight)
        logs_teacher = self.teacher is not None and self.cfg.align.log_teacher_loss
        aux = (aux_loss_per_layer(self.num_microbatches, self.cfg.model.moe_aux_loss_coeff)
               if self.cfg.model.num_experts else None)
        hybrid = self.cfg.diffusion.ar_loss_weight > 0
        return StepResult(float(values[0]), float(align_loss), align_cos,
                          float(values[1]) if logs_teacher else None, aux,
                          float(values[2]) if hybrid else None,
                          float(values[3]) if hybrid else None,
                          float(values[4]) if self.distils else None)

    def first_microbatch_dump(self) -> dict:
        """The watched first micro-batch's inputs and loss terms (collective: every rank)."""
        return self.first.dump(self.layer_weights, self.cfg.align.weight, self.aligns,
                               self.cfg.diffusion.loss_weighting, self.cfg.diffusion.shift)


def _sum_over_pipeline_then_mean_over_dp(values: torch.Tensor) -> torch.Tensor:
    values = values.to(device())
    collectives.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
    collectives.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return (values / parallel_state.get_data_parallel_world_size()).cpu()
