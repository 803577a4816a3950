"""The frozen AR teacher: the student's architecture with causal attention, sharded like it.

Stage k of the teacher holds the same layers and TP shards as stage k of the student (the same
virtual-stage chunks under interleaving) and is loaded from the same AR weights. It is never
wrapped in DDP nor given to the optimizer, runs in eval mode under ``no_grad`` on the clean tokens,
and skips the LM head: its decoder keeps the final norm (an aligned state) but ``GPTModel``'s
post-processing (output layer, logits) is switched off, unless ``align.log_teacher_loss`` asks for
the teacher's AR loss on the supervised positions (a reference for the student's diffusion loss,
logged as ``teacher_loss``) or ``align.kd_weight`` for its logits (distillation: the last stage
hands the student's loss its vocabulary shard of them).

``align.teacher_microbatches: g`` runs it once per group of g consecutive micro-batches, on
their concatenation: the same arithmetic per sample, but a g-th of the forwards, kernel launches
and TP all-reduces, for holding this stage's aligned teacher states for g micro-batches and a g
times longer teacher forward in the group's first forward step, which lengthens the pipeline's
fill. Where per-forward costs dominate and stages share cores (the 2-CPU TP2xPP2 bench) g = 4 cut
the step's extra time by half; where each stage has a core of its own the longer fill costs more
than it saves (SmolLM2 on TP1xPP2, one core per stage as GPUs would be: 1.20x with g = 1, 1.36x
with g = 4), hence the default of 1.

Not ``inference_mode``, although it measured 6-7% less CPU per teacher forward: the teacher runs
first in every forward step, so whatever Megatron-Core or Transformer Engine allocate lazily and
share across models (e.g. Megatron-Core's global memory buffer) would be born an inference tensor
that the student's training forward may not write in place. That, and FP8 tensor subclasses under
inference mode, cannot be tested without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state

from megalign.align.distill import cross_entropy, vocab_shard
from megalign.align.teacher_stream import TeacherStream
from megalign.config import AlignConfig, Config
from megalign.diffusion.objective import DiffusionBatch
from megalign.model import memory
from megalign.model.attention import concatenated
from megalign.model.gpt import ModelBuild, build_chunks
from megalign.model.hidden_states import HiddenStateRecorder


@dataclass
class TeacherOutput:
    states: dict[int, torch.Tensor]  # the aligned states on this chunk
    token_loss: Optional[torch.Tensor]  # [b, s] AR cross-entropy (log_teacher_loss, last stage)
    # [b, s, V / TP] (packed: [1, b·s, V / TP]) the logits' shard (align.kd_weight, last stage)
    logits: Optional[torch.Tensor] = None


def teacher_dtype(align: AlignConfig, precision: str, gpu: bool) -> torch.dtype:
    """The frozen teacher's dtype: ``align.teacher_dtype``, whose "auto" is bf16 wherever the
    student (``precision``) is and on every GPU (``gpu``)."""
    if align.teacher_dtype == "auto":
        return torch.bfloat16 if precision != "fp32" or gpu else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[align.teacher_dtype]


def teacher_build(cfg: Config) -> ModelBuild:
    """The run's teacher: its AR model with causal attention, in ``align.teacher_dtype``, with FP8
    GEMMs only under ``fp8.teacher``."""
    return ModelBuild.of(cfg, causal=True,
                         params_dtype=teacher_dtype(cfg.align, cfg.precision,
                                                    gpu=torch.cuda.is_available()),
                         fp8=cfg.precision == "fp8" and cfg.fp8.teacher)


class Teacher:
    """The teacher's model chunks on this rank (one per virtual pipeline stage), built as
    ``build`` says (``teacher_build``); the last stage keeps the LM head for the AR ``loss``
    (logged) and to hand on its ``logits`` (distillation)."""

    def __init__(self, build: ModelBuild, vocab_size: int, ar_state_dicts: list[dict],
                 aligned: set[int], loss: bool = False, logits: bool = False):
        self.dtype = build.params_dtype
        self.chunks = build_chunks(build, vocab_size)
        self.sends_output = [not chunk.post_process for chunk in self.chunks]
        self.computes_loss = [chunk.post_process and loss for chunk in self.chunks]
        self.hands_logits = [chunk.post_process and logits for chunk in self.chunks]
        heads = [computes or hands for computes, hands in zip(self.computes_loss,
                                                              self.hands_logits)]
        for chunk, state, keeps_head in zip(self.chunks, ar_state_dicts, heads):
            chunk.load_state_dict(state, strict=True)
            if not keeps_head:  # hidden states only: no output layer, no logits
                chunk.post_process = False
                chunk.output_layer = None
            chunk.requires_grad_(False)
            chunk.eval()
        self.recorders = [HiddenStateRecorder(chunk, aligned) for chunk in self.chunks]
        pipeline = parallel_state.get_pipeline_model_parallel_world_size() > 1
        self.stream = TeacherStream() if pipeline else None
        parallel = build.parallel
        sp = parallel.sequence_parallel
        self._sequence_divisor = parallel.tensor_model_parallel_size if sp else 1
        self._hidden = build.model.hidden_size

    def share_frozen(self, students: list) -> tuple[list[str], list[str]]:
        """Make every teacher parameter whose student counterpart is frozen (``optimizer.freeze``)
        that very tensor, so it is held once: the published recipe freezes the word embedding
        (and its tied output copy), for Qwen3-0.6B a quarter of the parameters. Returns (names
        shared, names frozen but kept apart because the dtypes differ, e.g. an fp32 student with a
        bf16 teacher). Called once the student is wrapped (its tensors final). A frozen tensor is
        the AR weight except the word embedding's mask row, which the student initialised: the
        teacher reads clean tokens only, so it never looks that row up (unless the corpus itself
        encodes to the mask id)."""
        shared, apart = [], []
        for teacher_chunk, student_chunk in zip(self.chunks, students):
            theirs = dict(student_chunk.named_parameters())
            for name, param in list(teacher_chunk.named_parameters()):
                student_param = theirs.get(name)
                if student_param is None or student_param.requires_grad:
                    continue
                if student_param.dtype != param.dtype or student_param.shape != param.shape:
                    apart.append(name)
                    continue
                module_name, _, attribute = name.rpartition(".")
                teacher_chunk.get_submodule(module_name)._parameters[attribute] = student_param
                shared.append(name)
        return shared, apart

    def parameters(self):
        for chunk in self.chunks:
            yield from chunk.parameters()

    @torch.no_grad()
    def forward(self, batches: list[DiffusionBatch], chunk: int = 0) -> list[TeacherOutput]:
        """Run this chunk's teacher layers once on the clean tokens of ``batches`` (consecutive
        micro-batches, concatenated along the batch dimension); one output per micro-batch."""
        model = self.chunks[chunk]
        sizes = [batch.clean_tokens.shape[0] for batch in batches]
        length = batches[0].clean_tokens.shape[1]
        packed = batches[0].packed is not None  # one row of all the samples, as THD
        documents = concatenated([b.packed for b in batches]) if packed else None

        def joined(tensors):  # [b, s] per micro-batch -> [Σb, s], or [1, Σb·s] packed
            whole = torch.cat(tensors)
            return whole.reshape(1, -1) if packed else whole

        tokens = joined([batch.clean_tokens for batch in batches])
        if not model.pre_process:
            shape = (tokens.shape[1] // self._sequence_divisor, tokens.shape[0], self._hidden)
            model.set_input_tensor(self.stream.recv(shape, self.dtype, tokens.device))
        mask = (None if batches[0].teacher_mask is None
                else torch.cat([b.teacher_mask for b in batches]))
        labels = (joined([b.sequence_labels for b in batches]) if self.computes_loss[chunk]
                  else None)
        with self.recorders[chunk].recording_scope() as recorded:
            output = model(tokens, joined([b.sequence_positions for b in batches]), mask,
                           labels=None if self.hands_logits[chunk] else labels,
                           packed_seq_params=documents)
        if self.sends_output[chunk]:
            self.stream.send(output)
        logits = [None] * len(batches)
        if self.hands_logits[chunk]:  # the output is the logits' shard
            logits = output.split([b * (length if packed else 1) for b in sizes],
                                  dim=1 if packed else 0)
            if labels is not None:
                output = cross_entropy(output, labels, *vocab_shard(output.shape[-1]))
        if packed:  # [Σb·s, 1, h]: each micro-batch's rows in turn (/TP under SP: one batch)
            rows = [b * length // self._sequence_divisor for b in sizes]
            states = {index: state.split(rows, dim=0) for index, state in recorded.items()}
            token_losses = ([part.view(b, length) for part, b in
                             zip(output.split([b * length for b in sizes], dim=1), sizes)]
                            if labels is not None else [None] * len(batches))
        else:
            states = {index: state.split(sizes, dim=1)  # [s, b, h] per micro-batch
                      for index, state in recorded.items()}
            token_losses = output.split(sizes) if labels is not None else [None] * len(batches)
        return [TeacherOutput({index: parts[i] for index, parts in states.items()}, token_losses[i],
                              logits[i])
                for i in range(len(batches))]

    def finish_step(self) -> None:
        if self.stream is not None:
            self.stream.wait()


# ----------------------------------------------------------------------------- bytes per rank


def planned_parameter_bytes(cfg: Config, table: list[tuple[str, int]], frozen: set[str],
                            student_element: int, gpu: bool) -> tuple[int, list[str]]:
    """(bytes, notes) of this stage's teacher weights: the student's table (name, elements on
    one rank) in the teacher's dtype, without the LM head unless ``align.log_teacher_loss``, and
    net of the ``frozen`` student tensors it shares (``align.share_frozen``, same dtype only)."""
    element = teacher_dtype(cfg.align, cfg.precision, gpu).itemsize
    head = 0 if cfg.align.log_teacher_loss or cfg.align.kd_weight else sum(
        n for name, n in table if name == "output_layer.weight")
    shared, notes = 0, []
    if cfg.align.share_frozen and element == student_element:
        shared = sum(n for name, n in table if name in frozen and name != "output_layer.weight")
    elif cfg.align.share_frozen and frozen:
        notes.append("frozen tensors not shared: the teacher's dtype differs")
    return (sum(n for _, n in table) - head - shared) * element, notes


def planned_state_bytes(cfg: Config, stage: int, held: int, gpu: bool) -> int:
    """The aligned teacher states stage ``stage`` keeps until each micro-batch's backward: one per
    aligned hidden state its chunks produce, for the ``held`` micro-batches in flight and the rest
    of a teacher group (``align.teacher_microbatches``), each this rank's positions (a CP rank's
    share, a TP rank's under SP) in the teacher's dtype, plus their fp32 copies for the cosine
    under mixed precision."""
    m, p = cfg.model, cfg.parallel
    sp = p.tensor_model_parallel_size if p.sequence_parallel else 1
    positions = memory.student_build(cfg).streams * m.seq_length // p.context_parallel_size
    per_state = positions * cfg.data.micro_batch_size * m.hidden_size // sp
    element = teacher_dtype(cfg.align, cfg.precision, gpu).itemsize
    state = per_state * element + (2 * per_state * memory.FP32 if cfg.precision != "fp32" else 0)
    aligned = set(range(m.num_layers + 1) if cfg.align.layers is None
                  else cfg.align.layers)  # zero-weight layers are recorded too
    vpp = p.virtual_pipeline_model_parallel_size or 1
    states = sum(1 for c in range(vpp) for i in aligned
                 if i in memory.stage_states(cfg, stage, c)) / vpp
    return int(states * (held + cfg.align.teacher_microbatches - 1) * state)


def planned_score_bytes(cfg: Config, gpu: bool) -> int:
    """The scores of one teacher forward in the local spec's attention: a group of micro-batches,
    this rank's query rows of the clean sequence against all of its keys."""
    rows = cfg.model.seq_length // cfg.parallel.context_parallel_size
    return memory.attention_score_bytes(
        cfg, cfg.align.teacher_microbatches * cfg.data.micro_batch_size, rows,
        cfg.model.seq_length, teacher_dtype(cfg.align, cfg.precision, gpu).itemsize)


def planned_logit_bytes(cfg: Config, vocab_size: int, gpu: bool) -> int:
    """Distillation's bytes on the last stage: the teacher's logits (this rank's vocabulary
    shard) for a group of micro-batches in its dtype, their copy for the second stream under
    block diffusion or the hybrid objective, and the KL's fp32 workspace: the student's and the
    teacher's distributions (q and p), which its backward keeps."""
    p, m = cfg.parallel, cfg.model
    rows = m.seq_length // p.context_parallel_size * cfg.data.micro_batch_size
    shard = vocab_size // p.tensor_model_parallel_size
    element = teacher_dtype(cfg.align, cfg.precision, gpu).itemsize
    streams = memory.student_build(cfg).streams
    group = cfg.align.teacher_microbatches * rows * shard * element
    return group + streams * rows * shard * ((element if streams == 2 else 0) + 2 * memory.FP32)
