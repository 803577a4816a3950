"""Block diffusion and attention annealing: the batches they build, their limits, and the
block-causal decoding that matches block-diffusion training (the layouts and the plain PyTorch
reference are in test_equivalence.py)."""

import pytest
import torch

from megalign.config import Config, DataConfig, DiffusionConfig, ModelConfig
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.decoding import SamplerConfig, prepare
from megalign.diffusion.masking import anneal_fraction, open_future
from megalign.diffusion.objective import MaskedDiffusion, loss_terms, make_batch
from megalign.diffusion.sampler import denoise, for_model
from megalign.errors import ConfigError
from megalign.model.attention import attention_mask, document_ids

pytestmark = pytest.mark.unit

EOD, PAD, MASK = 2, 0, 3
VOCAB = Vocabulary(size=40, padded=64, mask=MASK, eod=EOD, pad=PAD)
SEQ = 16


def _config(**diffusion) -> Config:
    return Config(seed=7, model=ModelConfig(seq_length=SEQ),
                  data=DataConfig(global_batch_size=4, micro_batch_size=2),
                  diffusion=DiffusionConfig(**diffusion))


def _objective(**diffusion) -> MaskedDiffusion:
    return MaskedDiffusion.of(_config(**diffusion))


def _sample(indices=(0, 1)):
    tokens = torch.arange(10, 10 + SEQ + 1).unsqueeze(0).repeat(len(indices), 1)
    tokens[:, 5] = EOD  # two documents: positions restart after it
    positions = (torch.cat([torch.arange(6), torch.arange(SEQ - 6)]).unsqueeze(0)
                 .repeat(len(indices), 1))
    return tokens, positions, torch.tensor(indices)


def test_annealing_starts_causal_and_ends_bidirectional():
    objective = MaskedDiffusion.of(_config(anneal_iters=3))
    tokens, positions, _ = _sample()
    docs = document_ids(tokens[:, :SEQ], EOD)
    first = make_batch(tokens, positions, torch.tensor([0, 0]), objective, VOCAB, training=True)
    assert torch.equal(first.student_mask, attention_mask(docs, causal=True))
    done = make_batch(tokens, positions, torch.tensor([12, 40]), objective, VOCAB, training=True)
    assert torch.equal(done.student_mask, attention_mask(docs, causal=False))  # 3 x 4 samples on
    halfway = make_batch(tokens, positions, torch.tensor([6, 6]), objective, VOCAB, training=True)
    opened = (~halfway.student_mask & attention_mask(docs, causal=True)).sum()
    assert 0 < opened < (~attention_mask(docs, causal=False)
                         & attention_mask(docs, causal=True)).sum()
    # evaluation sees the final, bidirectional model
    evaluated = make_batch(tokens, positions, torch.tensor([0, 0]), objective, VOCAB)
    assert torch.equal(evaluated.student_mask, attention_mask(docs, causal=False))


def test_annealed_masks_open_monotonically_per_sample():
    indices = torch.tensor([3, 3, 3])
    fractions = torch.tensor([0.2, 0.5, 0.9])
    masks = open_future(indices, fractions, 32, seed=1)
    assert torch.equal(masks[0] & masks[1], masks[0]) and torch.equal(masks[1] & masks[2], masks[1])
    assert not masks.tril().any()
    share = masks.sum(dim=(1, 2)).double() / (32 * 31 / 2)
    assert torch.allclose(share, fractions.double(), atol=0.06)
    assert anneal_fraction(torch.tensor([0, 4, 8, 100]), 2, 4).tolist() == [0.0, 0.5, 1.0, 1.0]


