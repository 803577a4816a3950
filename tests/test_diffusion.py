"""The masked-diffusion example: reproducible noise, shift semantics, loss normalisation."""

import pytest
import torch

from megalign.config import Config, DiffusionConfig, EvaluationConfig
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.masking import sample_noise
from megalign.diffusion.objective import MaskedDiffusion, loss_terms, make_batch

pytestmark = pytest.mark.unit

EOD, PAD, MASK = 2, 0, 3
VOCAB = Vocabulary(size=40, padded=64, mask=MASK, eod=EOD, pad=PAD)


def test_noise_is_a_function_of_seed_and_sample_index():
    t1, m1 = sample_noise(torch.tensor([5, 6, 7]), 64, seed=1, eps=0.002)
    t2, m2 = sample_noise(torch.tensor([7, 5]), 64, seed=1, eps=0.002)
    assert torch.equal(t1[0], t2[1]) and torch.equal(m1[2], m2[0])  # order/batching-free
    assert not torch.equal(m1[0], m1[1])  # different samples draw different masks
    t3, m3 = sample_noise(torch.tensor([5]), 64, seed=2, eps=0.002)
    assert not torch.equal(m1[0], m3[0])
    t, _ = sample_noise(torch.arange(2000), 8, seed=0, eps=0.1)
    assert float(t.min()) >= 0.1 and float(t.max()) <= 0.9
    assert abs(float(t.mean()) - 0.5) < 0.03


def test_mask_rate_follows_t():
    t, masks = sample_noise(torch.arange(400), 512, seed=3, eps=0.002)
    rate = masks.float().mean(dim=1)
    assert float((rate - t).abs().mean()) < 0.03


def _batch(shift, tokens=None):
    if tokens is None:
        tokens = torch.arange(10, 10 + 33).unsqueeze(0).repeat(2, 1)
        tokens[:, 10] = EOD
    positions = torch.arange(32).unsqueeze(0).repeat(2, 1)
    cfg = Config(seed=1234, diffusion=DiffusionConfig(shift=shift))
    return tokens, make_batch(tokens, positions, torch.tensor([0, 1]), MaskedDiffusion.of(cfg),
                              VOCAB, with_teacher=True)


def test_shifted_targets_are_next_tokens_whose_mask_is_set():
    tokens, b = _batch(shift=True)
    _, masks = sample_noise(torch.tensor([0, 1]), 33, 1234, DiffusionConfig().eps)
    assert torch.equal(b.labels, tokens[:, 1:])
    assert torch.equal(b.input_tokens == MASK, masks[:, :32])
    expected = masks[:, 1:] & (tokens[:, :32] != EOD)
    assert torch.equal(b.supervised, expected)
    # the EOD position would predict the next document's first token
    assert not b.supervised[:, 10].any()


def test_unshifted_targets_are_the_masked_tokens_themselves():
    tokens, b = _batch(shift=False)
    assert torch.equal(b.labels, tokens[:, :32])
    assert torch.equal(b.supervised, b.input_tokens == MASK)


def test_document_masks():
    _, b = _batch(shift=True)
    # token 10 is the EOD closing document 0 (positions 0..10); document 1 is 11..31
    assert not b.student_mask[0, 0, 3, 8] and not b.student_mask[0, 0, 3, 10]
    assert b.student_mask[0, 0, 3, 11] and b.student_mask[0, 0, 11, 3]
    assert not b.student_mask[0, 0, 12, 20] and not b.student_mask[0, 0, 20, 12]  # bidirectional
    assert b.teacher_mask[0, 0, 12, 20] and not b.teacher_mask[0, 0, 20, 12]  # causal


def test_loss_normalisation():
    _, b = _batch(shift=True)
    ce = torch.rand(2, 32)
    total, count = loss_terms(ce, b, "none")
    assert int(count) == int(b.supervised.sum())
    assert torch.allclose(total, (ce * b.supervised).sum())
    total, count = loss_terms(ce, b, "inv_t")
    assert int(count) == 64
    assert torch.allclose(total, (ce * b.supervised / b.t[:, None]).sum())


def test_path_weighting_is_the_reference_codes_mdm_plus_path_loss():
    """``path``: L_mdm + L_path with L_path = sum_V sg(p)·CE / |V|, p = exp(-CE) the target's
    probability, written here from logits; the same value and gradient (the probability is not
    differentiated)."""
    _, b = _batch(shift=True)
    logits = torch.randn(2, 32, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 32))
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    total, count = loss_terms(ce, b, "path")
    (total / count).backward()
    got = logits.grad.clone()

    logits.grad = None
    supervised = b.supervised
    log_p = logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)[supervised]
    mdm = (-log_p).mean()
    path = (log_p.exp().detach() * -log_p).sum() / supervised.sum()
    (mdm + path).backward()
    assert int(count) == int(supervised.sum())
    # (loss_terms sums in float32, as training does)
    assert torch.allclose((total / count).double(), mdm + path, rtol=1e-6)
    assert torch.allclose(got, logits.grad, rtol=1e-5, atol=1e-9)


def test_elbo_estimate_is_the_inv_t_training_loss_on_its_mask():
    from megalign.diffusion.masking import masks_at
    from megalign.evaluation.heldout import diffusion_nelbo

    # the masks follow evaluation.seed, not the run's seed
    cfg = Config(seed=99, diffusion=DiffusionConfig(shift=True),
                 evaluation=EvaluationConfig(seed=1234))

    tokens = torch.randint(4, 40, (2, 33))
    tokens[:, 7] = EOD
    raw = {"tokens": tokens, "position_ids": torch.arange(32).repeat(2, 1),
           "sample_index": torch.tensor([11, 12])}
    fixed = torch.randn(2, 32, 40, generator=torch.Generator().manual_seed(0))
    nelbo = diffusion_nelbo(lambda x, p, m, packed=None: fixed, [raw], MaskedDiffusion.of(cfg),
                            VOCAB, grid=1, seed=cfg.evaluation.seed)
    masked = masks_at(raw["sample_index"], 33, 1234, 0.5, 0)  # t = 0.5: the one grid point
    supervised = masked[:, 1:] & (tokens[:, :32] != EOD)
    ce = torch.nn.functional.cross_entropy(fixed.transpose(1, 2), tokens[:, 1:], reduction="none")
    assert nelbo.counts == (32, 32)
    assert nelbo.value == pytest.approx(float((ce * supervised / 0.5).sum() / 64), rel=1e-6)
    per_sample = ((ce * supervised / 0.5).sum(dim=1) / 32).tolist()
    assert nelbo.per_sample == pytest.approx(per_sample, rel=1e-6)
    assert nelbo.se == pytest.approx(abs(per_sample[0] - per_sample[1]) / 2, rel=1e-5)
