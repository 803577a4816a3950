"""Training a diffusion student, read as the recipe: build the models (student, frozen teacher),
wrap them in Megatron DDP with Megatron's optimizer and LR schedule, read the data, then loop over
Megatron-Core's pipeline schedule. Policies live in components: ``Checkpointer`` (resume, save,
failure policy), ``Validator`` (held-out evaluation), the first-batch record, the watchdog and
launcher heartbeats; the loop asks them and steps.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megalign import distributed
from megalign.align.loss import normalised_layer_weights
from megalign.align.teacher import Teacher, teacher_build
from megalign.checkpoint import load_checkpoint
from megalign.config import Config, parse_blend
from megalign.data.dataset import build_datasets, micro_batches
from megalign.data.indexed import DataFileGuard
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.masking import anneal_fraction
from megalign.errors import TrainingError
from megalign.model.embedding import init_mask_token_embedding
from megalign.model.gpt import ModelBuild, build_chunks
from megalign.platform import collectives
from megalign.telemetry.experts import ExpertLoad
from megalign.telemetry.peak_memory import MemoryProbe
from megalign.training import memory_plan, watchdog
from megalign.training.checkpointer import Checkpointer
from megalign.training.ft_heartbeat import LauncherHeartbeat
from megalign.training.metrics import MetricsLogger
from megalign.training.optimizer import freeze_parameters, wrap_and_optimize
from megalign.training.signals import ExitOnSignal
from megalign.training.step import DiffusionStep, StepResult
from megalign.training.validator import Validator

# ----------------------------------------------------------------------------- models


def build_models(cfg: Config, vocab: Vocabulary, ar_checkpoint: Optional[str]):
    """Student chunks (trainable) from the AR weights in ``ar_checkpoint`` (random when None) and,
    from the same weights, the frozen teacher (alignment on) and the causal scorer of generated
    samples (``evaluation.generation_samples``)."""
    dtype = torch.float32 if cfg.precision == "fp32" else torch.bfloat16  # fp8: bf16 + FP8 GEMMs
    causal_lm = cfg.objective == "ar"  # the trained model is itself the causal AR model
    students = build_chunks(ModelBuild.of(cfg, causal=causal_lm, params_dtype=dtype,
                                          fp8=cfg.precision == "fp8"), vocab.padded)
    if ar_checkpoint:
        load_checkpoint(ar_checkpoint, students)
    layer_weights = normalised_layer_weights(
        cfg.model.num_layers, cfg.align.layers, cfg.align.layer_weights
    )
    ar_weights = [chunk.state_dict() for chunk in students]
    teacher = None
    if cfg.align.uses_teacher:
        aligned = set(layer_weights) if cfg.align.weight > 0 else set()
        teacher = Teacher(teacher_build(cfg), vocab.padded, ar_weights, aligned,
                          loss=cfg.align.log_teacher_loss, logits=cfg.align.kd_weight > 0)
    scorer = None
    if cfg.evaluation.interval and cfg.evaluation.generation_samples:
        scorer = build_chunks(ModelBuild.of(cfg, causal=True, params_dtype=dtype), vocab.padded)
        for chunk, weights in zip(scorer, ar_weights):
            chunk.load_state_dict(weights)
            chunk.requires_grad_(False)
    if cfg.model.student_checkpoint:
        load_checkpoint(cfg.model.student_checkpoint, students)  # its mask row is trained
    elif cfg.model.mask_token_init == "mean" and not causal_lm:
        for chunk in students:
            init_mask_token_embedding(chunk, vocab.mask, vocab.size)
    return students, teacher, scorer, layer_weights


# ----------------------------------------------------------------------------- loop


class Trainer:
    """One rank's models, optimizer, data and components; ``train`` runs the loop."""

    def __init__(self, cfg: Config, tokenizer, students: list, teacher: Optional[Teacher],
                 models: list, optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler,
                 step: DiffusionStep, train_dataset, num_microbatches: int, validator: Validator,
                 planned: list[memory_plan.StageMemory]):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.students = students  # this rank's model chunks (several with virtual pipelining)
        self.teacher = teacher
        self.models = models  # Megatron DDP around each student chunk
        self.optimizer, self.scheduler = optimizer, scheduler
        self.step = step
        self.train_dataset = train_dataset
        self.num_microbatches = num_microbatches
        self.validator = validator
        self.planned = planned  # bytes per rank of each pipeline stage, before anything was built
        self.iteration = 0  # optimizer steps taken (restored on resume)
        m = cfg.model
        self.expert_load = (ExpertLoad(students, m.num_layers, m.num_experts)
                            if m.num_experts else None)

    @property
    def consumed_samples(self) -> int:
        return self.iteration * self.cfg.data.global_batch_size

    def data_iterator(self, consumed_samples: int = 0) -> list:
        """One iterator per model chunk; each yields this DP rank's micro-batches in order."""
        return [
            micro_batches(
                self.train_dataset,
                consumed_samples,
                self.cfg.data.micro_batch_size,
                parallel_state.get_data_parallel_rank(),
                parallel_state.get_data_parallel_world_size(),
            )
            for _ in self.students
        ]

    def forward_backward(self, data_iterator, step=None, record_first: bool = False) -> StepResult:
        """Gradients of one global batch (in the DDP buffers); returns the reduced statistics."""
        step = step or self.step
        for model in self.models:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        step.begin(self.num_microbatches, self.models[0].config.grad_scale_func, record_first)
        length = self.cfg.model.seq_length * step.objective.streams  # the activations' shape
        batch = self.cfg.data.micro_batch_size
        if step.objective.packed:  # packed documents: one row of all the samples
            length, batch = length * batch, 1
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=data_iterator,
            model=self.models,
            num_microbatches=self.num_microbatches,
            seq_length=length,
            micro_batch_size=batch,
            forward_only=False,
        )
        if step.teacher is not None:
            step.teacher.finish_step()
        return step.reduce()

    def optimizer_step(self) -> tuple[Optional[float], float]:
        """Apply the gradients; returns (grad norm, learning rate used)."""
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.cfg.data.global_batch_size)
        self.iteration += 1
        return (None if grad_norm is None else float(grad_norm)), lr

    def train_step(self, data_iterator) -> dict:
        """One optimizer step; its metrics record. A non-finite loss stops the run before the
        step is applied (so no checkpoint can hold it)."""
        cfg, iteration = self.cfg, self.iteration + 1
        dump_to = cfg.debug.dump_first_batch if iteration == 1 else None
        start = time.perf_counter()
        result = self.forward_backward(data_iterator, record_first=dump_to is not None)
        loss = result.loss
        if not math.isfinite(loss):
            raise TrainingError(
                f"iteration {iteration}: loss is {loss} (diffusion {result.diffusion_loss}, "
                f"align {result.align_loss}); lower optimizer.lr or check the data. "
                "No checkpoint was written for this iteration."
            )
        grad_norm, lr = self.optimizer_step()
        step_time = time.perf_counter() - start
        if dump_to is not None:
            dump = self.step.first_microbatch_dump()  # collective: every rank
            if dist.get_rank() == 0:
                torch.save(dump, dump_to)
        record = {
            "iteration": iteration,
            "loss": loss,
            "diffusion_loss": result.diffusion_loss,
            "align_loss": result.align_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "step_time_s": step_time,
            "tokens_per_s": cfg.data.global_batch_size * cfg.model.seq_length / step_time,
        }
        if cfg.diffusion.anneal_iters:
            samples = torch.arange((iteration - 1) * cfg.data.global_batch_size,
                                   iteration * cfg.data.global_batch_size)
            record["attention_open"] = float(anneal_fraction(
                samples, cfg.diffusion.anneal_iters, cfg.data.global_batch_size).mean())
        if self.cfg.align.weight > 0:
            record["align_cos"] = result.align_cos
        if result.teacher_loss is not None:
            record["teacher_loss"] = result.teacher_loss
        if result.ar_loss is not None:
            record["dlm_loss"], record["ar_loss"] = result.dlm_loss, result.ar_loss
        if result.kd_loss is not None:
            record["kd_loss"] = result.kd_loss
        if result.moe_aux_loss is not None:
            record["moe_aux_loss"] = sum(result.moe_aux_loss)
        if self.expert_load is not None:
            record["expert_load"] = self.expert_load.imbalance()
        return record

    def validate(self, logger: MetricsLogger) -> None:
        metrics = self.validator.validate(self.students, self.step.vocab)
        logger.log_validation({"iteration": self.iteration,
                               "consumed_samples": self.consumed_samples, **metrics})

    def train(self, logger: MetricsLogger, checkpointer: Checkpointer, stop, on_iteration) -> list:
        """Steps to ``schedule.train_iters`` or a stop signal (``stop.requested()``, agreed by
        every rank); ``on_iteration(iteration)`` runs first in each (liveness, data checks)."""
        train_iters = self.cfg.schedule.train_iters
        data_iterator = self.data_iterator(self.consumed_samples)
        if self.iteration == 0 and self.validator.should_validate(0):
            self.validate(logger)  # the start of the curve: the converted AR model
        records = []
        while self.iteration < train_iters:
            on_iteration(self.iteration)
            record = self.train_step(data_iterator)
            records.append(record)
            iteration = self.iteration
            logger.log(record)
            if self.validator.should_validate(iteration):
                self.validate(logger)
            signalled = stop.requested()
            checkpointer.save(iteration, self.students, self.optimizer, self.scheduler,
                              last=signalled)
            if signalled:
                logger.info(f"> {stop.received or 'a signal on another rank'}: stopping after "
                            f"iteration {iteration}")
                break
        return records


