"""Model weights on disk through ``megatron.core.dist_checkpointing`` (torch_dist format).

A checkpoint is written into ``<dir>.tmp`` and renamed to ``<dir>`` by rank 0 once every rank has
finished, so a directory with the final name is always complete. Loading goes through the model's
sharded state dict, so any TP/PP layout can read any other's checkpoint.
"""

from __future__ import annotations

import os
import shutil

import torch.distributed as dist
from megatron.core import dist_checkpointing


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read; the message names the directory."""


def _sharded_state_dict(chunks: list) -> dict:
    """Keys inside are global (layer numbers, TP offsets), so any layout can read any other's."""
    return {f"chunk{index}": chunk.sharded_state_dict() for index, chunk in enumerate(chunks)}


def save_model_weights(chunks: list, directory: str) -> None:
    temp = directory.rstrip("/") + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(temp, ignore_errors=True)
        os.makedirs(temp)
    dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(chunks), temp)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        os.replace(temp, directory)
    dist.barrier()


def load_model_weights(chunks: list, directory: str) -> None:
    if not os.path.isdir(directory) or not dist_checkpointing.check_is_distributed_checkpoint(directory):
        raise CheckpointError(
            f"'{directory}' is not a megalign/Megatron distributed checkpoint "
            "(model.init_checkpoint must name a directory written by megalign)"
        )
    try:
        state = dist_checkpointing.load(_sharded_state_dict(chunks), directory)
    except Exception as err:
        raise CheckpointError(
            f"checkpoint '{directory}' could not be loaded into this model: {err}"
        ) from None
    for index, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{index}"])
