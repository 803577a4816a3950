"""Attention direction, per-document attention and the step-0 embedding alignment."""

import json

import pytest

from conftest import TINY_CONFIG, WORKERS, torchrun


@pytest.fixture(scope="module")
def report(tmp_path_factory, data_overrides):
    out = tmp_path_factory.mktemp("model") / "report.json"
    torchrun(1, WORKERS / "model_checks.py",
             ["--config", TINY_CONFIG, "--out", out, *data_overrides])
    return json.loads(out.read_text())


def test_student_is_bidirectional_and_teacher_causal(report):
    assert report["bidirectional_first_position_change"] > 1e-4
    assert report["causal_first_position_change"] == 0.0


def test_document_attention_isolates_documents(report):
    for kind in ("bidirectional", "causal"):
        assert report[f"{kind}_doc_other_document_change"] == 0.0
        assert report[f"{kind}_doc_same_document_change"] > 1e-4


def test_embedding_states_align_exactly_at_step_zero(report):
    assert report["embedding_cos_visible_count"] > 0
    assert report["embedding_cos_visible_min"] == pytest.approx(1.0, abs=1e-6)
    assert report["embedding_cos_visible_max"] == pytest.approx(1.0, abs=1e-6)
    assert report["embedding_cos_masked_max"] < 0.999


def test_grouped_teacher_forward_matches_one_forward_per_microbatch(report):
    """align.teacher_microbatches: micro-batches run as one teacher batch get their own states."""
    assert report["teacher_group_shapes"] == [[128, 1, 64]] * 4  # 2 micro-batches x 2 states
    assert report["teacher_group_max_diff"] < 1e-5


def test_a_student_cast_to_bf16_computes_as_one_built_in_bf16(report):
    """megalign-generate --bf16 casts the loaded student: the result must round where a model
    trained in bf16 and the bf16 transformers export do (the softmax in float32)."""
    assert report["bf16_cast_vs_built"] == [0.0] * 4
    assert report["bf16_softmax_cast_vs_built"] == 0.0


def test_freezing_the_output_layer_with_tied_embeddings_freezes_the_embedding(report):
    """README: with tied embeddings, a pattern matching either name freezes the one tensor."""
    assert report["frozen_by_output_layer"] == ["embedding.word_embeddings.weight"]
    assert report["frozen_by_word_embeddings"] == ["embedding.word_embeddings.weight"]
