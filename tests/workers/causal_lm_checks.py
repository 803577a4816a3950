"""Multi-process worker for the causal-LM objective (``objective=ar``; run under torchrun).

On one layout, from the same initial weights (``model.init_checkpoint``) and global batch: the
next-token loss and the full-shape gradient of every parameter of one step, then the losses of
``--steps`` optimizer steps. Results go to --out.
"""

import json
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalign.model.gather import full_tensors
from megalign.training.trainer import setup

from common import arguments, config_and_tokenizer


def main():
    args = arguments(steps=3)
    cfg, tokenizer = config_and_tokenizer(args)
    trainer = setup(cfg, tokenizer, log=lambda message: None)
    params = full_tensors(trainer.students, "param")
    first = trainer.forward_backward(trainer.data_iterator())
    grads = full_tensors(trainer.students, "grad")
    iterator = trainer.data_iterator()
    losses = []
    for _ in range(args.steps):
        losses.append(trainer.forward_backward(iterator).diffusion_loss)
        trainer.optimizer_step()
    os.makedirs(args.out, exist_ok=True)
    if parallel_state.get_tensor_model_parallel_rank() == 0 and \
            parallel_state.get_data_parallel_rank() == 0:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        torch.save({"grads": grads, "params": params},
                   os.path.join(args.out, f"grads_stage{stage}.pt"))
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "summary.json"), "w") as handle:
            json.dump({"loss": first.diffusion_loss, "align_loss": first.align_loss,
                       "losses": losses}, handle)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
