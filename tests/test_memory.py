"""The memory planner: its numbers for a fixed config against a hand computation, its parameter
table and per-layer activations against built models (TP2 x PP2, SP, VPP, GQA, QK-norm, MoE,
GPT-2, bf16, recomputation), and its totals against the peak memory of real training runs."""

import json
import time

import pytest
import torch

from megalign.config import load_config
from megalign.model import memory
from megalign.telemetry.peak_memory import SAMPLE_INTERVAL_S, MemoryProbe
from megalign.training import memory_plan

from conftest import TINY_CONFIG, WORKERS, finish, launch, run_env, torchrun
from fuzz.targets import run_main

HAND = ["data.tokenizer=x", "model.num_layers=4", "model.hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=128",
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
        "data.micro_batch_size=2", "data.global_batch_size=8", "align.weight=10",
        "optimizer.freeze=[embedding]"]


@pytest.mark.unit
def test_plan_equals_a_hand_computation():
    """TP1 x PP2 x DP1, fp32 on CPU, REPR-ALIGN with the embedding frozen and shared, tied
    embeddings, 4 micro-batches of 2 x 128 tokens, every number worked out by hand below."""
    cfg = load_config([TINY_CONFIG], HAND)
    stages = memory_plan.plan(cfg, vocab_size=4224, world_size=2, gpu=False)
    # one layer: 2 norms of 64, QKV (4 + 2 * 2) * 16 rows x 64, output 64 x 64, SwiGLU 2 * 192 x
    # 64 and 64 x 192 (ffn: 8/3 * 64 rounded up to 64)
    layer = 64 + 8 * 16 * 64 + 64 * 64 + 64 + 2 * 192 * 64 + 64 * 192
    assert layer == 49280
    embedding = 4224 * 64
    first, last = 2 * layer + embedding, 2 * layer + 64 + embedding  # final norm, output copy
    tokens = 128 * 2
    # per layer and micro-batch: RMSNorms (fp32 input, output, statistic) and the QKV and fc1
    # inputs; queries, repeated keys and values and the context (GQA), rotary cos/sin; the
    # scores' softmax; SwiGLU's fused input, its halves and fc2's input
    activations = (tokens * (2 * (8 * 64 + 4) + 2 * 64 * 4) + (tokens * 4 * 64 + 4 * 128 * 16) * 4
                   + 2 * 4 * 128 * 128 * 4 + tokens * 5 * 192 * 4)
    chunk = 2 * activations + 2 * 128 * 128  # + the boolean document mask
    state = 128 * 2 * 64 * 4  # one aligned fp32 teacher state of a micro-batch
    assert stages[0].bytes == {
        "student_parameters": first * 4, "gradients": 2 * layer * 4,
        "optimizer_states": 2 * layer * 8, "teacher_parameters": 2 * layer * 4,  # embedding shared
        "activations": 2 * chunk,  # 1F1B: stage 0 of 2 holds 2 micro-batches
        "teacher_states": 3 * 2 * state,  # states 0, 1, 2 for 2 micro-batches
        "score_buffer": 2 * 4 * 128 * 128 * 4,
        "attention_backward": 2 * (2 * 4 * 128 * 128 * 4)}  # gradients of probabilities, scores
    assert stages[1].bytes == {
        "student_parameters": last * 4, "gradients": (2 * layer + 64) * 4,
        "optimizer_states": (2 * layer + 64) * 8,
        "teacher_parameters": (2 * layer + 64) * 4,  # no LM head (the frozen output copy)
        "activations": chunk, "teacher_states": 2 * state,  # states 3 and 4
        "loss_workspace": 2 * tokens * 4224 * 4, "score_buffer": 2 * 4 * 128 * 128 * 4,
        "attention_backward": 2 * (2 * 4 * 128 * 128 * 4)}
    assert (stages[0].in_flight, stages[1].in_flight) == (2, 1)
    assert stages[0].trainable == 2 * layer and stages[0].parameters == first