def test_block_diffusion_batch():
    cfg = _config(block_length=4)
    tokens, positions, indices = _sample()
    full = make_batch(tokens, positions, indices, _objective(), VOCAB, with_teacher=True)
    batch = make_batch(tokens, positions, indices, MaskedDiffusion.of(cfg), VOCAB,
                       with_teacher=True)
    assert batch.streams == 2 and batch.input_tokens.shape == (2, 2 * SEQ)
    assert torch.equal(batch.input_tokens, torch.cat([full.input_tokens, full.clean_tokens], 1))
    assert torch.equal(batch.position_ids, torch.cat([positions, positions], 1))
    # the teacher's view is unchanged
    assert torch.equal(batch.clean_tokens, full.clean_tokens)
    assert torch.equal(batch.teacher_mask, full.teacher_mask)
    assert torch.equal(batch.sequence_labels, full.labels)
    # every supervised target is predicted once: by the clean stream when it opens a block
    assert torch.equal(batch.supervised_targets, full.supervised)
    noisy, clean = batch.supervised.chunk(2, dim=1)
    assert not (noisy & clean).any()
    opens = (positions + 1) % 4 == 0  # the next token is the first of a block (document-relative)
    assert torch.equal(clean, full.supervised & opens)
    assert torch.equal(batch.aligned, torch.cat([noisy, torch.zeros_like(noisy)], 1))
    allowed = ~batch.student_mask[0, 0]
    # second document (from position 6): blocks {6..9}, {10..13}, {14, 15}
    assert allowed[11, 10:14].all() and not allowed[11, 14] and not allowed[11, 9]
    assert allowed[11, SEQ + 6 : SEQ + 10].all() and not allowed[11, SEQ + 10 :].any()
    assert not allowed[11, SEQ : SEQ + 6].any()  # the first document
    assert allowed[SEQ + 11, SEQ + 6 : SEQ + 14].all() and not allowed[SEQ + 11, SEQ + 14]
    assert not allowed[SEQ:, :SEQ].any()  # the clean stream never sees the noise
    # inv_t normalises by the sequence's positions, not both streams'
    ce = torch.ones(2, 2 * SEQ)
    assert int(loss_terms(ce, batch, "inv_t")[1]) == 2 * SEQ


def test_one_block_is_the_plain_batch():
    tokens, positions, indices = _sample()
    plain = make_batch(tokens, positions, indices, _objective(), VOCAB, with_teacher=True)
    one = make_batch(tokens, positions, indices, _objective(block_length=SEQ), VOCAB,
                     with_teacher=True)
    for name in ("input_tokens", "labels", "supervised", "position_ids", "student_mask"):
        assert torch.equal(getattr(one, name), getattr(plain, name)), name
    assert one.streams == 1


