"""Context parallelism: megalign's core attention (the local spec's, which runs without Transformer
Engine) against full attention, and training split over the context-parallel group against the
unsplit run."""

import json

import pytest

from conftest import TINY_CONFIG, WORKERS, finish, launch, metrics, run_python, torchrun

MASK_KINDS = ("bidirectional", "causal", "documents", "documents_causal", "block_causal")


@pytest.mark.slow
@pytest.mark.compat  # DotProductAttention and the CP layout helpers of both Megatron-Core releases
def test_core_attention_equals_full_attention_alone_and_over_cp2(tmp_path):
    """float64, random inputs, 2 query groups of 2 heads: outputs and the gradients of queries,
    keys and values at each rank's positions, for every mask kind, and for the per-document kinds
    with the documents packed as THD (PackedSeqParams); a key's gradient reaches the rank that
    holds it. megalign's split of the sequence is Megatron-Core's (its batch split and
    its rotary embedding's)."""
    out = tmp_path / "checks.json"
    torchrun(2, WORKERS / "core_attention_checks.py", ["--out", out])
    ranks = json.loads(out.read_text())
    for rank in ranks:
        assert rank["layout"] == {"batch": True, "rotary": True}
        for kind in MASK_KINDS:
            layouts = ("alone", "cp2", "thd") if kind.startswith("documents") else ("alone", "cp2")
            assert set(rank[kind]) == set(layouts), kind
            for layout in layouts:
                for name, difference in rank[kind][layout].items():
                    assert difference < 1e-12, (kind, layout, name, difference)


TRAIN = ["-m", "megalign.cli.train", "--config", str(TINY_CONFIG), "schedule.train_iters=6",
         "schedule.warmup_iters=1", "logging.log_interval=1", "data.global_batch_size=4",
         "data.micro_batch_size=2", "parallel.tensor_model_parallel_size=1",
         "parallel.pipeline_model_parallel_size=2", "evaluation.interval=3",
         "evaluation.samples=4"]


def train(run, cp: int, data_overrides, *extra) -> dict:
    """megalign-train on PP2 x CP ``cp``; its metrics by iteration."""
    code, out, err = finish(launch(2 * cp, [*TRAIN, *data_overrides, f"logging.run_dir={run}",
                                            f"parallel.context_parallel_size={cp}", *extra]))
    assert code == 0, err[-3000:]
    return metrics(run)


def validation(run) -> list:
    return [json.loads(line)["val_nelbo"]
            for line in (run / "validation.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_and_resume_across_context_parallel_sizes(tmp_path, data_overrides,
                                                           ar_checkpoint):
    """megalign-train at PP2 x CP2 equals PP2 x CP1: the losses of every step and the held-out
    NELBO evaluated inside the run (each rank scores its part of the sequence). Its checkpoint
    resumes at CP2 with exactly the losses of the uninterrupted run and at CP1 with them to
    float rounding (the weights are replicated over CP; the RNG states resume only into the
    layout that wrote them); a CP1 checkpoint resumes at CP2 alike."""
    common = [f"model.init_checkpoint={ar_checkpoint}", "checkpoint.save_interval=3"]
    runs = {cp: tmp_path / f"cp{cp}" for cp in (1, 2)}
    full = {cp: train(run, cp, data_overrides, *common, f"checkpoint.save={run}/ckpt")
            for cp, run in runs.items()}
    assert sorted(full[2]) == list(range(1, 7))
    for iteration, record in full[1].items():
        assert full[2][iteration]["loss"] == pytest.approx(record["loss"], rel=1e-5), iteration
    assert validation(runs[2]) == pytest.approx(validation(runs[1]), rel=1e-6)
    for written, resumed in ((2, 2), (2, 1), (1, 2)):
        checkpoint = runs[written] / "ckpt" / "iter_0000003"
        after = train(tmp_path / f"from{written}at{resumed}", resumed, data_overrides, *common,
                      f"checkpoint.load={checkpoint}", "evaluation.interval=0")
        assert sorted(after) == [4, 5, 6]
        for iteration, record in after.items():
            want = full[resumed][iteration]["loss"]
            if written == resumed:
                assert record["loss"] == want, (written, resumed, iteration)
            else:
                assert record["loss"] == pytest.approx(want, rel=1e-5), (written, resumed)
    # sampling runs without context parallelism; the CP2 checkpoint samples at CP1
    generate = ["-m", "megalign.cli.generate", "--checkpoint", runs[2] / "ckpt", "--prompt", "In",
                "--gen-length", "4", "--steps", "2"]
    assert run_python(generate).stdout.strip().startswith('{"prompt": "In"')
    refused = run_python([*generate, "parallel.context_parallel_size=2"], check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines() == [
        "megalign-generate: error: parallel.context_parallel_size: sampling and evaluating "
        "commands run without context parallelism (a checkpoint trained with it loads into any "
        "layout); leave it at 1"]