@pytest.mark.unit
def test_context_parallelism_and_thd_by_hand():
    """The hand computation above at CP2 (world 4: TP1 x PP2 x CP2): a rank's 64 positions of
    every sequence, its attention over the 128 gathered keys and values (2 x 128 x 2 samples x 4
    heads x 16, repeated under GQA) and the 128 int64 positions of their order, its 64 score rows
    and mask rows, the teacher states and logits of its positions; the weights as at CP1. Packed
    documents (THD): no mask on a GPU, the same mask as the explicit layout on CPU."""
    cfg = load_config([TINY_CONFIG], [*HAND, "parallel.context_parallel_size=2"])
    stages = memory_plan.plan(cfg, vocab_size=4224, world_size=4, gpu=False)
    base = memory_plan.plan(load_config([TINY_CONFIG], HAND), 4224, 2, False)
    tokens = 64 * 2
    activations = (tokens * (2 * (8 * 64 + 4) + 2 * 64 * 4)
                   + (tokens * 2 * 64 + 2 * 128 * 2 * 4 * 16 + 4 * 64 * 16) * 4 + 128 * 8
                   + 2 * 4 * 64 * 128 * 4 + tokens * 5 * 192 * 4)
    chunk = 2 * activations + 2 * 64 * 128
    assert stages[0].bytes["activations"] == 2 * chunk
    assert stages[1].bytes["activations"] == chunk
    assert stages[0].bytes["teacher_states"] == 3 * 2 * (64 * 2 * 64 * 4)
    assert stages[1].bytes["loss_workspace"] == 2 * tokens * 4224 * 4
    assert stages[1].bytes["score_buffer"] == 2 * 4 * 64 * 128 * 4
    assert stages[1].bytes["attention_backward"] == 2 * (2 * 4 * 64 * 128 * 4)
    for key in ("student_parameters", "gradients", "optimizer_states", "teacher_parameters"):
        assert stages[0].bytes[key] == base[0].bytes[key], key
    assert stages[0].bytes["activations"] / base[0].bytes["activations"] < 0.55

    def activations_of(fmt: str, gpu: bool) -> int:
        cfg = load_config([TINY_CONFIG], [*HAND, f"model.document_format={fmt}"])
        planned = memory_plan.plan(cfg, 4224, 2, gpu)
        return planned[1].bytes["activations"]

    mask = 2 * 128 * 128
    assert activations_of("mask", True) - activations_of("thd", True) == mask
    assert activations_of("mask", False) == activations_of("thd", False)


