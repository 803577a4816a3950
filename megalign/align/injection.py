"""Add a stage-local loss's gradient to the student's autograd graph on that stage.

On a pipeline stage, backward starts from the gradient received for the stage's output, so a loss
computed on the stage (the alignment term) is attached to that output: the output passes through
unchanged and, in backward, the loss receives ``scale`` as its upstream gradient. This is the
pattern of Megatron-Core's ``MoEAuxLossAutoScaler``; ``scale`` is what the schedule applies to the
main loss (1 / number of micro-batches, times the loss scale in fp16), and data-parallel averaging
is done by DDP for both.
"""

from __future__ import annotations

import torch


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor, scale: float):
        ctx.scale = scale
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        loss_grad = torch.full(
            ctx.loss_shape, ctx.scale, dtype=ctx.loss_dtype, device=grad_output.device
        )
        return grad_output, loss_grad, None


def attach_loss(output: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    return _AttachLoss.apply(output, loss, scale)
