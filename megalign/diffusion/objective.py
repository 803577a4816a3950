"""The masked-diffusion training example and its loss.

With the AR shift (default, as in Dream/DiffuLLaMA and the REPR-ALIGN reference) position ``i`` of
the student predicts token ``i+1``; position ``i`` is *supervised* when token ``i+1`` is masked
and is not the first token of a new packed document. Without the shift (MDLM/LLaDA) position ``i``
predicts its own token and is supervised when that token is masked.

The noise mask is drawn over the ``s+1`` tokens of a Megatron sample, so the last position's target
(token ``s``, never shown to the model) is supervised exactly when its mask bit is set.

Loss per micro-batch, as (sum, normaliser) so Megatron's schedule divides by the normaliser:
``none``  sum of CE over supervised positions / number of supervised positions;
``inv_t`` sum of CE/t over supervised positions / number of positions (MDLM ELBO per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megalign.config import Config
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.masking import sample_noise
from megalign.model.attention import attention_mask, document_ids


@dataclass
class DiffusionBatch:
    clean_tokens: torch.Tensor  # [b, s] the teacher's input
    input_tokens: torch.Tensor  # [b, s] the student's input (masked)
    labels: torch.Tensor  # [b, s]
    supervised: torch.Tensor  # [b, s] bool
    t: torch.Tensor  # [b]
    position_ids: torch.Tensor  # [b, s]
    student_mask: Optional[torch.Tensor]  # [b, 1, s, s] or None (full bidirectional)
    teacher_mask: Optional[torch.Tensor]  # [b, 1, s, s] or None (plain causal)
    sample_indices: torch.Tensor  # [b] global sample indices


def make_batch(
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    sample_indices: torch.Tensor,
    cfg: Config,
    vocab: Vocabulary,
    with_teacher: bool = False,
    noise: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> DiffusionBatch:
    """``tokens`` [b, s+1] clean sample tokens (Megatron sample with its extra token); ``noise``
    (t [b], mask [b, s+1]) replaces the training draw, e.g. for evaluation on a t grid."""
    d, eod, pad = cfg.diffusion, vocab.eod, vocab.pad
    seq = tokens.shape[1] - 1
    t, masked = (noise if noise is not None
                 else sample_noise(sample_indices, seq + 1, cfg.seed, d.eps))
    t, masked = t.to(tokens.device), masked.to(tokens.device)
    clean = tokens[:, :seq]
    input_tokens = torch.where(masked[:, :seq], torch.full_like(clean, vocab.mask), clean)
    if d.shift:
        labels = tokens[:, 1:]
        supervised = masked[:, 1:] & (clean != eod)  # next token starts a new document: no target
    else:
        labels = clean
        supervised = masked[:, :seq].clone()
    if pad != eod:
        supervised &= labels != pad
    student_mask = teacher_mask = None
    if cfg.model.document_attention:
        docs = document_ids(clean, eod)
        student_mask = attention_mask(docs, causal=False)
        teacher_mask = attention_mask(docs, causal=True) if with_teacher else None
    return DiffusionBatch(
        clean_tokens=clean,
        input_tokens=input_tokens,
        labels=labels.contiguous(),
        supervised=supervised,
        t=t,
        position_ids=position_ids,
        student_mask=student_mask,
        teacher_mask=teacher_mask,
        sample_indices=sample_indices,
    )


def loss_terms(
    per_token_ce: torch.Tensor, batch: DiffusionBatch, weighting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, normaliser) for one micro-batch; ``per_token_ce`` is [b, s] float."""
    weights = batch.supervised.to(per_token_ce.dtype)
    if weighting == "inv_t":
        weights = weights / batch.t.to(per_token_ce.dtype).unsqueeze(1)
        count = torch.tensor(batch.supervised.numel(), device=per_token_ce.device)
    else:
        count = batch.supervised.sum()
    return (per_token_ce.float() * weights.float()).sum(), count.to(torch.int)