@pytest.mark.unit
def test_evaluation_between_steps_by_hand():
    """The hand computation above with evaluation inside the run: batches of 8 scored (every rank
    holds their whole vocabulary's fp32 logits, the cross-entropy's contiguous copy and its
    log-softmax) and 2 prompts of 16 continued by 32 tokens in blocks of 8 (the last stage holds
    the previous step's logits, the model's output and its transposed copy, then five copies of
    a block's rows); the score buffer grows to the batch of 8. Evaluation runs between steps, so
    the peak counts the larger of it and a step's working memory, not both."""
    evaluating = ["evaluation.interval=10", "evaluation.batch_size=8", "evaluation.samples=8",
                  "evaluation.generation_samples=2"]
    stages = memory_plan.plan(load_config([TINY_CONFIG], [*HAND, *evaluating]), 4224, 2, False)
    base = memory_plan.plan(load_config([TINY_CONFIG], HAND), 4224, 2, False)
    scoring = 8 * 128 * 4224 * 3 * 4
    decoding = 2 * 48 * 4224 * 3 * 4 + 5 * 2 * 8 * 4224 * 4
    assert scoring > decoding
    assert [s.bytes["evaluation"] for s in stages] == [scoring, scoring]
    assert [s.bytes["score_buffer"] for s in stages] == [8 * 4 * 128 * 128 * 4] * 2
    step_items = ("activations", "teacher_states", "loss_workspace", "attention_backward")
    for stage, before in zip(stages, base):
        step = sum(stage.bytes.get(k, 0) for k in step_items)
        held = (sum(stage.bytes.values()) - step - stage.bytes["evaluation"])
        assert stage.total == held + max(step, scoring)
        assert held == before.total - step + 8 * 4 * 128 * 128 * 4 - 2 * 4 * 128 * 128 * 4 + \
            stage.bytes["scorer_parameters"]
    # under CP2 the last stage gathers the ranks' parts (its own half beside the three copies)
    cp = memory_plan.plan(load_config([TINY_CONFIG], [*HAND, *evaluating,
                                                      "parallel.context_parallel_size=2",
                                                      "evaluation.generation_samples=0"]),
                          4224, 4, False)
    assert [s.bytes["evaluation"] for s in cp] == [scoring, scoring // 3 // 2 + scoring]
    # generation outgrows scoring with batches of 1 and long continuations
    longer = [*HAND, *evaluating, "evaluation.batch_size=1", "evaluation.prompt_length=32",
              "evaluation.gen_length=96"]
    long = memory_plan.plan(load_config([TINY_CONFIG], longer), 4224, 2, False)
    assert long[0].bytes["evaluation"] == 128 * 4224 * 3 * 4
    assert long[1].bytes["evaluation"] == 2 * 128 * 4224 * 3 * 4 + 5 * 2 * 8 * 4224 * 4
    # in bf16 the last stage's output is bf16 and its fp32 copy is made beside it
    bf16 = memory_plan.plan(load_config([TINY_CONFIG], [*longer, "precision=bf16"]), 4224, 2,
                            False)
    assert bf16[1].bytes["evaluation"] == 2 * 128 * 4224 * (4 + 2 * 2 + 4) + 5 * 2 * 8 * 4224 * 4


@pytest.mark.unit
def test_optimizer_sharding_bf16_and_recomputation_change_what_they_should():
    def plan(*extra, world=2):
        return memory_plan.plan(load_config([TINY_CONFIG], [*HAND, *extra]), 4224, world, False)[0]

    base = plan()
    bf16 = plan("precision=bf16")
    assert bf16.bytes["student_parameters"] * 2 == base.bytes["student_parameters"]
    assert bf16.bytes["optimizer_states"] == base.bytes["optimizer_states"] * 3 // 2  # + main
    sharded = plan("optimizer.distributed=true", world=4)  # DP 2
    assert sharded.bytes["optimizer_states"] * 2 == base.bytes["optimizer_states"]
    assert plan("align.share_frozen=false").bytes["teacher_parameters"] == \
        base.bytes["student_parameters"]
    assert plan("recompute.granularity=full").bytes["activations"] < \
        base.bytes["activations"] / 3  # 2 micro-batches keep layer inputs; one layer recomputed
    assert "teacher_parameters" not in plan("align.weight=0").bytes
    # experts' states shard over the ranks that hold the same experts: DP 4 / EP 2
    moe = load_config([TINY_CONFIG], [*HAND, "model.num_experts=4", "optimizer.freeze=[]",
                                      "parallel.pipeline_model_parallel_size=1",
                                      "parallel.expert_model_parallel_size=2",
                                      "optimizer.distributed=true"])
    table = memory.chunk_parameters(moe, 4224, 0, 0)
    experts = sum(n for name, n in table if ".experts." in name)
    assert experts == 4 * 2 * (2 * 192 * 64 + 64 * 192)  # 2 of 4 experts in each of 4 layers
    assert memory_plan.plan(moe, 4224, 4, False)[0].bytes["optimizer_states"] == \
        (sum(n for _, n in table) - experts) * 8 // 4 + experts * 8 // 2


@pytest.mark.unit
def test_interleaved_schedule_holds_megatron_cores_warmup():
    cfg = load_config([TINY_CONFIG], [*HAND, "model.num_layers=8",
                                      "parallel.pipeline_model_parallel_size=4",
                                      "parallel.virtual_pipeline_model_parallel_size=2",
                                      "data.global_batch_size=16"])
    # Megatron-Core's interleaved warm-up: (pp - rank - 1) * 2 + (vpp - 1) * pp, plus one
    assert [memory_plan.in_flight(cfg, stage, 8) for stage in range(4)] == [11, 9, 7, 5]
    assert [list(memory.chunk_layers(cfg, 1, c)) for c in range(2)] == [[1], [5]]


@pytest.mark.unit
def test_megalign_plan_prints_the_plan_and_refuses_a_bad_layout():
    from megalign.cli.plan import main

    outcome = run_main(main, ["--config", str(TINY_CONFIG), "--world-size", "4",
                              "--vocab-size", "4096", "--json"])
    assert outcome.code == 0, outcome.stderr
    result = json.loads(outcome.stdout)
    cfg = load_config([TINY_CONFIG], [])
    expected = memory_plan.plan(cfg, 4224, 4, gpu=False)  # 4096 + the mask row, rounded up to 128
    assert [s["total_bytes"] for s in result["stages"]] == [s.total for s in expected]
    table = run_main(main, ["--config", str(TINY_CONFIG), "--world-size", "4",
                            "--vocab-size", "4096"])
    assert "stage 1:" in table.stdout and "teacher parameters" in table.stdout
    bad = run_main(main, ["--config", str(TINY_CONFIG), "--world-size", "3",
                          "--vocab-size", "4096"])
    assert bad.code == 2 and "does not divide the world size 3" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.unit
def test_megalign_plan_reads_a_hugging_face_config(tmp_path):
    from megalign.cli.plan import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "qwen3", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "hidden_act": "silu"}))
    outcome = run_main(main, ["--config", str(TINY_CONFIG), "--world-size", "4",
                              "--hf-config", str(config), "--json"])
    assert outcome.code == 0, outcome.stderr
    cfg = load_config([TINY_CONFIG], ["model.num_layers=2", "model.ffn_hidden_size=96",
                                      "model.head_dim=32", "model.qk_norm=true",
                                      "model.tie_embeddings=false", "model.norm_epsilon=1e-6",
                                      "model.max_position_embeddings=256",
                                      "model.rotary_base=10000"])
    expected = memory_plan.plan(cfg, 1024, 4, gpu=False)
    assert [s["parameters"] for s in json.loads(outcome.stdout)["stages"]] == \
        [s.parameters for s in expected]


