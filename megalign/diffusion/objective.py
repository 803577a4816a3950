"""The masked-diffusion training example and its loss.

With the AR shift (default, as in Dream/DiffuLLaMA and the REPR-ALIGN reference) position ``i`` of
the student predicts token ``i+1``; position ``i`` is *supervised* when token ``i+1`` is masked
and is not the first token of a new packed document. Without the shift (MDLM/LLaDA) position ``i``
predicts its own token and is supervised when that token is masked.

The noise mask is drawn over the ``s+1`` tokens of a Megatron sample, so the last position's target
(token ``s``, never shown to the model) is supervised exactly when its mask bit is set.

Block diffusion (``diffusion.block_length: B``, BD3-LM's vectorised form) feeds the student two
streams in one sequence, ``[noisy; clean]`` (``2s`` positions, each stream numbered from 0).
Blocks are ``B`` positions counted from each document's start. A noisy position attends its own
noisy block and the clean earlier blocks; a clean position attends the clean blocks up to its own
(block-causal); nothing attends the noisy stream from the clean one. With the AR shift the token
that opens a block is predicted where the sampler predicts it, from the last clean position of the
block before (which does not see the noisy block); every other masked token from the noisy
position before it. The teacher and the alignment see the clean sequence and the noisy stream's
supervised positions, as in full-sequence training. A block as long as the sequence is the whole
sequence: one stream, exactly plain masked diffusion.

Loss per micro-batch, as (sum, normaliser) so Megatron's schedule divides by the normaliser:
``none``  sum of CE over supervised positions / number of supervised positions;
``inv_t`` sum of CE/t over supervised positions / number of positions (MDLM ELBO per token);
``path``  sum of (1 + sg(p))·CE over supervised positions / number of supervised positions, with
          p = exp(−CE) the probability of the target and sg a stop-gradient: the mean CE plus the
          "path" term of the REPR-ALIGN reference code's Qwen3 path (L_mdm + L_path, L_path =
          Σ sg(p_i)·CE_i / |V|), whose gradient leans on the positions the student already gets
          right. Per position, so every layout computes it where it computes the CE.

The hybrid objective (``diffusion.ar_loss_weight``, NVIDIA's ar_to_dlm recipe for Nemotron-Labs-
Diffusion) adds the student's own next-token loss in training: the input is ``[noisy; clean]``
again, the noisy stream attending only itself (as in plain masked diffusion, per document) and the
clean stream only itself, causally (per document); the noisy stream's supervised positions carry
the diffusion CE, the clean stream's positions with a next token in their document the next-token
CE. One loss for both, as Megatron-Bridge's ar_to_dlm step computes it: (dlm_loss_weight x the
diffusion sum + ar_loss_weight x the next-token sum) / (the diffusion normaliser + the next-token
positions). Evaluation and sampling read the noisy stream's model alone (one stream).

``objective: ar`` (causal-LM pretraining of the same model) fills the same batch with the clean
tokens as input, every position supervised whose next token belongs to its document, and the
causal (per-document) mask: the plain next-token loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megalign.config import Config, DiffusionConfig
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.masking import anneal_fraction, open_future, sample_noise
from megalign.model.attention import attention_mask, document_ids, packed_documents
from megalign.model.context_parallel import on_rank
from megalign.model.gpt import packs_documents
from megalign.model.streams import stream_count


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
    aligned: Optional[torch.Tensor] = None  # [b, s·streams] positions aligned with the teacher
    streams: int = 1  # 2: block diffusion's [noisy; clean] student input (2s positions)
    # the documents as THD (student and teacher alike; then no masks): the model takes the
    # micro-batch flattened to [1, b·s] (``as_model_takes``); the batch itself stays [b, s]
    packed: Optional[PackedSeqParams] = None
    # the hybrid objective: [b, 2s] the clean stream's positions trained on their next token, and
    # the weights of the two terms (``diffusion.dlm_loss_weight``, ``diffusion.ar_loss_weight``)
    next_token: Optional[torch.Tensor] = None
    dlm_weight: float = 1.0
    ar_weight: float = 0.0

    def __post_init__(self):
        if self.aligned is None:
            self.aligned = self.supervised

    def as_model_takes(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """A per-position [b, s] tensor as the model takes it: [1, b·s] with packed documents."""
        return tensor if self.packed is None or tensor is None else tensor.reshape(1, -1)

    def for_context_rank(self, cp_size: int, rank: int) -> "DiffusionBatch":
        """The part of this batch a context-parallel rank holds: its positions of every
        per-position tensor and its rows of the masks, whose columns stay the whole sequence's
        (``megalign.model.context_parallel``). The noise was drawn for the whole sequence, so
        the ranks together train on exactly the unsplit batch."""
        if cp_size == 1:
            return self
        if self.streams != 1 or self.packed is not None:
            raise ValueError("block diffusion's two streams and packed documents are not split "
                             "over context ranks")

        def part(tensor, dim=1):
            return None if tensor is None else on_rank(tensor, dim, cp_size, rank)

        return replace(self, clean_tokens=part(self.clean_tokens),
                       input_tokens=part(self.input_tokens), labels=part(self.labels),
                       supervised=part(self.supervised), position_ids=part(self.position_ids),
                       aligned=part(self.aligned), student_mask=part(self.student_mask, 2),
                       teacher_mask=part(self.teacher_mask, 2))

    @property
    def sequence_labels(self) -> torch.Tensor:
        """[b, s] the labels of the sequence (the teacher's)."""
        return self.labels[:, : self.clean_tokens.shape[1]]

    @property
    def sequence_positions(self) -> torch.Tensor:
        """[b, s] the position ids of the sequence (the teacher's)."""
        return self.position_ids[:, : self.clean_tokens.shape[1]]

    @property
    def supervised_targets(self) -> torch.Tensor:
        """[b, s] the supervised positions of the sequence, whichever stream predicts them."""
        if self.streams == 1:
            return self.supervised
        noisy, clean = self.supervised.chunk(2, dim=1)
        return noisy | clean


@dataclass(frozen=True)
class MaskedDiffusion:
    """What making an example needs of the run config: the diffusion settings, the seed the
    noise is drawn from, whether attention stays inside packed documents, the sequence length and
    the samples per step (the annealing schedule counts samples)."""

    diffusion: DiffusionConfig
    seed: int
    document_attention: bool
    seq_length: int
    samples_per_step: int
    packed: bool = False  # the documents as THD instead of masks (``packs_documents``)

    @classmethod
    def of(cls, cfg: Config) -> "MaskedDiffusion":
        return cls(cfg.diffusion, cfg.seed, cfg.model.document_attention, cfg.model.seq_length,
                   cfg.data.global_batch_size, packs_documents(cfg))

    @property
    def streams(self) -> int:
        return streams(self.diffusion, self.seq_length)


def streams(diffusion: DiffusionConfig, seq_length: int) -> int:
    """Positions per sequence position in the student's training input: 2 under block diffusion
    and the hybrid objective."""
    return stream_count(diffusion.block_length, seq_length, diffusion.ar_loss_weight > 0)


def block_diffusion(diffusion: DiffusionConfig, seq_length: int) -> bool:
    """Whether the student is trained (and decodes) in blocks shorter than the sequence."""
    return stream_count(diffusion.block_length, seq_length) == 2


def make_batch(
    tokens: torch.Tensor,
    position_ids: torch.Tensor,
    sample_indices: torch.Tensor,
    objective: MaskedDiffusion,
    vocab: Vocabulary,
    with_teacher: bool = False,
    noise: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    training: bool = False,
    response: Optional[torch.Tensor] = None,
) -> DiffusionBatch:
    """``tokens`` [b, s+1] clean sample tokens (Megatron sample with its extra token); ``noise``
    (t [b], mask [b, s+1]) replaces the training draw, e.g. for evaluation on a t grid.
    ``training``: the student's input is its training sample's: attention annealed under
    ``diffusion.anneal_iters``, the next-token stream under ``diffusion.ar_loss_weight``;
    otherwise the final model's (evaluation: bidirectional, one stream).
    ``response`` [b, s+1] (diffusion SFT): only these tokens are noised, so only they are
    supervised; the prompt stays clean."""
    d, eod, pad = objective.diffusion, vocab.eod, vocab.pad
    seq = tokens.shape[1] - 1
    t, masked = (noise if noise is not None
                 else sample_noise(sample_indices, seq + 1, objective.seed, d.eps))
    t, masked = t.to(tokens.device), masked.to(tokens.device)
    if response is not None:
        masked = masked & response.to(tokens.device)
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
    student_mask = teacher_mask = packed = None
    if objective.document_attention and objective.packed:
        packed = packed_documents(document_ids(clean, eod))
    elif objective.document_attention:
        docs = document_ids(clean, eod)
        student_mask = attention_mask(docs, causal=False)
        teacher_mask = attention_mask(docs, causal=True) if with_teacher else None
    if training and d.anneal_iters:
        fractions = anneal_fraction(sample_indices, d.anneal_iters, objective.samples_per_step)
        later = torch.ones(seq, seq, dtype=torch.bool).triu(1)
        closed = (later & ~open_future(sample_indices, fractions, seq, objective.seed)).unsqueeze(1)
        closed = closed.to(tokens.device)
        student_mask = closed if student_mask is None else student_mask | closed
    if block_diffusion(d, objective.seq_length):
        return _two_streams(clean, input_tokens, labels.contiguous(), supervised, t, position_ids,
                            teacher_mask, sample_indices, objective, eod)
    batch = DiffusionBatch(
        clean_tokens=clean,
        input_tokens=input_tokens,
        labels=labels.contiguous(),
        supervised=supervised,
        t=t,
        position_ids=position_ids,
        student_mask=student_mask,
        teacher_mask=teacher_mask,
        sample_indices=sample_indices,
        packed=packed,
    )
    if training and d.ar_loss_weight:
        return _with_next_token_stream(batch, tokens, vocab, objective, response)
    return batch


def causal_lm_batch(tokens: torch.Tensor, position_ids: torch.Tensor, sample_indices: torch.Tensor,
                    vocab: Vocabulary, document_attention: bool,
                    packed: bool = False) -> DiffusionBatch:
    """The next-token example of ``objective: ar``: ``tokens`` [b, s+1] as in ``make_batch``; the
    supervised positions are those of the diffusion objective with every token masked
    (``packed``: the documents as THD)."""
    seq = tokens.shape[1] - 1
    clean, labels = tokens[:, :seq], tokens[:, 1:].contiguous()
    supervised = clean != vocab.eod
    if vocab.pad != vocab.eod:
        supervised &= labels != vocab.pad
    mask = documents = None
    if document_attention and packed:
        documents = packed_documents(document_ids(clean, vocab.eod))
    elif document_attention:
        mask = attention_mask(document_ids(clean, vocab.eod), causal=True)
    return DiffusionBatch(clean_tokens=clean, input_tokens=clean, labels=labels,
                          supervised=supervised,
                          t=torch.ones(tokens.shape[0], device=tokens.device),
                          position_ids=position_ids, student_mask=mask, teacher_mask=None,
                          sample_indices=sample_indices, packed=documents)


def _two_streams(clean, noisy, labels, supervised, t, position_ids, teacher_mask, sample_indices,
                 objective: MaskedDiffusion, eod: int) -> DiffusionBatch:
    """The block-diffusion example (see the module docstring)."""
    block_length = objective.diffusion.block_length
    blocks = position_ids // block_length
    if objective.diffusion.shift:
        opens_block = (position_ids + 1) % block_length == 0  # the target starts the next block
        from_noisy, from_clean = supervised & ~opens_block, supervised & opens_block
    else:
        from_noisy, from_clean = supervised, torch.zeros_like(supervised)
    if objective.document_attention:
        docs = document_ids(clean, eod)
        same = docs.unsqueeze(2) == docs.unsqueeze(1)
    else:
        same = torch.ones(*clean.shape, clean.shape[1], dtype=torch.bool, device=clean.device)
    query, key = blocks.unsqueeze(2), blocks.unsqueeze(1)
    noisy_rows = torch.cat([same & (key == query), same & (key < query)], dim=2)
    clean_rows = torch.cat([torch.zeros_like(same), same & (key <= query)], dim=2)
    allowed = torch.cat([noisy_rows, clean_rows], dim=1)
    return DiffusionBatch(
        clean_tokens=clean,
        input_tokens=torch.cat([noisy, clean], dim=1),
        labels=torch.cat([labels, labels], dim=1),
        supervised=torch.cat([from_noisy, from_clean], dim=1),
        t=t,
        position_ids=torch.cat([position_ids, position_ids], dim=1),
        student_mask=(~allowed).unsqueeze(1),
        teacher_mask=teacher_mask,
        sample_indices=sample_indices,
        aligned=torch.cat([from_noisy, torch.zeros_like(from_noisy)], dim=1),
        streams=2,
    )


def _with_next_token_stream(batch: DiffusionBatch, tokens: torch.Tensor, vocab: Vocabulary,
                            objective: MaskedDiffusion,
                            response: Optional[torch.Tensor]) -> DiffusionBatch:
    """The hybrid objective's training example (see the module docstring): ``batch`` (one
    stream) with the clean sequence read causally as a second stream."""
    clean = batch.clean_tokens
    b, seq = clean.shape
    later = torch.ones(seq, seq, dtype=torch.bool, device=clean.device).triu(1)
    if objective.document_attention:
        docs = document_ids(clean, vocab.eod)
        other = docs.unsqueeze(2) != docs.unsqueeze(1)
        noisy_closed, clean_closed = other, other | later
    else:
        noisy_closed = torch.zeros(b, seq, seq, dtype=torch.bool, device=clean.device)
        clean_closed = later.expand(b, seq, seq)
    closed = torch.cat([torch.cat([noisy_closed, torch.ones_like(noisy_closed)], dim=2),
                        torch.cat([torch.ones_like(clean_closed), clean_closed], dim=2)], dim=1)
    following = tokens[:, 1:].contiguous()
    next_token = clean != vocab.eod  # the next token starts a new document: no target
    if vocab.pad != vocab.eod:
        next_token &= following != vocab.pad
    if response is not None:  # diffusion SFT: the response's tokens only
        next_token &= response[:, 1:].to(clean.device)
    nothing = torch.zeros_like(batch.supervised)
    return replace(
        batch,
        input_tokens=torch.cat([batch.input_tokens, clean], dim=1),
        labels=torch.cat([batch.labels, following], dim=1),
        supervised=torch.cat([batch.supervised, nothing], dim=1),
        position_ids=torch.cat([batch.position_ids, batch.position_ids], dim=1),
        student_mask=closed.unsqueeze(1),
        aligned=torch.cat([batch.supervised, nothing], dim=1),
        streams=2,
        next_token=torch.cat([nothing, next_token], dim=1),
        dlm_weight=objective.diffusion.dlm_loss_weight,
        ar_weight=objective.diffusion.ar_loss_weight,
    )


def _loss_weights(per_token_ce: torch.Tensor, batch: DiffusionBatch, weighting: str):
    """([b, s] weight of each position's CE, [b] normaliser of each sample)."""
    weights = batch.supervised.to(per_token_ce.dtype)
    if weighting == "path":
        weights = weights * (1 + torch.exp(-per_token_ce.detach()))
    if weighting == "inv_t":
        weights = weights / batch.t.to(per_token_ce.dtype).unsqueeze(1)
        positions = batch.supervised.shape[1] // batch.streams
        counts = torch.full((batch.supervised.shape[0],), positions, device=per_token_ce.device)
    else:
        counts = batch.supervised.sum(dim=1)
    if batch.next_token is not None:  # the hybrid objective
        next_token = batch.next_token.to(per_token_ce.dtype)
        weights = batch.dlm_weight * weights + batch.ar_weight * next_token
        counts = counts + batch.next_token.sum(dim=1)
    return weights, counts


def loss_terms(
    per_token_ce: torch.Tensor, batch: DiffusionBatch, weighting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, normaliser) for one micro-batch; ``per_token_ce`` is [b, s] float."""
    weights, counts = _loss_weights(per_token_ce, batch, weighting)
    return (per_token_ce.float() * weights.float()).sum(), counts.sum().to(torch.int)


def sample_loss_terms(
    per_token_ce: torch.Tensor, batch: DiffusionBatch, weighting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_terms`` of each sample: ([b] loss sums, [b] normalisers), for evaluations that
    report a standard error over samples."""
    weights, counts = _loss_weights(per_token_ce, batch, weighting)
    return (per_token_ce.float() * weights.float()).sum(dim=1), counts
