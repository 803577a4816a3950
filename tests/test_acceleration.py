"""The acceleration curve (steps the aligned run needs to reach the plain run's value at k, over
k) and FLOPs per step, against hand computations on synthetic curves and shapes."""

from dataclasses import replace

import pytest

from megalign.config import Config, DataConfig, ModelConfig
from megalign.evaluation.acceleration import (
    acceleration_curve,
    final_ratio,
    spread_over_seeds,
    steps_to_reach,
    strict_ratio,
)
from megalign.model.flops import step_flops

pytestmark = pytest.mark.unit

BASELINE = [[0, 8.0], [100, 6.0], [200, 5.0], [300, 4.6], [400, 4.4]]
# reaches 6.0 between 0 and 100, 5.0 at 100, 4.6 halfway from 200 (4.8) to 300 (4.4), 4.4 at 300
ALIGNED = [[0, 8.0], [100, 5.0], [200, 4.8], [300, 4.4], [400, 4.3]]


def test_steps_to_reach_interpolates_between_evaluations():
    assert steps_to_reach(ALIGNED, 6.0, -1) == pytest.approx(100 * (8 - 6) / (8 - 5))
    assert steps_to_reach(ALIGNED, 5.0, -1) == 100
    assert steps_to_reach(ALIGNED, 4.6, -1) == pytest.approx(250)
    assert steps_to_reach(ALIGNED, 4.0, -1) is None
    assert steps_to_reach([[0, 0.1], [10, 0.3]], 0.2, +1) == pytest.approx(5)  # higher is better


def test_acceleration_curve_by_hand():
    curve = acceleration_curve(BASELINE, ALIGNED, -1)
    expected = [[100, (200 / 3) / 100], [200, 100 / 200], [300, 250 / 300], [400, 300 / 400]]
    assert [k for k, _ in curve] == [k for k, _ in expected]
    assert [r for _, r in curve] == pytest.approx([r for _, r in expected])
    assert final_ratio(curve, BASELINE) == (pytest.approx(0.75), "reached")
    # an aligned run that never gets as far; a baseline that ends where it started
    slow = [[0, 8.0], [400, 5.5]]
    assert acceleration_curve(BASELINE, slow, -1)[-1] == [400, None]
    assert final_ratio(acceleration_curve(BASELINE, slow, -1), BASELINE) == (None, "not reached")
    flat = [[0, 8.0], [100, 7.0], [200, 8.0]]
    assert acceleration_curve(flat, ALIGNED, -1) == [[100, pytest.approx(100 / 3 / 100)]]
    assert final_ratio(acceleration_curve(flat, ALIGNED, -1), flat) == (None, "undefined")


def test_strict_ratio_by_hand():
    # a monotone baseline: both readings agree (ALIGNED reaches 4.4 at 300; the baseline at 400)
    assert strict_ratio(BASELINE, ALIGNED, -1) == (pytest.approx(0.75), "reached")
    # a baseline that gets worse late: its final 4.6 was first reached at 100 + (5 - 4.6) /
    # (5 - 4.4) x 100; ALIGNED reaches 4.6 at 250
    late = [[0, 8.0], [100, 5.0], [200, 4.4], [300, 4.8], [400, 4.6]]
    assert strict_ratio(late, ALIGNED, -1) == (pytest.approx(250 / (100 + 100 * 0.4 / 0.6)),
                                               "reached")
    # the paper's reading credits the aligned run with the baseline's late loss: 250 / 400
    assert final_ratio(acceleration_curve(late, ALIGNED, -1), late) == (pytest.approx(0.625),
                                                                        "reached")
    assert strict_ratio(BASELINE, [[0, 8.0], [400, 5.5]], -1) == (None, "not reached")
    assert strict_ratio([[0, 8.0], [100, 7.0], [200, 8.0]], ALIGNED, -1) == (None, "undefined")
    assert strict_ratio([[0, 0.1], [10, 0.3]], [[0, 0.1], [10, 0.5]], +1) == (
        pytest.approx(0.5), "reached")  # higher is better: 0.3 at 5 against 10


def test_spread_over_seeds():
    spread = spread_over_seeds([0.4, 0.5, 0.6])
    assert spread["median"] == 0.5 and spread["all_defined"] and spread["max"] == 0.6
    assert spread["ci95"] == pytest.approx([0.5 - 4.303 * 0.1 / 3 ** 0.5,
                                            0.5 + 4.303 * 0.1 / 3 ** 0.5])
    partial = spread_over_seeds([0.4, None])
    assert not partial["all_defined"] and partial["median"] == 0.4 and partial["ci95"] is None


def test_step_flops_by_hand():
    cfg = Config(model=ModelConfig(arch="llama", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                                   num_attention_heads=4, num_query_groups=2, seq_length=16),
                 data=DataConfig(global_batch_size=3))
    # per layer: q 64x64, k and v 64x32 each, output 64x64, SwiGLU 3 x 64x128
    params = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    layers = 2 * (2 * params + 4 * 16 * 64)
    head = 2 * 64 * 256
    plain = 3 * 16 * 3 * (layers + head)
    assert step_flops(cfg, 256, aligned=False) == plain
    assert step_flops(cfg, 256, aligned=True) == plain + 3 * 16 * layers  # teacher: no LM head
    # distillation: the teacher's LM head too
    assert step_flops(cfg, 256, aligned=True, teacher_head=True) == plain + 3 * 16 * (layers + head)
    block = 3 * 3 * 32 * (2 * (2 * params + 4 * 32 * 64) + head)  # two streams: 32 positions
    assert step_flops(cfg, 256, aligned=False, streams=2) == block
    # a mixture of 8 experts of 48, top 2, and a gated shared expert of 96: per token the router
    # 64x8, two experts' SwiGLU 3 x 64x48 each, the shared SwiGLU 3 x 64x96 and its gate 64x1
    moe = replace(cfg, model=replace(cfg.model, num_experts=8, moe_topk=2, moe_ffn_hidden_size=48,
                                     moe_shared_expert_ffn_hidden_size=96,
                                     moe_shared_expert_gate=True))
    moe_params = params - 3 * 64 * 128 + 64 * 8 + 2 * 3 * 64 * 48 + 3 * 64 * 96 + 64
    moe_layers = 2 * (2 * moe_params + 4 * 16 * 64)
    assert step_flops(moe, 256, aligned=False) == 3 * 16 * 3 * (moe_layers + head)