VARIANTS = [[], ["model.qk_norm=true", "model.num_query_groups=2", "model.head_dim=32"],
            ["precision=bf16"],
            ["precision=bf16", "model.qk_norm=true", "model.num_query_groups=2",
             "model.head_dim=32"],
            ["parallel.sequence_parallel=true", "recompute.granularity=selective"],
            ["model.qk_norm=true", "model.num_query_groups=4", "parallel.sequence_parallel=true",
             "precision=bf16", "recompute.granularity=selective"],
            ["model.arch=gpt2", "model.num_query_groups=4"],
            ["model.arch=gpt2", "model.num_query_groups=4", "precision=bf16"],
            ["model.num_experts=4", "parallel.sequence_parallel=true"],
            ["model.num_experts=4", "parallel.sequence_parallel=true", "precision=bf16",
             "model.moe_shared_expert_ffn_hidden_size=96", "model.moe_shared_expert_gate=true"],
            ["model.num_experts=4", "parallel.sequence_parallel=true",
             "recompute.granularity=selective", "recompute.modules=[mlp,moe]"]]


CP2 = ["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=1"]


@pytest.mark.slow
@pytest.mark.parametrize("layout, variants", [
    ([], VARIANTS),  # tiny.yaml: TP2 x PP2
    (["parallel.virtual_pipeline_model_parallel_size=2", "optimizer.freeze=[embedding]"], [[]]),
    # PP2 x CP2: each rank's half of the positions, attending over the gathered keys and values
    (CP2, [[], ["model.qk_norm=true", "model.num_query_groups=2", "model.head_dim=32",
                "precision=bf16"], ["model.arch=gpt2", "model.num_query_groups=4"]]),
], ids=["tp2pp2", "tp2pp2vpp2", "pp2cp2"])
def test_plan_matches_built_models_and_saved_activations(tmp_path, data_overrides, layout,
                                                         variants):
    """Every rank's chunks: the planned parameter table is the built one, name for name; each
    layer's planned activation bytes are the bytes of the storages autograd saved in a forward
    pass (the first layer of a chunk also keeps the document mask). Exact, except the MoE
    router under sequence parallelism (within 1%)."""
    torchrun(4, WORKERS / "memory_checks.py",
             ["--config", TINY_CONFIG, "--out", tmp_path, "--variants", json.dumps(variants),
              *data_overrides, *layout])
    cp = 2 if layout == CP2 else 1
    mask = 2 * 128 // cp * 128  # this rank's rows
    reports = [r for rank in range(4)
               for r in json.loads((tmp_path / f"rank{rank}.json").read_text())]
    assert len(reports) == 4 * len(variants) * (2 if "virtual" in str(layout) else 1)
    for report in reports:
        assert report["parameters_differ"] == [], report
        first, *rest = report["measured_layer_bytes"]
        planned = report["planned_layer_bytes"]
        tolerance = 0.01 * planned if any("experts" in o for o in report["variant"]) else 4
        for measured in [first - mask, *rest]:  # 4: the checkpoint's RNG-state integer
            assert abs(measured - planned) <= tolerance, report


