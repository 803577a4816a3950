"""What evaluation inside a training run holds, for the memory plan
(``megalign.training.memory_plan``).

Why: evaluation runs between optimizer steps, when the step's activations are freed but the
weights, gradients and optimizer states are not; its working memory is the logits of its batches,
which can outgrow a training step's (``evaluation.batch_size`` larger than the micro-batch, the
whole vocabulary gathered on every rank). These are the tensors this package's code keeps alive
at once, per pipeline stage; the padded vocabulary stands for the real one throughout (the
cross-entropy reads the real vocabulary's columns, a few percent fewer).
"""

from __future__ import annotations

from megalign.config import Config, evaluation_batch_size
from megalign.diffusion.decoding import default_block_length
from megalign.model.memory import FP32, attention_score_bytes


def planned_scorer_bytes(cfg: Config, parameters: int, element: int) -> int:
    """The causal AR model that scores generated samples during training
    (``evaluation.generation_samples``): this stage's ``parameters`` of ``element`` bytes."""
    e = cfg.evaluation
    return parameters * element if e.interval and e.generation_samples else 0


def planned_working_bytes(cfg: Config, vocab_size: int, element: int, last_stage: bool) -> int:
    """The most bytes evaluation's working tensors hold at once on a rank of this stage (0 without
    evaluation): the largest of the held-out scoring, the sampler's decoding of generation
    prompts and infilling. ``vocab_size``: the padded vocabulary."""
    e = cfg.evaluation
    if not e.interval:
        return 0
    batch = evaluation_batch_size(cfg)
    length = cfg.model.seq_length
    needs = [_scoring_bytes(cfg, batch, length, vocab_size, element, last_stage)]
    if last_stage and e.generation_samples:
        needs.append(_decoding_bytes(cfg, e.generation_samples, e.prompt_length + e.gen_length,
                                     default_block_length(e.gen_length), vocab_size, element))
    if last_stage and e.infill_span:
        needs.append(_decoding_bytes(cfg, batch, length, default_block_length(e.infill_span),
                                     vocab_size, element))
    return max(needs)


def planned_score_buffer_bytes(cfg: Config, element: int) -> int:
    """The local spec's attention-score buffer at evaluation's batch size (Megatron-Core's global
    buffer keeps the largest it was asked for; evaluation attends one stream of every position)."""
    if not cfg.evaluation.interval:
        return 0
    length = cfg.model.seq_length
    rows = length // cfg.parallel.context_parallel_size
    return attention_score_bytes(cfg, evaluation_batch_size(cfg), rows, length, element)


def _scoring_bytes(cfg: Config, batch: int, length: int, vocab_size: int, element: int,
                   last_stage: bool) -> int:
    """NELBO / NLL of a batch (``megalign.evaluation.heldout``): every rank holds the whole
    vocabulary's fp32 logits (gathered over TP and CP, broadcast over the pipeline) while the
    cross-entropy keeps a contiguous copy and its log-softmax; before that the last stage holds
    its shard as the model returns it (and transposes it), and the gathers' buffers: over TP
    the gathered pieces and their concatenation beside the shard, over CP the ranks' parts,
    reordered, and made contiguous beside this rank's."""
    p = cfg.parallel
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    positions = batch * length
    whole = positions * vocab_size * FP32
    scoring = 3 * whole
    if not last_stage:
        return scoring
    shard = positions // cp * vocab_size // tp
    output = shard * _returned_bytes(element)
    local = whole // cp  # this rank's positions, the whole vocabulary
    over_tp = shard * FP32 + 2 * local if tp > 1 else 0
    over_cp = local + 3 * whole if cp > 1 else 0
    return max(scoring, output, over_tp, over_cp)


def _decoding_bytes(cfg: Config, batch: int, length: int, block: int, vocab_size: int,
                    element: int) -> int:
    """The sampler (``megalign.diffusion.decoding``) on the last stage, without a cache: the
    previous step's logits shard stays alive while the next forward returns the model's output
    and its transposed copy, all of the whole sequence at the last block; then ``predict``'s five
    fp32 copies of the block's rows (the rows, masked, exponentiated, normalised, the draws)."""
    width = vocab_size // cfg.parallel.tensor_model_parallel_size
    forward = batch * length * width * (FP32 + _returned_bytes(element))
    return forward + 5 * batch * block * width * FP32


def _returned_bytes(element: int) -> int:
    """Bytes per logit while ``forward_vocab_shard`` returns them: the output layer's [s, b], its
    [b, s] copy, and their fp32 copy when the model computes in another dtype."""
    return 2 * element + (FP32 if element != FP32 else 0)
