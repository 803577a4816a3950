"""megalign-train: convert an AR model into a masked diffusion LM, optionally with REPR-ALIGN.

    torchrun --nproc-per-node N -m megalign.train --config FILE [key.sub=value ...]

Read top to bottom: configuration (checked before any process group exists), distributed
start-up, student (and frozen teacher), Megatron DDP + optimizer + LR schedule, data, then the
training loop around Megatron-Core's pipeline schedule.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from megalign.config import (
    Config,
    ConfigError,
    load_config,
    mask_token_id,
    padded_vocab_size,
    to_dict,
    validate,
)


class TrainingError(RuntimeError):
    """A failure during training that the user can act on (NaN loss, bad freeze pattern, ...)."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="megalign-train", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", action="append",
                        help="YAML run configuration(s), merged in order (examples/configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. align.weight=10")
    return parser.parse_args(argv)


def load_and_validate(args, world_size: int):
    """Config + tokenizer, fully checked; nothing distributed has started yet."""
    from megalign.data.tokenizer import build_tokenizer
    from megalign.model.gpt import check_platform

    cfg = load_config(args.config, args.overrides)
    check_platform(cfg)
    validate(cfg, world_size)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    validate(cfg, world_size, tokenizer.vocab_size, tokenizer.mask)
    return cfg, tokenizer


# ----------------------------------------------------------------------------- models


def build_models(cfg: Config, vocab_size: int, mask_id: int, tokenizer_vocab: int):
    """Student chunks (trainable) and, with alignment on, the frozen teacher from the same AR weights."""
    from megalign.align.loss import normalised_layer_weights
    from megalign.align.teacher import Teacher
    from megalign.checkpoint import load_checkpoint
    from megalign.model.embedding import init_mask_token_embedding
    from megalign.model.gpt import build_chunks

    dtype = torch.float32 if cfg.precision == "fp32" else torch.bfloat16  # fp8: bf16 + FP8 GEMMs
    students = build_chunks(cfg, vocab_size, causal=False, params_dtype=dtype,
                            fp8=cfg.precision == "fp8")
    if cfg.model.init_checkpoint:
        load_checkpoint(cfg.model.init_checkpoint, students)
    layer_weights = normalised_layer_weights(
        cfg.model.num_layers, cfg.align.layers, cfg.align.layer_weights
    )
    ar_weights = [chunk.state_dict() for chunk in students]
    teacher = None
    if cfg.align.weight > 0:
        teacher = Teacher(cfg, vocab_size, ar_weights, set(layer_weights))
    scorer = None
    if cfg.evaluation.interval and cfg.evaluation.generation_samples:
        # the AR model the run starts from scores the student's samples (generative perplexity)
        scorer = build_chunks(cfg, vocab_size, causal=True, params_dtype=dtype)
        for chunk, weights in zip(scorer, ar_weights):
            chunk.load_state_dict(weights)
            chunk.requires_grad_(False)
    if cfg.model.mask_token_init == "mean":
        for chunk in students:
            init_mask_token_embedding(chunk, mask_id, tokenizer_vocab)
    return students, teacher, scorer, layer_weights


def freeze_parameters(chunks: list, patterns: list[str]) -> int:
    """requires_grad=False for parameters whose global name matches a pattern (re.search).

    With tied embeddings the last pipeline stage holds a copy of the word embedding as its output
    layer; both names refer to one logical tensor, so a pattern matching either freezes both.
    """
    from megalign.model.gpt import global_parameter_name

    tied = ("embedding.word_embeddings.weight", "output_layer.weight")
    matches = torch.zeros(len(patterns), dtype=torch.int64)
    frozen = 0
    named = [(chunk, name, param) for chunk in chunks for name, param in chunk.named_parameters()]
    for chunk, name, param in named:
        names = [global_parameter_name(name, chunk)]
        if chunk.share_embeddings_and_output_weights and names[0] in tied:
            names = list(tied)
        hit = [any(re.search(p, n) for n in names) for p in patterns]
        matches += torch.tensor(hit, dtype=torch.int64)
        if any(hit):
            param.requires_grad_(False)
            frozen += param.numel()
    dist.all_reduce(matches)
    unmatched = [p for p, n in zip(patterns, matches.tolist()) if n == 0]
    if unmatched:
        raise TrainingError(
            f"optimizer.freeze patterns {unmatched} match no parameter; names look like "
            "'embedding.word_embeddings.weight', 'decoder.layers.0.mlp.linear_fc1.weight', "
            "'output_layer.weight'"
        )
    return frozen