def train_and_read_memory(tmp_path, nproc, overrides) -> dict:
    """memory.json of a short megalign-train run."""
    run_dir = tmp_path / "run"
    process = launch(nproc, ["-m", "megalign.cli.train", "--config", str(TINY_CONFIG),
                             "model.num_layers=8", "model.num_attention_heads=8",
                             "schedule.train_iters=3", "schedule.warmup_iters=1",
                             f"logging.run_dir={run_dir}", *overrides], env=run_env())
    code, out, err = finish(process)
    assert code == 0, err[-4000:]
    return json.loads((run_dir / "memory.json").read_text())


@pytest.mark.unit
def test_the_probe_counts_live_tensors():
    """On CPU the probe's peak is the most bytes live at once: a 200 MB tensor, then 200 MB of
    small tensors after it was freed, peak at 200 MB (the resident set size would also keep
    whatever of the freed memory glibc holds for reuse: docs/training.md)."""
    probe = MemoryProbe()
    try:
        assert probe.method == "malloc in use (mallinfo2)"
        big = torch.ones(50_000_000)
        assert 0.98 * 200e6 <= probe.peak() <= 1.02 * 200e6  # the process frees and allocates
        del big                                               # a little of its own meanwhile
        small = [torch.ones(100_000) for _ in range(500)]
        time.sleep(3 * SAMPLE_INTERVAL_S)  # sampled while they live
        del small
        assert 0.98 * 200e6 <= probe.peak() <= 1.02 * 200e6
    finally:
        probe.close()


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", [
    (1, ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
         "model.hidden_size=512"]),
    # evaluation inside the run (held-out and unseen-corpus NELBO, generation and its causal
    # scorer) at the start and the end, its batches of 32 outgrowing the training step's peak
    (2, ["parallel.tensor_model_parallel_size=1", "model.hidden_size=256",
         "evaluation.interval=3", "evaluation.samples=32", "evaluation.batch_size=32",
         "evaluation.generation_samples=4", "evaluation.ood_paths=[{corpus}]"]),
    (4, ["parallel.tensor_model_parallel_size=1", "parallel.virtual_pipeline_model_parallel_size=2",
         "precision=bf16", "optimizer.distributed=true", "optimizer.freeze=[embedding]",
         "recompute.granularity=full", "model.hidden_size=1024"]),
], ids=["tp1pp1-fp32", "pp2-evaluation", "pp2vpp2dp2-bf16-distributed-recompute"])
def test_measured_peak_is_within_15_percent_of_the_plan(tmp_path, data_overrides, corpus_prefix,
                                                      nproc, layout):
    layout = [override.format(corpus=corpus_prefix) for override in layout]
    record = train_and_read_memory(tmp_path, nproc, [*data_overrides, *layout])
    planned = {stage["stage"]: stage["total_bytes"] for stage in record["planned"]}
    assert len(record["measured"]) == nproc
    for rank in record["measured"]:
        ratio = rank["peak_bytes"] / planned[rank["stage"]]
        assert 0.85 <= ratio <= 1.15, (rank, planned)