def setup(cfg: Config, tokenizer, log=print, store=None,
          ar_checkpoint: Optional[str] = None) -> Trainer:
    """Process groups (rendezvous on ``store`` if given), models from ``ar_checkpoint`` (default
    ``model.init_checkpoint``), optimizer, data and held-out evaluation for this rank."""
    distributed.initialize(
        distributed.launch_env(),
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        cfg.seed,
        cfg.parallel.virtual_pipeline_model_parallel_size,
        timeout_minutes=cfg.resilience.collective_timeout_minutes,
        store=store,
        expert_parallel=cfg.parallel.expert_model_parallel_size,
        context_parallel=cfg.parallel.context_parallel_size,
    )
    dp_size = parallel_state.get_data_parallel_world_size()
    vocab = Vocabulary.of(cfg, tokenizer)
    log(
        f"> megalign: world {dist.get_world_size()} = TP {cfg.parallel.tensor_model_parallel_size}"
        f" x PP {cfg.parallel.pipeline_model_parallel_size}"
        + (f" x CP {cfg.parallel.context_parallel_size}"
           if cfg.parallel.context_parallel_size > 1 else "") + f" x DP {dp_size}"
        + (f" (experts over EP {cfg.parallel.expert_model_parallel_size})"
           if cfg.model.num_experts else "") + "; padded vocab "
        f"{vocab.padded}, mask token {vocab.mask}, align weight {cfg.align.weight}"
    )
    planned = memory_plan.plan(cfg, vocab.padded, dist.get_world_size(), torch.cuda.is_available())
    log("> planned memory per rank: " + ", ".join(
        f"stage {stage.stage} {memory_plan.mib(stage.total)}" for stage in planned)
        + " (megalign-plan prints the items)")
    students, teacher, scorer, layer_weights = build_models(
        cfg, vocab, ar_checkpoint or cfg.model.init_checkpoint)
    frozen = freeze_parameters(students, cfg.optimizer.freeze) if cfg.optimizer.freeze else 0
    models, optimizer, scheduler = wrap_and_optimize(cfg, students)
    trainable = sum(p.numel() for c in students for p in c.parameters() if p.requires_grad)
    log(f"> rank 0 stage parameters: {trainable} trainable, {frozen} frozen")
    if teacher is not None and frozen and cfg.align.share_frozen:
        shared, apart = teacher.share_frozen(students)
        log(f"> rank 0 teacher holds {len(shared)} frozen student tensors instead of copies"
            + (f"; {len(apart)} kept apart (teacher {teacher.dtype}, student "
               f"{cfg.precision}): {', '.join(apart)}" if apart else ""))

    gbs = cfg.data.global_batch_size
    cache_dir = cfg.data.cache_dir or os.path.join(cfg.logging.run_dir, "data_cache")
    train_ds, _, _ = build_datasets(
        cfg.data.paths,
        tokenizer,
        cfg.model.seq_length,
        cfg.data.split,
        cfg.seed,
        [cfg.schedule.train_iters * gbs, 0, 0],
        cache_dir,
        reset_position_ids=cfg.model.document_attention,
        loss_mask=cfg.data.sft,
    )
    validator = Validator(cfg, tokenizer, cache_dir, distributed.device(), scorer)
    step = DiffusionStep(cfg, students, teacher, layer_weights, vocab)
    return Trainer(cfg, tokenizer, students, teacher, models, optimizer, scheduler, step, train_ds,
                   gbs // (cfg.data.micro_batch_size * dp_size), validator, planned)


def report_memory(probe: MemoryProbe, planned: list, run_dir: str, log) -> None:
    """Every rank's measured peak beside its stage's plan: logged and written to
    ``<run_dir>/memory.json`` (collective)."""
    stage = parallel_state.get_pipeline_model_parallel_rank()
    measured = collectives.all_gather_object(
        {"rank": dist.get_rank(), "stage": stage, "peak_bytes": probe.peak()})
    if dist.get_rank() != 0:
        return
    totals = {s.stage: s.total for s in planned}
    worst = max(measured, key=lambda m: abs(m["peak_bytes"] / totals[m["stage"]] - 1))
    planned_bytes = totals[worst["stage"]]
    log(f"> peak memory: rank {worst['rank']} (stage {worst['stage']}) "
        f"{memory_plan.mib(worst['peak_bytes'])}, planned {memory_plan.mib(planned_bytes)} "
        f"(the rank furthest from its plan; all in {run_dir}/memory.json)")
    record = {"device": "cuda" if probe.gpu else "cpu", "measured_as": probe.method,
              "planned": [{"stage": s.stage, "total_bytes": s.total, "bytes": s.bytes}
                          for s in planned],
              "measured": measured}
    with open(os.path.join(run_dir, "memory.json"), "w", encoding="utf-8") as out:
        json.dump(record, out, indent=1)


def run(cfg: Config, tokenizer, store=None) -> list[dict]:
    """Train to ``schedule.train_iters`` (or a stop signal), resuming from a checkpoint if there
    is one; ``store``: see ``setup``."""
    with contextlib.ExitStack() as cleanup:  # an in-process restart runs this again: close all
        logger = MetricsLogger(cfg.logging, cfg.schedule.train_iters,
                               enabled=int(os.environ.get("RANK", "0")) == 0)
        cleanup.callback(logger.close)
        stop = ExitOnSignal()
        probe = MemoryProbe()  # before any model is built
        cleanup.callback(probe.close)
        data_files = DataFileGuard(parse_blend(cfg.data.paths)[0])
        checkpointer = Checkpointer(cfg, logger.info)
        trainer = setup(cfg, tokenizer, log=logger.info, store=store,
                        ar_checkpoint=checkpointer.ar_checkpoint)
        if trainer.teacher is not None:
            checkpointer.keep_initial_weights(trainer.students)
        if checkpointer.resume_from:
            trainer.iteration = checkpointer.resume(trainer.students, trainer.optimizer,
                                                    trainer.scheduler)
        if trainer.iteration >= cfg.schedule.train_iters:
            logger.info(f"> nothing to do: the checkpoint is at iteration {trainer.iteration} and "
                        f"schedule.train_iters={cfg.schedule.train_iters}")
        # from here on (not during start-up, where rank 0 may build data indices in one long C++
        # call that holds the GIL): start-up is bounded by the collective timeout instead. Under
        # in-process restart the wrapper's monitors do this job.
        if not cfg.resilience.inprocess_restart:
            watchdog.start(dist.get_rank(), dist.get_world_size(),
                           cfg.resilience.heartbeat_interval_s, cfg.resilience.failure_timeout_s)
        heartbeat = LauncherHeartbeat()
        cleanup.callback(heartbeat.close)
        if heartbeat.active:
            logger.info("> ft_launcher: one heartbeat per iteration to its rank monitor")

        def on_iteration(iteration: int) -> None:
            watchdog.progress(iteration)
            heartbeat.beat()
            data_files.verify()

        records = trainer.train(logger, checkpointer, stop, on_iteration)
        report_memory(probe, trainer.planned, cfg.logging.run_dir, logger.info)
        return records
