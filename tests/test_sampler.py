"""The diffusion sampler's unmasking rules, blocks, EOS and batching, on scripted logits."""

from dataclasses import replace

import pytest
import torch

from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.decoding import SamplerConfig, prepare
from megalign.diffusion.sampler import sample

VOCAB, MASK, PAD, EOS = 50, 60, 0, 1
VOCABULARY = Vocabulary(size=VOCAB, padded=64, mask=MASK, eod=EOS, pad=PAD)


def scripted(seed=0):
    """Random but fixed logits per call: a stand-in model that changes its mind every step."""
    generator = torch.Generator().manual_seed(seed)

    def logits_fn(tokens, _mask, _window):
        return torch.randn(*tokens.shape, 64, generator=generator) * 3

    return logits_fn


def run(cfg, prompts=([5, 6, 7],), shift=True, logits_fn=None):
    trace = []
    out = sample(logits_fn or scripted(), [list(p) for p in prompts], VOCABULARY,
                 replace(cfg, shift=shift), trace)
    return out, trace


@pytest.mark.unit
@pytest.mark.parametrize("rule", ["confidence", "origin", "p2"])
def test_prompt_untouched_and_everything_decoded(rule):
    cfg = SamplerConfig(gen_length=12, steps=6, unmasking=rule, temperature=1.0, seed=3)
    out, trace = run(cfg)
    assert len(trace) == 6
    for tokens in trace:
        assert tokens[0, :3].tolist() == [5, 6, 7]
    assert MASK not in out[0] and all(0 <= t < VOCAB for t in out[0])


@pytest.mark.unit
def test_confidence_rule_commits_a_linear_schedule_and_never_revises():
    cfg = SamplerConfig(gen_length=12, steps=4)
    _, trace = run(cfg)
    masked = [int((t[0, 3:] == MASK).sum()) for t in trace]
    assert masked == [9, 6, 3, 0]
    for before, after in zip(trace, trace[1:]):
        decoded = before[0, 3:] != MASK
        assert torch.equal(before[0, 3:][decoded], after[0, 3:][decoded])


@pytest.mark.unit
def test_p2_keeps_the_schedule_and_may_revise_decoded_tokens():
    cfg = SamplerConfig(gen_length=12, steps=4, unmasking="p2")
    _, trace = run(cfg)
    assert [int((t[0, 3:] == MASK).sum()) for t in trace] == [9, 6, 3, 0]
    revised = any(
        ((before[0, 3:] != MASK) & (after[0, 3:] != before[0, 3:])).any()
        for before, after in zip(trace, trace[1:])
    )
    assert revised


@pytest.mark.unit
def test_origin_rule_finishes_on_the_last_step():
    cfg = SamplerConfig(gen_length=16, steps=5, block_length=16, unmasking="origin", seed=1)
    _, trace = run(cfg)
    counts = [int((t[0, 3:] == MASK).sum()) for t in trace]
    assert counts == sorted(counts, reverse=True) and counts[-1] == 0


@pytest.mark.unit
def test_blocks_unmask_left_to_right():
    cfg = SamplerConfig(gen_length=12, steps=6, block_length=4)
    _, trace = run(cfg)
    for step, tokens in enumerate(trace):
        block = step // 2  # 3 blocks, 2 steps each
        generated = tokens[0, 3:]
        assert (generated[: 4 * block] != MASK).all()
        assert (generated[4 * (block + 1):] == MASK).all()


@pytest.mark.unit
def test_shift_reads_the_previous_position():
    def logits_fn(tokens, _mask, _window):
        logits = torch.zeros(*tokens.shape, 64)
        positions = torch.arange(tokens.shape[1])
        logits[:, positions, (positions + 10) % VOCAB] = 10.0  # position i votes for i + 10
        return logits

    cfg = SamplerConfig(gen_length=4, steps=4)
    shifted, _ = run(cfg, logits_fn=logits_fn, shift=True)
    unshifted, _ = run(cfg, logits_fn=logits_fn, shift=False)
    assert shifted[0] == [12, 13, 14, 15]  # generated position 3 reads position 2's logits
    assert unshifted[0] == [13, 14, 15, 16]


@pytest.mark.unit
def test_eos_stops_and_fills():
    def logits_fn(tokens, _mask, _window):
        logits = torch.zeros(*tokens.shape, 64)
        logits[:, :, 20] = 1.0
        logits[:, 4, EOS] = 5.0  # (shifted) generated position 5 is EOS, very confidently
        return logits

    cfg = SamplerConfig(gen_length=8, steps=8, eos_id=EOS)
    out, trace = run(cfg, logits_fn=logits_fn)
    assert out[0] == [20, 20, EOS, EOS, EOS, EOS, EOS, EOS]
    assert len(trace) < 8  # stopped early


