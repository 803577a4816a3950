"""Bytes per rank of a training run, planned from its config before anything is allocated.

Why: a conversion holds a student (weights, fp32 gradients, Adam states), a frozen teacher and the
activations of the micro-batches the pipeline schedule keeps in flight; whether that fits on a GPU
should be known before a multi-node job queues, not after it runs out of memory. Megatron-LM
prints a theoretical estimate for plain pretraining; this one also counts the teacher (net of the
frozen tensors it shares with the student), the aligned teacher states held until each micro-batch's
backward, block diffusion's two streams, the causal scorer of generated samples, evaluation's
working memory between steps and, on CPU, the attention's scores and their gradients in the
backward.

The plan asks each component for its own bytes: the model chunks (``megalign.model.memory``:
parameters, activations, masks, scores, logits), the teacher (``megalign.align.teacher``), the
optimizer (``megalign.training.optimizer``) and evaluation (``megalign.evaluation.memory``);
what it owns itself is the pipeline schedule's rule for how many micro-batches are in flight, and
that evaluation runs between steps: a stage's peak is what it always holds plus the larger of a
step's working memory and evaluation's. Every rank of one pipeline stage holds the same amounts,
so the plan is per stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megalign.align import teacher
from megalign.config import Config
from megalign.evaluation import memory as evaluation
from megalign.model import memory
from megalign.training import optimizer

ITEMS = {  # key: what a reader sees
    "student_parameters": "student parameters",
    "gradients": "gradients (fp32 DDP buffer, trainable only)",
    "optimizer_states": "optimizer (Adam moments, fp32 main weights under bf16)",
    "teacher_parameters": "teacher parameters (net of shared frozen tensors)",
    "scorer_parameters": "causal scorer of generated samples",
    "activations": "activations of the micro-batches in flight",
    "teacher_states": "aligned teacher states held for the backward",
    "distillation": "teacher logits and the KL's workspace (distillation, last stage)",
    "loss_workspace": "logits' softmax and gradient (last stage)",
    "score_buffer": "attention score buffer (local spec, kept between steps)",
    "attention_backward": "attention backward's score gradients (local spec, one layer)",
    "evaluation": "evaluation's logits, between steps (in the total if above a step's)",
}
# a training step's working memory, freed before evaluation runs
STEP_ITEMS = ("activations", "teacher_states", "distillation", "loss_workspace",
              "attention_backward")
WIDTH = max(map(len, ITEMS.values()))


@dataclass
class StageMemory:
    """One pipeline stage's bytes per rank (every TP / DP rank of the stage holds the same)."""

    stage: int
    bytes: dict[str, int]
    parameters: int  # student elements on one rank
    trainable: int
    in_flight: int  # micro-batches (chunks' when interleaved) whose activations are held
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The peak: what the stage always holds, plus the larger of a training step's working
        memory and evaluation's (which runs between steps)."""
        step = sum(v for k, v in self.bytes.items() if k in STEP_ITEMS)
        held = sum(v for k, v in self.bytes.items() if k not in STEP_ITEMS and k != "evaluation")
        return held + max(step, self.bytes.get("evaluation", 0))


def in_flight(cfg: Config, stage: int, microbatches: int) -> int:
    """Chunk-micro-batches whose activations stage ``stage`` holds at its peak under 1F1B:
    Megatron-Core's warm-up forwards plus the steady state's one."""
    p = cfg.parallel
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    if pp == 1:
        return 1
    if vpp is None:
        return min(pp - stage, microbatches)
    warmup = (pp - stage - 1) * 2 + (vpp - 1) * pp
    return min(warmup + 1, microbatches * vpp)