def test_hybrid_batch_adds_the_clean_stream_read_causally():
    tokens, positions, indices = _sample()
    plain = make_batch(tokens, positions, indices, _objective(), VOCAB, with_teacher=True)
    objective = _objective(ar_loss_weight=1.0, dlm_loss_weight=0.3)
    batch = make_batch(tokens, positions, indices, objective, VOCAB, with_teacher=True,
                       training=True)
    clean = tokens[:, :SEQ]
    assert batch.streams == 2 and objective.streams == 2
    assert torch.equal(batch.input_tokens, torch.cat([plain.input_tokens, clean], 1))
    assert torch.equal(batch.labels, torch.cat([tokens[:, 1:], tokens[:, 1:]], 1))
    assert torch.equal(batch.position_ids, torch.cat([positions, positions], 1))
    nothing = torch.zeros_like(plain.supervised)
    assert torch.equal(batch.supervised, torch.cat([plain.supervised, nothing], 1))
    assert torch.equal(batch.aligned, batch.supervised)
    following = torch.cat([(clean != EOD) & (tokens[:, 1:] != PAD)])
    assert torch.equal(batch.next_token, torch.cat([nothing, following], 1))
    assert not following[:, 5].any() and following[:, 6].all()  # the first document's end
    allowed = ~batch.student_mask[0, 0]
    docs = document_ids(clean, EOD)[0]
    same = docs.unsqueeze(1) == docs.unsqueeze(0)
    assert torch.equal(allowed[:SEQ, :SEQ], same)  # noisy: bidirectional in its document
    assert torch.equal(allowed[SEQ:, SEQ:], same & torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
    assert not allowed[:SEQ, SEQ:].any() and not allowed[SEQ:, :SEQ].any()
    # one loss: (0.3 x diffusion sum + 1.0 x next-token sum) / (diffusion normaliser + positions)
    ce = torch.rand(2, 2 * SEQ)
    noisy, rest = (ce * batch.supervised).chunk(2, 1)[0], (ce * batch.next_token).chunk(2, 1)[1]
    total, count = loss_terms(ce, batch, "none")
    assert int(count) == int(plain.supervised.sum() + following.sum())
    assert float(total) == pytest.approx(float(0.3 * noisy.sum() + rest.sum()))
    t = batch.t.unsqueeze(1)
    total, count = loss_terms(ce, batch, "inv_t")
    assert int(count) == 2 * SEQ + int(following.sum())
    assert float(total) == pytest.approx(float(0.3 * (noisy / t).sum() + rest.sum()))
    # evaluation reads the diffusion model alone
    evaluated = make_batch(tokens, positions, indices, objective, VOCAB, with_teacher=True)
    assert evaluated.streams == 1 and evaluated.next_token is None
    assert torch.equal(evaluated.input_tokens, plain.input_tokens)


@pytest.mark.parametrize("diffusion, message", [
    ({"block_length": 0}, "diffusion.block_length=0 must be >= 1"),
    ({"ar_loss_weight": 1.0, "block_length": 4}, "block-causal"),
    ({"ar_loss_weight": 1.0, "anneal_iters": 2}, "set one of them"),
    ({"dlm_loss_weight": 0.3}, "the next-token term, which is off"),
    ({"ar_loss_weight": -1.0}, "must be >= 0"),
    ({"anneal_iters": -1}, "diffusion.anneal_iters=-1 must be >= 0"),
    ({"block_length": 4, "anneal_iters": 2}, "set one of them"),
])
def test_mode_settings_are_checked(diffusion, message):
    with pytest.raises(ConfigError, match=message):
        _config(**diffusion)  # a section checks itself when built


def test_block_causal_decoding_mask():
    cfg = for_model(_config(block_length=4), SamplerConfig(gen_length=8))
    assert (cfg.block_length, cfg.suffix, cfg.attention) == (4, False, "block_causal")
    assert for_model(_config(), SamplerConfig(gen_length=8)) == SamplerConfig(gen_length=8)
    assert not for_model(_config(shift=False), SamplerConfig(gen_length=8)).shift  # the model's
    _, start, blocked = prepare([[5, 6, 7, 8, 9], [5, 6]], cfg, MASK, PAD)
    allowed = ~blocked[0, 0]
    assert start == 5
    assert allowed[5:9, :9].all() and not allowed[5:9, 9:].any()  # first block: prompt + itself
    assert not allowed[4, 5:].any()  # the prompt does not see the generation
    assert not (~blocked[1, 0, 3:, :3]).any()  # the second prompt's padding stays out
    with pytest.raises(ValueError, match="needs suffix=False"):
        SamplerConfig(gen_length=8, attention="block_causal").check()


def test_decoding_without_the_suffix_refuses_infilling():
    tokens = torch.full((1, 12), 9)
    tokens[:, 4:8] = MASK
    with pytest.raises(ValueError, match="cannot fill a span with text after it"):
        denoise(lambda x, m, _window: torch.zeros(1, x.shape[1], 64), tokens, None, 4, VOCAB,
                SamplerConfig(gen_length=4, suffix=False))


def test_decoding_without_the_suffix_shows_the_model_only_the_blocks_so_far():
    seen = []

    def logits_fn(tokens, mask, _window):
        seen.append(tokens.shape[1])
        return torch.zeros(tokens.shape[0], tokens.shape[1], 64)

    prompt = [[5, 6, 7]]
    from megalign.diffusion.sampler import sample
    sample(logits_fn, prompt, VOCAB, SamplerConfig(gen_length=8, block_length=4, suffix=False))
    assert seen == [7] * 4 + [11] * 4
    seen.clear()
    sample(logits_fn, prompt, VOCAB, SamplerConfig(gen_length=8, block_length=4))
    assert seen == [11] * 8


def test_the_model_card_names_the_training_mode():
    from megalign.convert.checkpoints import training_mode_lines

    assert training_mode_lines(_config()) == []
    assert "block diffusion, blocks of 4" in training_mode_lines(_config(block_length=4))[0]
    cfg = Config(diffusion=DiffusionConfig(anneal_iters=3), data=DataConfig(sft=True),
                 model=ModelConfig(student_checkpoint="runs/x/checkpoints"))
    assert training_mode_lines(cfg) == [
        "- attention annealed from causal to bidirectional over the first 3 steps",
        "- diffusion SFT: only response tokens noised and supervised, starting from "
        "`runs/x/checkpoints`"]
    hybrid = _config(ar_loss_weight=1.0, dlm_loss_weight=0.3)
    assert "next-token loss on the clean sequence (weight 1) beside the diffusion loss (weight " \
           "0.3)" in training_mode_lines(hybrid)[0]


def test_packed_documents_carry_what_the_masks_do():
    """THD (PackedSeqParams): a boundary at every sample start and after every EOD, the samples
    one after the other; the masks it stands for are the explicit ones, causal or not; the rest
    of the batch is the masked layout's."""
    from dataclasses import replace

    from megalign.model.attention import concatenated, packed_documents, packed_mask

    tokens, positions, indices = _sample()
    tokens[1, 9] = EOD  # the second sample holds three documents
    masked = make_batch(tokens, positions, indices, _objective(), VOCAB, with_teacher=True)
    packed = make_batch(tokens, positions, indices, replace(_objective(), packed=True), VOCAB,
                        with_teacher=True)
    assert packed.student_mask is packed.teacher_mask is None
    assert packed.packed.qkv_format == "thd" and packed.packed.max_seqlen_q == SEQ
    assert packed.packed.cu_seqlens_q.tolist() == [0, 6, 16, 22, 26, 32]
    assert torch.equal(packed_mask(packed.packed, causal=False), masked.student_mask)
    assert torch.equal(packed_mask(packed.packed, causal=True), masked.teacher_mask)
    for name in ("input_tokens", "labels", "supervised", "position_ids", "t"):
        assert torch.equal(getattr(packed, name), getattr(masked, name)), name
    assert packed.as_model_takes(packed.input_tokens).shape == (1, 2 * SEQ)
    assert masked.as_model_takes(masked.input_tokens) is masked.input_tokens
    # the teacher's group of micro-batches: one row of both
    both = concatenated([packed.packed, packed.packed])
    assert both.cu_seqlens_q.tolist() == [0, 6, 16, 22, 26, 32, 38, 48, 54, 58, 64]
    whole = packed_documents(document_ids(torch.cat([tokens, tokens])[:, :SEQ], EOD))
    assert torch.equal(whole.cu_seqlens_q, both.cu_seqlens_q)


def test_packed_documents_are_chosen_where_they_can_carry_the_batch(monkeypatch):
    """``model.document_format``: thd and mask as asked; auto is thd where Transformer Engine
    runs; block diffusion, annealing and context parallelism keep the mask."""
    from dataclasses import replace

    from megalign.model import gpt

    def packs(fmt, **changes):
        cfg = _config(**changes.pop("diffusion", {}))
        cfg = replace(cfg, model=replace(cfg.model, document_format=fmt), **changes)
        return gpt.packs_documents(cfg)

    assert packs("thd") and not packs("mask") and not packs("auto")
    monkeypatch.setattr(gpt, "transformer_engine_available", lambda: True)
    assert packs("auto")
    assert not packs("auto", diffusion={"anneal_iters": 4})
    assert not packs("auto", diffusion={"block_length": 4})
    assert packs("auto", diffusion={"block_length": SEQ})  # one block: the plain batch