@pytest.mark.unit
def test_batches_of_different_lengths_are_deterministic_and_pad_is_isolated():
    tokens, start, mask = prepare([[5], [5, 6, 7]], SamplerConfig(gen_length=4), MASK, PAD)
    assert start == 3 and tokens[0].tolist() == [PAD, PAD, 5, MASK, MASK, MASK, MASK]
    assert mask[0, 0, 2, 0] and mask[0, 0, 0, 2] and not mask[0, 0, 2, 3]
    assert not mask[1].any()
    cfg = SamplerConfig(gen_length=6, steps=3, temperature=0.8, top_k=10, top_p=0.9, seed=7)
    first, _ = run(cfg, prompts=([5], [5, 6, 7]), logits_fn=scripted(4))
    second, _ = run(cfg, prompts=([5], [5, 6, 7]), logits_fn=scripted(4))
    assert first == second


@pytest.mark.unit
def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="must divide"):
        run(SamplerConfig(gen_length=10, block_length=4))
    with pytest.raises(ValueError, match="multiple of the 3 blocks"):
        run(SamplerConfig(gen_length=12, block_length=4, steps=4))


@pytest.mark.unit
def test_infilling_restores_a_span_with_an_oracle_and_keeps_the_context():
    from megalign.config import Config, ModelConfig
    from megalign.diffusion.objective import MaskedDiffusion
    from megalign.evaluation.heldout import infilling

    cfg = Config(model=ModelConfig(document_attention=False))

    tokens = torch.randint(2, VOCAB, (2, 17))
    raw = {"tokens": tokens, "position_ids": torch.arange(16).repeat(2, 1),
           "sample_index": torch.tensor([0, 1])}
    seen = []

    def oracle(x, _positions, _mask):  # position i knows token i + 1
        seen.append(x.clone())
        logits = torch.zeros(*x.shape, 64)
        logits.scatter_(2, tokens[:, 1:].unsqueeze(-1), 9.0)
        return logits

    exact, accuracy = infilling(oracle, [raw], MaskedDiffusion.of(cfg), VOCABULARY, span=4,
                                steps=2)
    assert (exact.value, accuracy.value) == (1.0, 1.0)
    first = seen[0]
    assert (first[:, 6:10] == MASK).all()  # the middle span is masked...
    assert torch.equal(first[:, :6], tokens[:, :6]) and torch.equal(first[:, 10:], tokens[:, 10:16])


def test_vocab_parallel_shards_sample_like_the_full_vocabulary(tmp_path):
    """TP2 shards (only per-position scalars and top-k candidates exchanged) and a pipeline
    stage without logits decode exactly what one rank with the whole vocabulary decodes."""
    import json

    from conftest import WORKERS, torchrun

    out = tmp_path / "report.json"
    torchrun(2, WORKERS / "sampler_shards.py", ["--out", out], timeout=300)
    report = json.loads(out.read_text())
    assert report["cases"] == 108 and report["mismatches"] == []


@pytest.mark.unit
def test_threshold_commits_the_confident_positions_and_at_least_one():
    """Every masked position of the block at or above the threshold, the most confident when
    none is; the prompt is never touched; EOS still stops a sample."""
    from megalign.diffusion.decoding import commit_confident

    current = torch.tensor([MASK, 7, MASK, MASK])
    masked = current == MASK
    predicted = torch.tensor([20, 21, 22, 23])
    confidence = torch.tensor([0.95, 0.99, 0.5, 0.91])
    assert (commit_confident(current, masked, predicted, confidence, 0.9).tolist()
            == [20, 7, MASK, 23])
    assert (commit_confident(current, masked, predicted, confidence, 0.99).tolist()
            == [20, 7, MASK, MASK])

    prompts = ([5, 6, 7], [9])
    out, trace = run(SamplerConfig(gen_length=8, threshold=0.99), prompts)
    assert all(t != MASK for row in out for t in row)
    for tokens in trace:  # the prompts (left-padded) stay as they were
        assert tokens[0, :3].tolist() == [5, 6, 7] and tokens[1, 2].item() == 9
    # random logits are never this confident: one position per step, as many steps as tokens
    assert len(trace) == 8
    everything, trace = run(SamplerConfig(gen_length=8, threshold=0.0), prompts)
    assert len(trace) == 1  # all of the block at once

    def eos_first(tokens, _mask, _window):
        logits = torch.zeros(*tokens.shape, 64)
        logits[..., EOS] = 9.0
        return logits

    stopped, trace = run(SamplerConfig(gen_length=16, block_length=8, threshold=0.5, eos_id=EOS),
                         logits_fn=eos_first)
    assert stopped == [[EOS] * 16] and len(trace) == 1