def plan(cfg: Config, vocab_size: int, world_size: int, gpu: bool) -> list[StageMemory]:
    """Bytes per rank for each pipeline stage of ``cfg`` on ``world_size`` ranks (``gpu``:
    Transformer Engine's attention, and the teacher's "auto" dtype is bf16)."""
    p, m = cfg.parallel, cfg.model
    dp = world_size // p.replica_size
    microbatches = cfg.data.global_batch_size // (cfg.data.micro_batch_size * dp)
    element = memory.BF16 if cfg.precision != "fp32" else memory.FP32  # weights, activations
    aligned, uses_teacher = cfg.align.weight > 0, cfg.align.uses_teacher
    positions = memory.student_build(cfg).streams * m.seq_length
    batch = cfg.data.micro_batch_size
    vpp = p.virtual_pipeline_model_parallel_size or 1
    stages = []
    for stage in range(p.pipeline_model_parallel_size):
        table = [entry for c in range(vpp)
                 for entry in memory.chunk_parameters(cfg, vocab_size, stage, c)]
        total = sum(n for _, n in table)
        frozen = {name for name, _ in table if optimizer.is_frozen(name, cfg)}
        trainable = total - sum(n for name, n in table if name in frozen)
        bytes_ = {"student_parameters": total * element,
                  "gradients": optimizer.gradient_bytes(trainable),
                  "optimizer_states": optimizer.state_bytes(cfg, table, dp)}
        notes = []
        if uses_teacher:
            bytes_["teacher_parameters"], notes = teacher.planned_parameter_bytes(
                cfg, table, frozen, element, gpu)
        scorer = evaluation.planned_scorer_bytes(cfg, total, element)
        if scorer:
            bytes_["scorer_parameters"] = scorer
        held = in_flight(cfg, stage, microbatches)
        layers = len(memory.chunk_layers(cfg, stage, 0))
        kept, recomputing = memory.chunk_activation_bytes(cfg, layers, positions, batch, element,
                                                          flash=gpu)
        mask = memory.attention_mask_bytes(cfg, positions, batch, gpu)
        bytes_["activations"] = held * (kept + mask) + recomputing
        if aligned:
            bytes_["teacher_states"] = teacher.planned_state_bytes(cfg, stage, held, gpu)
        last = stage == p.pipeline_model_parallel_size - 1
        if last:
            bytes_["loss_workspace"] = memory.loss_workspace_bytes(cfg, vocab_size, positions,
                                                                   batch)
            if cfg.align.kd_weight > 0:
                bytes_["distillation"] = teacher.planned_logit_bytes(cfg, vocab_size, gpu)
        if not gpu:  # Megatron-Core's global buffer for the local spec's attention scores:
            rows = positions // p.context_parallel_size  # one for student and teacher if they
            student = memory.attention_score_bytes(cfg, batch, rows, positions, element)
            teacher_scores = teacher.planned_score_bytes(cfg, gpu) if uses_teacher else 0
            same_dtype = teacher.teacher_dtype(cfg.align, cfg.precision, gpu).itemsize == element
            student = max(student, evaluation.planned_score_buffer_bytes(cfg, element))
            bytes_["score_buffer"] = (max(student, teacher_scores) if same_dtype  # share a dtype
                                      else student + teacher_scores)
            bytes_["attention_backward"] = memory.attention_backward_bytes(cfg, positions, batch)
        working = evaluation.planned_working_bytes(cfg, vocab_size, element, last)
        if working:
            bytes_["evaluation"] = working
        stages.append(StageMemory(stage, bytes_, total, trainable, held, notes))
    return stages


def describe(stages: list[StageMemory]) -> list[str]:
    """The plan as lines a user reads: per stage, each item and the total, in MiB."""
    lines = []
    for stage in stages:
        lines.append(f"stage {stage.stage}: {mib(stage.total)} per rank ({stage.parameters:,} "
                     f"student parameters, {stage.trainable:,} trainable; {stage.in_flight} "
                     "micro-batches in flight)")
        lines += [f"  {ITEMS[key]:<{WIDTH}} {mib(value):>12}" for key, value in stage.bytes.items()]
        lines += [f"  note: {note}" for note in stage.notes]
    return lines


def mib(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB"
