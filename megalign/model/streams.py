"""Two-stream inputs: ``[noisy sequence; clean sequence]`` in one sequence (block diffusion, and the
hybrid AR + diffusion objective).

Learned absolute positions read the ``position_ids`` the batch gives (each stream numbered from
0); Megatron-Core's rotary embedding numbers positions by their index instead, which would place
the clean stream after the noisy one. ``use_stream_positions`` gives a two-stream student a
rotary embedding that, for a two-stream input (``position_ids`` whose second half repeats the
first), returns the first half's angles twice, so a noisy position and the clean one it mirrors
share their angle and the attention scores between streams depend on the true offset. A THD
micro-batch (``megalign.model.attention.packed_documents``) packs its samples one after the other
in one sequence: each sample gets the angles of positions 0..s-1, as in the masked layout (Megatron-
Core's unfused rotary embedding maps angles to packed positions when there are as many angles as
packed positions; Transformer Engine's fused one numbers each document from 0, which gives the
same attention, rotary embedding being relative). Any other input (the sampler's single stream,
the inference cache) gets Megatron's embedding unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch


def stream_count(block_length: Optional[int], seq_length: int,
                 next_token_stream: bool = False) -> int:
    """Positions per sequence position in a diffusion student's training input: 2 under block
    diffusion (blocks shorter than the sequence) or with the hybrid objective's next-token
    stream, else 1."""
    return 2 if next_token_stream or (block_length and block_length < seq_length) else 1


def is_two_stream(position_ids: torch.Tensor) -> bool:
    """``position_ids`` [b, 2s] whose second half repeats the first (a two-stream batch)."""
    length = position_ids.shape[-1]
    if length < 2 or length % 2:
        return False
    return torch.equal(position_ids[..., : length // 2], position_ids[..., length // 2 :])


class StreamRotaryEmbedding(torch.nn.Module):
    """Megatron-Core's rotary embedding, the first ``length`` positions' angles repeated: per
    stream when the input has two, per sample when a THD micro-batch packs several."""

    def __init__(self, rotary: torch.nn.Module):
        super().__init__()
        self.rotary = rotary
        self.length, self.repeats = 0, 1

    def forward(self, max_seq_len: int, *args, **kwargs) -> torch.Tensor:
        if self.repeats == 1:
            return self.rotary(max_seq_len, *args, **kwargs)
        once = self.rotary(self.length, *args, **kwargs)
        return torch.cat([once] * self.repeats, dim=0)

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return self.rotary.get_rotary_seq_len(*args, **kwargs)

    def get_cos_sin(self, *args, **kwargs):
        return self.rotary.get_cos_sin(*args, **kwargs)


def use_stream_positions(model: torch.nn.Module) -> None:
    """Give ``model`` (a ``GPTModel`` with rotary positions) the per-stream, per-sample rotary
    embedding."""
    model.rotary_pos_emb = StreamRotaryEmbedding(model.rotary_pos_emb)

    def note_streams(module, args, kwargs):
        positions = args[1] if len(args) > 1 else kwargs.get("position_ids")
        packed = kwargs.get("packed_seq_params")
        rotary = module.rotary_pos_emb
        rotary.length, rotary.repeats = 0, 1
        if packed is not None and positions is not None:  # samples of max_seqlen_q positions
            rotary.length = packed.max_seqlen_q
            rotary.repeats = positions.shape[-1] // packed.max_seqlen_q
        elif positions is not None and is_two_stream(positions):
            rotary.length, rotary.repeats = positions.shape[-1] // 2, 2

    model.register_forward_pre_hook(note_streams, with_kwargs=True)
