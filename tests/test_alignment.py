"""REPR-ALIGN's loss on one stage, in one process, against the formula written out here:
``sum_l w_l * (1 - mean_{i in V} cos(h^S_l[i], h^T_l[i]))`` with the weights normalised over all
aligned layers (the layouts are checked against each other in test_equivalence.py)."""

import pytest
import torch

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
