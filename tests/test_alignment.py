"""REPR-ALIGN's loss on one stage, in one process, against the formula written out here:
``sum_l w_l * (1 - mean_{i in V} cos(h^S_l[i], h^T_l[i]))`` with the weights normalised over all
aligned layers (the layouts are checked against each other in test_equivalence.py)."""

import pytest
import torch

from megalign.align.distill import cross_entropy, cross_entropy_and_kl
from megalign.align.loss import alignment_loss, normalised_layer_weights, stage_alignment

pytestmark = pytest.mark.unit


def states(seed: int, layers, s=6, b=2, h=5) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {i: torch.randn(s, b, h, generator=generator, requires_grad=True) for i in layers}


def test_layer_weights_are_normalised_over_every_aligned_layer():
    assert normalised_layer_weights(3, None, None) == {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}
    assert normalised_layer_weights(3, [1, 3], [1, 3]) == {1: 0.25, 3: 0.75}
    with pytest.raises(ValueError, match="must not all be zero"):
        normalised_layer_weights(3, [1], [0])


def test_stage_term_equals_the_formula_at_supervised_positions():
    layers = [1, 2]
    weights = normalised_layer_weights(4, [0, 1, 2, 4], [1, 2, 3, 4])  # two layers elsewhere
    student, teacher = states(0, layers), states(1, layers)
    supervised = torch.zeros(2, 6, dtype=torch.bool)  # [b, s]
    supervised[0, [1, 4]] = supervised[1, [0, 2, 5]] = True

    stage = stage_alignment(student, teacher, supervised, weights, sequence_parallel=False)

    expected, cos_sums = torch.zeros(()), []
    for layer in layers:
        cosines = []
        for b, i in supervised.nonzero().tolist():
            s, t = student[layer][i, b], teacher[layer][i, b]
            cosines.append(torch.dot(s, t) / (s.norm() * t.norm()))
        cos_sums.append(sum(cosines))
        expected = expected + weights[layer] * (1 - sum(cosines) / len(cosines))
    assert stage.layers == layers and stage.count.item() == 5
    torch.testing.assert_close(stage.loss, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stage.cos_sums, torch.stack(cos_sums).detach(), rtol=1e-6, atol=1e-7)
    # the gradient reaches the student's states at supervised positions only
    stage.loss.backward()
    grad = student[1].grad.norm(dim=-1)  # [s, b]
    assert (grad[~supervised.T] == 0).all() and (grad[supervised.T] > 0).all()


def test_identical_states_cost_nothing_and_no_supervised_position_is_no_nan():
    layers = [0, 3]
    student = states(2, layers)
    teacher = {i: s.detach().clone() for i, s in student.items()}
    supervised = torch.ones(2, 6, dtype=torch.bool)
    weights = normalised_layer_weights(3, layers, None)
    assert stage_alignment(student, teacher, supervised, weights, False).loss.abs() < 1e-6
    empty = stage_alignment(student, teacher, torch.zeros_like(supervised), weights, False)
    assert empty.loss.item() == 0.0 and empty.count.item() == 0


def test_logged_loss_is_lambda_times_the_weighted_distances():
    weights = {0: 0.5, 2: 0.5}
    distances = [0.2, 0.9, 0.4]  # per aligned index, gathered from every stage
    assert alignment_loss(distances, weights, weight=10.0) == pytest.approx(10 * (0.1 + 0.2))


def test_distillation_terms_are_the_cross_entropy_and_kl_of_the_softmaxes_with_gradients():
    """``cross_entropy_and_kl`` on one rank: the student's cross-entropy and KL(softmax(teacher)
    || softmax(student)) per position, with their gradients, and ``cross_entropy`` leaves its
    logits as they were (the TP shards: test_equivalence.py)."""
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 11, generator=generator, requires_grad=True)
    teacher = 3 * torch.randn(2, 5, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    up_ce, up_kl = torch.rand(2, 5, generator=generator), torch.rand(2, 5, generator=generator)
    ce, kl = cross_entropy_and_kl(student, teacher, labels, 0)
    ((ce * up_ce).sum() + (kl * up_kl).sum()).backward()
    reference = student.detach().clone().requires_grad_(True)
    log_p, log_q = teacher.log_softmax(-1), reference.log_softmax(-1)
    expected_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    expected_ce = torch.nn.functional.cross_entropy(reference.view(-1, 11), labels.view(-1),
                                                    reduction="none").view(2, 5)
    ((expected_ce * up_ce).sum() + (expected_kl * up_kl).sum()).backward()
    assert torch.allclose(kl, expected_kl, atol=1e-6) and torch.allclose(ce, expected_ce,
                                                                         atol=1e-6)
    assert torch.allclose(student.grad, reference.grad, atol=1e-6)
    assert torch.allclose(cross_entropy_and_kl(teacher, teacher, labels, 0)[1],
                          torch.zeros(2, 5), atol=1e-6)
    kept = teacher.clone()
    assert torch.allclose(cross_entropy(teacher, labels, 0), torch.nn.functional.cross_entropy(
        teacher.view(-1, 11), labels.view(-1), reduction="none").view(2, 5), atol=1e-6)
    assert torch.equal(teacher, kept)