@pytest.mark.unit
def test_dual_cache_needs_the_cache_and_the_suffix():
    for options in ({"dual_cache": True}, {"dual_cache": True, "cache": True, "suffix": False}):
        with pytest.raises(ValueError, match="the dual cache keeps the positions after the block"):
            SamplerConfig(**options).check()
    SamplerConfig(dual_cache=True, cache=True).check()


@pytest.mark.unit
def test_threshold_needs_the_confidence_rule():
    with pytest.raises(ValueError, match="does not combine with the 'p2' unmasking rule"):
        SamplerConfig(threshold=0.9, unmasking="p2").check()


@pytest.mark.slow
def test_cached_and_threshold_decoding_across_layouts(tmp_path, ar_checkpoint):
    """Refreshed every step the cache (and the dual cache) gives exactly the uncached tokens;
    block-causal decoding (a block-diffusion student's) gives them with the cache refreshed once
    per block; the cache's keys and values and a window's logits equal a full recomputation (the
    dual cache's up to summation order); the bfloat16 student's logits follow float32's; TP2 x PP2
    gives one process's tokens in every mode."""
    import json

    from conftest import WORKERS, torchrun

    reports = {}
    for name, (tp, pp) in {"one": (1, 1), "tp2pp2": (2, 2)}.items():
        out = tmp_path / f"{name}.json"
        torchrun(tp * pp, WORKERS / "cached_sampler.py", [
            "--checkpoint", ar_checkpoint, "--out", out,
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}"])
        reports[name] = json.loads(out.read_text())
    for name, ranks in reports.items():
        tokens = ranks[0]["tokens"]
        assert all(rank["tokens"] == tokens for rank in ranks)  # every rank ends with the same
        assert tokens["refresh_every_step"] == tokens["plain"], name
        assert tokens["no_suffix_refresh_every_step"] == tokens["no_suffix"], name
        assert tokens["block_cache"] == tokens["block"], name  # refreshed once per block only
        assert tokens["block_cache_sampled"] == tokens["block_sampled"], name
        assert tokens["dual_refresh_every_step"] == tokens["plain"], name
        assert len(tokens["dual"][0]) == len(tokens["dual_threshold"][0]) == 16
        assert tokens["no_suffix"] != tokens["plain"]  # the suffix is really left out
        assert all(rank["kv_equal"] for rank in ranks), name
        diffs = [rank["window_max_diff"] for rank in ranks if "window_max_diff" in rank]
        assert diffs and max(diffs) <= 1e-4, (name, diffs)
        last = [rank for rank in ranks if "dual_max_diff" in rank]
        assert last and all(rank["dual_first_position"] == [5, 5] for rank in last), name
        assert max(rank["dual_max_diff"] for rank in last) <= 1e-4, name
        assert max(rank["dual_kv_max_diff"] for rank in ranks) <= 1e-4, name
        assert all(rank["bf16_weights"] for rank in ranks), name
        assert all(rank["bf16_max_diff"] <= 0.05 * rank["logits_max"] for rank in last), name
    assert reports["tp2pp2"][0]["tokens"] == reports["one"][0]["tokens"]


@pytest.mark.unit
def test_the_export_ships_the_library_decoding_rules(tmp_path):
    """An export decodes by megalign's rules: its decoding.py is the library module's bytes, which
    import nothing but torch and the standard library, and the modeling file imports it as its
    only sibling (transformers copies relative imports of remote code)."""
    import ast
    import sys
    from pathlib import Path

    from megalign.convert.checkpoints import write_modeling_files
    from megalign.diffusion import decoding

    write_modeling_files(str(tmp_path))
    assert (tmp_path / "decoding.py").read_bytes() == Path(decoding.__file__).read_bytes()
    tree = ast.parse((tmp_path / "decoding.py").read_text())
    imported = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert imported <= {"torch"} | set(sys.stdlib_module_names), imported
    modeling = ast.parse((tmp_path / "modeling_megalign.py").read_text())
    relative = {node.module for node in ast.walk(modeling)
                if isinstance(node, ast.ImportFrom) and node.level}
    absolute = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                for node in ast.walk(modeling) if isinstance(node, (ast.Import, ast.ImportFrom))
                and not getattr(node, "level", 0) for alias in node.names}
    assert relative == {"decoding"} and "megalign" not in absolute
