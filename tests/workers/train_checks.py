"""Multi-process worker for the equivalence and alignment tests (run under torchrun).

On one layout it computes, from the same AR weights (``model.init_checkpoint``) and global batch:
the plain diffusion step (no teacher) and the REPR-ALIGN step, each with its loss terms and the
full-shape gradient of every student parameter; the p2p bytes of each; the teacher's state before
and after three optimizer steps, and which of its tensors are the student's; and the losses of
those steps. Rank results go to --out.
"""

import json
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalign.model.gather import full_tensors
from megalign.telemetry.p2p import count_p2p
from megalign.training.step import DiffusionStep
from megalign.training.trainer import setup

from common import arguments, config_and_tokenizer


def result_dict(result):
    return {"diffusion_loss": result.diffusion_loss, "align_loss": result.align_loss,
            "align_cos": result.align_cos, "teacher_loss": result.teacher_loss,
            "moe_aux_loss": result.moe_aux_loss}


def main():
    args = arguments(steps=3)
    cfg, tokenizer = config_and_tokenizer(args)
    trainer = setup(cfg, tokenizer, log=lambda message: None)
    students, teacher, step = trainer.students, trainer.teacher, trainer.step
    initial_params = full_tensors(students, "param")
    plain = DiffusionStep(cfg, students, None, step.layer_weights, step.vocab)

    with count_p2p() as plain_p2p:
        plain_result = trainer.forward_backward(trainer.data_iterator(), step=plain)
    plain_grads = full_tensors(students, "grad")
    with count_p2p() as align_p2p:
        align_result = trainer.forward_backward(trainer.data_iterator(), record_first=True)
    first = step.first.record
    align_grads = full_tensors(students, "grad")

    recorders_empty = not any(recorder.recording for recorder in step.recorders)
    teacher_before = [p.detach().clone() for p in teacher.parameters()]
    student_before = full_tensors(students, "param")
    iterator = trainer.data_iterator()
    losses = []
    for _ in range(args.steps):
        result = trainer.forward_backward(iterator)
        trainer.optimizer_step()
        losses.append(result.diffusion_loss + result.align_loss)
    teacher_after = list(teacher.parameters())
    optimizer_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    student_after = full_tensors(students, "param")
    trainable = set(full_tensors(students, "grad"))
    frozen = [name for name in student_after if name not in trainable]

    # teacher parameters that are the student's own tensors (align.share_frozen)
    shared = []
    for teacher_chunk, chunk in zip(teacher.chunks, students):
        theirs = {name: param.data_ptr() for name, param in chunk.named_parameters()}
        shared += [name for name, param in teacher_chunk.named_parameters()
                   if theirs.get(name) == param.data_ptr()]

    rank = dist.get_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    per_rank = {
        "teacher_unchanged": all(torch.equal(a, b) for a, b in zip(teacher_before, teacher_after)),
        "teacher_has_grad": any(p.grad is not None for p in teacher.parameters()),
        "teacher_requires_grad": any(p.requires_grad for p in teacher.parameters()),
        "teacher_in_optimizer": any(id(p) in optimizer_params for p in teacher.parameters()),
        "teacher_output_layer": any(c.output_layer is not None for c in teacher.chunks),
        "frozen": frozen,
        "teacher_shared": shared,
        "frozen_unchanged": all(torch.equal(student_before[k], student_after[k]) for k in frozen),
        "trainable_changed": all(not torch.equal(student_before[k], student_after[k])
                                 for k in trainable),
        "first_sample_indices": first["sample_indices"].tolist(),
        "first_input_tokens": first["input_tokens"].tolist(),
        "first_t": first["t"].tolist(),
        "plain_p2p": vars(plain_p2p),
        "align_p2p": vars(align_p2p),
        "pp_rank": pp_rank,
        "is_last_stage": parallel_state.is_pipeline_last_stage(),
        "teacher_stream_bytes": teacher.stream.bytes_sent if teacher.stream else 0,
        # nothing recorded during the backward pass (activation recomputation runs layers again)
        "recorders_empty_after_step": recorders_empty,
        "wrappers": [type(model.module).__name__ for model in trainer.models],
        "student_dtypes": sorted({str(p.dtype) for c in students for p in c.parameters()}),
        "main_param_dtypes": sorted({str(p.dtype) for group in trainer.optimizer.param_groups
                                     for p in group["params"]}),
        "teacher_dtypes": sorted({str(p.dtype) for p in teacher.parameters()}),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(per_rank, handle)
    if tp_rank == 0 and dp_rank == 0:
        torch.save({"plain": plain_grads, "align": align_grads, "params": initial_params},
                   os.path.join(args.out, f"grads_stage{pp_rank}.pt"))
    if rank == 0:
        with open(os.path.join(args.out, "summary.json"), "w") as handle:
            json.dump({"plain": result_dict(plain_result), "align": result_dict(align_result),
                       "losses": losses, "world_size": dist.get_world_size()}, handle)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