def wrap_and_optimize(cfg: Config, students: list):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = students[0].config
    models = [
        DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
            module=chunk,
            disable_bucketing=index > 0,  # as Megatron-LM: only the first chunk overlaps
        )
        for index, chunk in enumerate(students)
    ]
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            decoupled_weight_decay=o.name == "adamw",
            adam_beta1=o.beta1,
            adam_beta2=o.beta2,
            adam_eps=o.eps,
            clip_grad=o.clip_grad,
            bf16=cfg.precision != "fp32",
            params_dtype=config.params_dtype,
        ),
        models,
    )
    gbs, s = cfg.data.global_batch_size, cfg.schedule
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_iters * gbs,
        lr_decay_steps=s.train_iters * gbs,
        lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=s.train_iters * gbs,
        wd_incr_style="constant",
        override_opt_param_scheduler=True,  # on resume the current config's schedule applies
        use_checkpoint_opt_param_scheduler=False,
    )
    no_sync = [model.no_sync for model in models]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss if cfg.precision != "fp32" else None
    return models, optimizer, scheduler


# ----------------------------------------------------------------------------- loop


@dataclass
class Trainer:
    """Everything one rank needs to train; built by ``setup``."""

    cfg: Config
    students: list  # this rank's model chunks (one unless virtual pipeline stages are used)
    teacher: Optional[object]
    models: list  # Megatron DDP around each student chunk
    optimizer: object
    scheduler: object
    step: object  # megalign.training.step.DiffusionStep
    train_dataset: object
    num_microbatches: int
    vocab_size: int  # the tokenizer's (real) vocabulary: held-out logits are scored over it
    heldout: list  # held-out micro-batches for evaluation.interval (empty when it is off)
    ood_heldout: list  # micro-batches of evaluation.ood_paths (empty when unset)
    scorer: Optional[list]  # the causal AR model scoring samples (evaluation.generation_samples)
    tokenizer: object
    iteration: int = 0  # optimizer steps taken (restored on resume)

    def data_iterator(self, consumed_samples: int = 0) -> list:
        """One iterator per model chunk; each yields this DP rank's micro-batches in order."""
        from megatron.core import parallel_state

        from megalign.data.dataset import micro_batches

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

    def forward_backward(self, data_iterator, step=None, record_first: bool = False):
        """Gradients of one global batch (in the DDP buffers); returns the reduced statistics."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        step = step or self.step
        for model in self.models:
            model.zero_grad_buffer()
        self.optimizer.zero_grad()
        step.begin(self.num_microbatches, self.models[0].config.grad_scale_func, record_first)
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=data_iterator,
            model=self.models,
            num_microbatches=self.num_microbatches,
            seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.data.micro_batch_size,
            forward_only=False,
        )
        if step.teacher is not None:
            step.teacher.finish_step()
        return step.reduce()

    def evaluate(self) -> dict:
        """Held-out metrics of the current student, forward only, without a checkpoint:
        megalign-eval's diffusion NELBO per token (same grid, same deterministic masks) and, as
        configured, the NELBO on a corpus never trained on, infilling and generation quality."""
        from functools import partial

        from megalign.diffusion.sampler import SamplerConfig, sample
        from megalign.evaluation.generation import generation_quality, heldout_prompts
        from megalign.evaluation.heldout import diffusion_nelbo, full_logits_fn, infilling
        from megalign.model.inference import sampler_logits

        step, e, tokenizer = self.step, self.cfg.evaluation, self.tokenizer
        student = full_logits_fn(self.students, self.vocab_size)
        nelbo = partial(diffusion_nelbo, student, cfg=self.cfg, mask_id=step.mask_token_id,
                        eod=step.eod, pad=step.pad, grid=e.t_grid)
        try:
            value, positions = nelbo(self.heldout)
            result = {"val_nelbo": value, "val_ppl_upper_bound": math.exp(min(value, 700)),
                      "val_positions": positions}
            if self.ood_heldout:
                result["val_ood_nelbo"] = nelbo(self.ood_heldout)[0]
            if e.infill_span:
                exact, accuracy = infilling(student, self.heldout, self.cfg, step.mask_token_id,
                                            step.eod, self.vocab_size, e.infill_span, e.infill_span)
                result.update(infill_exact_match=exact, infill_token_accuracy=accuracy)
            if self.scorer is not None:
                sampler = SamplerConfig(gen_length=e.gen_length, eos_id=tokenizer.eod)
                result.update(generation_quality(
                    lambda prompts: sample(sampler_logits(self.students), prompts,
                                           step.mask_token_id, tokenizer.pad, self.vocab_size,
                                           self.cfg.diffusion.shift, sampler),
                    full_logits_fn(self.scorer, self.vocab_size),
                    heldout_prompts(self.heldout, e.generation_samples, e.prompt_length),
                    lambda token: tokenizer.decode([token]), tokenizer.eod))
            return result
        finally:
            for chunk in self.students:
                chunk.train()
            for recorder in step.recorders or []:
                recorder.pop()  # drop the held-out forward's states

    @property
    def consumed_samples(self) -> int:
        return self.iteration * self.cfg.data.global_batch_size

    def save(self) -> str:
        from megalign.checkpoint import fingerprint, save_checkpoint

        cfg = self.cfg
        meta = {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "config": to_dict(cfg),
            "ar_checkpoint": cfg.model.init_checkpoint,
            "ar_checkpoint_fingerprint": fingerprint(cfg.model.init_checkpoint),
        }
        return save_checkpoint(cfg.checkpoint.save, self.iteration, self.students,
                               self.optimizer, self.scheduler, meta, cfg.checkpoint.keep_last_n)

    def resume(self, path: str) -> dict:
        """Continue from a training checkpoint: weights, optimizer, schedule, RNG, position."""
        from megalign.checkpoint import fingerprint, load_checkpoint

        meta = load_checkpoint(path, self.students, self.optimizer, self.scheduler)
        expected = meta.get("ar_checkpoint_fingerprint")
        if expected and expected != fingerprint(self.cfg.model.init_checkpoint):
            raise TrainingError(
                f"checkpoint {path} was trained against the AR checkpoint "
                f"{meta.get('ar_checkpoint')} (fingerprint {expected}); model.init_checkpoint="
                f"{self.cfg.model.init_checkpoint} differs, so the teacher would differ"
            )
        self.iteration = int(meta["iteration"])
        return meta

    def optimizer_step(self) -> tuple[Optional[float], float]:
        """Apply the gradients; returns (grad norm, learning rate used)."""
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.cfg.data.global_batch_size)
        self.iteration += 1
        return (None if grad_norm is None else float(grad_norm)), lr


def setup(cfg: Config, tokenizer, log=print, store=None) -> Trainer:
    """Process groups (rendezvous on ``store`` if given), models, optimizer and data for this
    rank."""
    from megatron.core import parallel_state

    from megalign import distributed
    from megalign.data.dataset import build_datasets
    from megalign.evaluation.heldout import heldout_batches
    from megalign.training.step import DiffusionStep

    distributed.initialize(
        distributed.launch_env(),
        cfg.parallel.tensor_model_parallel_size,
        cfg.parallel.pipeline_model_parallel_size,
        cfg.seed,
        cfg.parallel.virtual_pipeline_model_parallel_size,
        timeout_minutes=cfg.resilience.collective_timeout_minutes,
        store=store,
    )
    dp_size = parallel_state.get_data_parallel_world_size()
    vocab = padded_vocab_size(cfg, tokenizer.vocab_size, tokenizer.mask)
    mask_id = mask_token_id(cfg, tokenizer.vocab_size, tokenizer.mask)
    log(
        f"> megalign: world {dist.get_world_size()} = TP {cfg.parallel.tensor_model_parallel_size}"
        f" x PP {cfg.parallel.pipeline_model_parallel_size} x DP {dp_size}; padded vocab {vocab}, "
        f"mask token {mask_id}, align weight {cfg.align.weight}"
    )
    students, teacher, scorer, layer_weights = build_models(cfg, vocab, mask_id,
                                                            tokenizer.vocab_size)
    frozen = freeze_parameters(students, cfg.optimizer.freeze) if cfg.optimizer.freeze else 0
    models, optimizer, scheduler = wrap_and_optimize(cfg, students)
    trainable = sum(p.numel() for c in students for p in c.parameters() if p.requires_grad)
    log(f"> rank 0 stage parameters: {trainable} trainable, {frozen} frozen")

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
    )
    e = cfg.evaluation
    heldout, ood_heldout = [], []
    if e.interval:
        batch_size = e.batch_size or cfg.data.micro_batch_size
        heldout = heldout_batches(e.paths or cfg.data.paths, e.split or cfg.data.split, tokenizer,
                                  cfg, e.samples, batch_size, cache_dir, distributed.device())
        if e.ood_paths:
            ood_heldout = heldout_batches(e.ood_paths, "0,100,0", tokenizer, cfg, e.samples,
                                          batch_size, cache_dir, distributed.device())
    step = DiffusionStep(cfg, students, teacher, layer_weights, mask_id, tokenizer.eod, tokenizer.pad)
    return Trainer(
        cfg=cfg,
        students=students,
        teacher=teacher,
        models=models,
        optimizer=optimizer,
        scheduler=scheduler,
        step=step,
        train_dataset=train_ds,
        num_microbatches=gbs // (cfg.data.micro_batch_size * dp_size),
        vocab_size=tokenizer.vocab_size,
        heldout=heldout,
        ood_heldout=ood_heldout,
        scorer=scorer,
        tokenizer=tokenizer,
    )


def latest_checkpoint_to_resume(cfg: Config) -> Optional[str]:
    """``checkpoint.save`` when it already holds a complete checkpoint and
    ``checkpoint.auto_resume`` is on (a restarted or requeued job continues by itself, even if
    ``checkpoint.load`` names where it started), else ``checkpoint.load``."""
    from megalign.checkpoint import LATEST

    ckpt = cfg.checkpoint
    if ckpt.auto_resume and ckpt.save and os.path.isfile(os.path.join(ckpt.save, LATEST)):
        return ckpt.save
    return ckpt.load or None


def run(cfg: Config, tokenizer, store=None) -> list[dict]:
    """Train to ``schedule.train_iters`` (or a stop signal), resuming from a checkpoint if there
    is one; ``store``: see ``setup``."""
    from megalign.checkpoint import CheckpointError, describe, read_meta, resolve, save_weights
    from megalign.data.dataset import parse_blend
    from megalign.data.indexed import DataFileGuard
    from megalign.training import watchdog
    from megalign.training.ft_heartbeat import LauncherHeartbeat
    from megalign.training.metrics import MetricsLogger
    from megalign.training.signals import ExitOnSignal

    rank0 = int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as cleanup:  # an in-process restart runs this again: close all
        logger = MetricsLogger(cfg.logging.run_dir, cfg.logging.tensorboard, enabled=rank0)
        cleanup.callback(logger.close)
        stop = ExitOnSignal()
        data_files = DataFileGuard(parse_blend(cfg.data.paths)[0])
        cfg.checkpoint.load = latest_checkpoint_to_resume(cfg)
        if cfg.checkpoint.load and not cfg.model.init_checkpoint:
            # the teacher is the AR model the run started from, whatever layout resumes it
            meta = read_meta(resolve(cfg.checkpoint.load))
            cfg.model.init_checkpoint = meta.get("ar_checkpoint")
        trainer = setup(cfg, tokenizer, log=logger.info, store=store)
        if trainer.teacher is not None and not cfg.model.init_checkpoint and cfg.checkpoint.save:
            # a randomly initialised "AR model": keep it, so a resumed run gets the same teacher
            cfg.model.init_checkpoint = save_weights(
                os.path.join(cfg.checkpoint.save, "ar_init"), trainer.students
            )
            logger.info(f"> saved the initial AR weights (the teacher) to "
                        f"{cfg.model.init_checkpoint}")
        if cfg.checkpoint.load:
            meta = trainer.resume(cfg.checkpoint.load)
            logger.info(f"> resumed from {cfg.checkpoint.load}: {describe(meta)}")
        if trainer.iteration >= cfg.schedule.train_iters:
            logger.info(f"> nothing to do: the checkpoint is at iteration {trainer.iteration} and "
                        f"schedule.train_iters={cfg.schedule.train_iters}")
        data_iterator = trainer.data_iterator(trainer.consumed_samples)
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
        gbs, train_iters = cfg.data.global_batch_size, cfg.schedule.train_iters

        def validate_now() -> None:
            start = time.perf_counter()
            metrics = trainer.evaluate()
            logger.log_validation({
                "iteration": trainer.iteration,
                "consumed_samples": trainer.consumed_samples,
                **metrics,
                "eval_time_s": time.perf_counter() - start,
            })

        eval_interval = cfg.evaluation.interval
        if eval_interval and trainer.iteration == 0:
            validate_now()  # the starting point of the curve: the converted AR model
        records = []
        while trainer.iteration < train_iters:
            iteration = trainer.iteration + 1
            watchdog.progress(trainer.iteration)
            heartbeat.beat()
            data_files.verify()
            start = time.perf_counter()
            dump_now = iteration == 1 and cfg.debug.dump_first_batch is not None
            result = trainer.forward_backward(data_iterator, record_first=dump_now)
            loss = result.diffusion_loss + result.align_loss
            if not math.isfinite(loss):
                raise TrainingError(
                    f"iteration {iteration}: loss is {loss} (diffusion {result.diffusion_loss}, "
                    f"align {result.align_loss}); lower optimizer.lr or check the data. "
                    "No checkpoint was written for this iteration."
                )
            grad_norm, lr = trainer.optimizer_step()
            step_time = time.perf_counter() - start
            if dump_now:
                dump = trainer.step.first_microbatch_dump()
                if rank0:
                    torch.save(dump, cfg.debug.dump_first_batch)
            record = {
                "iteration": iteration,
                "loss": loss,
                "diffusion_loss": result.diffusion_loss,
                "align_loss": result.align_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "step_time_s": step_time,
                "tokens_per_s": gbs * cfg.model.seq_length / step_time,
            }
            if trainer.teacher is not None:
                record["align_cos"] = result.align_cos
            if result.teacher_loss is not None:
                record["teacher_loss"] = result.teacher_loss
            records.append(record)
            if iteration % cfg.logging.log_interval == 0 or iteration == train_iters:
                logger.log(record, train_iters)
            if eval_interval and (iteration % eval_interval == 0 or iteration == train_iters):
                validate_now()
            interval = cfg.checkpoint.save_interval
            signalled = stop.requested()
            if cfg.checkpoint.save and (
                iteration == train_iters or signalled or (interval and iteration % interval == 0)
            ):
                try:
                    logger.info(f"> saved checkpoint {trainer.save()}")
                except CheckpointError as err:
                    if cfg.checkpoint.on_save_failure == "stop" or iteration == train_iters:
                        raise
                    logger.info(f"> WARNING: {err}; training continues "
                                "(checkpoint.on_save_failure=continue)")
            if signalled:
                logger.info(f"> {stop.received or 'a signal on another rank'}: stopping after "
                            f"iteration {iteration}")
                break
        return records


def user_errors() -> tuple:
    """Errors the user must act on: reported in one line, never retried by a restart."""
    from megalign.checkpoint import CheckpointError
    from megalign.data.indexed import DataError

    return TrainingError, ConfigError, DataError, CheckpointError


def _attempt(cfg: Config, tokenizer, store) -> None:
    """One attempt under in-process restart: errors a restart cannot fix end the wrapper."""
    from megalign.training.inprocess import Unrecoverable

    try:
        run(cfg, tokenizer, store)
    except user_errors() as err:
        raise Unrecoverable(err) from err


def main(argv=None) -> int:
    from megalign import distributed
    from megalign.checkpoint import first_line
    from megalign.training import inprocess, watchdog

    faulthandler.enable()  # a SIGBUS/SIGSEGV still says where
    args = parse_args(argv)
    launch = distributed.launch_env()
    try:
        cfg, tokenizer = load_and_validate(args, launch.world_size)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"megalign-train: error: {err}", file=sys.stderr)
        return 2
    if launch.rank == 0:
        os.makedirs(cfg.logging.run_dir, exist_ok=True)
        with open(os.path.join(cfg.logging.run_dir, "config.yaml"), "w", encoding="utf-8") as handle:
            import yaml

            yaml.safe_dump(to_dict(cfg), handle, sort_keys=False)
    try:
        if cfg.resilience.inprocess_restart:
            inprocess.restartable(cfg, partial(_attempt, cfg, tokenizer))()
        else:
            run(cfg, tokenizer)
    except (*user_errors(), inprocess.Unrecoverable, inprocess.RestartsExhausted) as err:
        err = getattr(err, "error", err)
        print(f"megalign-train: error on rank {launch.rank}: {err}", file=sys.stderr, flush=True)
        watchdog.publish_failure(str(err))
        return 1
    except Exception as err:
        if not watchdog.is_communication_error(err):  # a bug: tell the others, keep the traceback
            watchdog.publish_failure(f"{type(err).__name__}: {err}")
            raise
        print(f"megalign-train: error on rank {launch.rank}: a distributed call failed "
              f"({first_line(err)}); when another rank died or stalled, the watchdog or its own "
              f"log names it (collective timeout: resilience.collective_timeout_minutes="
              f"{cfg.resilience.collective_timeout_minutes:g})", file=sys.stderr, flush=True)
        watchdog.await_verdict()  # names the failed rank and exits, within failure_timeout_s
        return 1
    finally:
        watchdog.stop()
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
