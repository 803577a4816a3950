"""The backbone: the same model, weights and global batch give the same losses, per-layer cosines
and gradients under every parallel layout (real torchrun + gloo runs), and match a plain
single-process PyTorch computation of the formula written here, independently of Megatron."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import MOE, QWEN3, TINY_CONFIG, WORKERS, make_ar_checkpoint, torchrun

# name -> (TP, PP, processes, extra overrides); DP = processes / (TP * PP * CP)
LAYOUTS = {
    "tp1pp1": (1, 1, 1, []),
    "tp2pp1": (2, 1, 2, []),
    "tp1pp2": (1, 2, 2, []),
    "tp2pp2": (2, 2, 4, []),
    # sequence parallel: each TP rank holds half the positions of every hidden state
    "tp2pp2sp": (2, 2, 4, ["parallel.sequence_parallel=true"]),
    # one teacher forward for the step's 2 micro-batches (the others: one per micro-batch); the
    # teacher keeps its LM head on the last stage and logs its AR loss
    "tp2pp2g2": (2, 2, 4, ["align.teacher_microbatches=2", "align.log_teacher_loss=true"]),
    "dp2": (1, 1, 2, []),
    # interleaved 1F1B: 2 virtual stages per PP rank, one layer per model chunk, and the teacher
    # run once per step on every chunk
    "tp1pp2vpp2": (1, 2, 2, ["parallel.virtual_pipeline_model_parallel_size=2",
                             "align.teacher_microbatches=2"]),
    # context parallelism: each rank holds 2 of the 4 chunks of every sequence, student and
    # teacher alike (TP x CP with sequence parallelism, and PP x CP)
    "tp2cp2sp": (2, 1, 4, ["parallel.context_parallel_size=2", "parallel.sequence_parallel=true"]),
    "pp2cp2": (1, 2, 4, ["parallel.context_parallel_size=2"]),
    # the documents packed as THD (PackedSeqParams) instead of an explicit mask
    "tp2pp2spthd": (2, 2, 4, ["parallel.sequence_parallel=true", "model.document_format=thd"]),
}
CP_LAYOUTS = {"tp2cp2": (2, 1, 4, ["parallel.context_parallel_size=2"]),
              "pp2cp2": LAYOUTS["pp2cp2"]}
# the fast tier (-m "not slow") checks these two; the full suite every layout
CORE = ("tp1pp1", "tp2pp2")
GLOBAL_BATCH, MICRO_BATCH, ALIGN_WEIGHT = 4, 2, 10.0
RTOL = 1e-5


def run_layouts(out, layouts, data_overrides, checkpoint, extra=()):
    results = {}
    for name, (tp, pp, nproc, layout_extra) in layouts.items():
        torchrun(nproc, WORKERS / "train_checks.py", [
            "--config", TINY_CONFIG, "--out", out / name, *data_overrides,
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}",
            f"model.init_checkpoint={checkpoint}",
            f"data.global_batch_size={GLOBAL_BATCH}", f"data.micro_batch_size={MICRO_BATCH}",
            f"align.weight={ALIGN_WEIGHT}", f"logging.run_dir={out / name}/run", *layout_extra,
            *extra,
        ])
        summary = json.loads((out / name / "summary.json").read_text())
        ranks = [json.loads((out / name / f"rank{r}.json").read_text()) for r in range(nproc)]
        grads = {"plain": {}, "align": {}, "params": {}}
        for stage in range(pp):
            part = torch.load(out / name / f"grads_stage{stage}.pt")
            for kind in grads:
                grads[kind].update(part[kind])
        results[name] = {"summary": summary, "ranks": ranks, "grads": grads, "pp": pp}
    return results


@pytest.fixture(scope="module")
def core_runs(tmp_path_factory, data_overrides, ar_checkpoint):
    return run_layouts(tmp_path_factory.mktemp("equivalence"),
                       {name: LAYOUTS[name] for name in CORE}, data_overrides, ar_checkpoint)


@pytest.fixture(scope="module")
def runs(core_runs, tmp_path_factory, data_overrides, ar_checkpoint):
    others = {name: layout for name, layout in LAYOUTS.items() if name not in CORE}
    return {**core_runs, **run_layouts(tmp_path_factory.mktemp("equivalence_more"), others,
                                       data_overrides, ar_checkpoint)}


def layouts_to_check(names):
    """``names`` as parameters; those outside CORE run in the full suite only."""
    return [pytest.param(name, marks=() if name in CORE else pytest.mark.slow) for name in names]


def runs_for(request, layout: str) -> dict:
    return request.getfixturevalue("core_runs" if layout in CORE else "runs")


GPT2 = ["model.arch=gpt2", "model.num_query_groups=null"]
FREEZE = ["optimizer.freeze=[word_embeddings, 'layers\\.0\\.mlp']"]


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory, data_overrides):
    """GPT-2-style model (LayerNorm, GeLU, learned positions, biases) with frozen parameters."""
    out = tmp_path_factory.mktemp("gpt2")
    checkpoint = make_ar_checkpoint(out / "ar", data_overrides, GPT2)
    layouts = {"tp1pp1": (1, 1, 1, []), "tp2pp2": (2, 2, 4, []),
               "tp1pp1copies": (1, 1, 1, ["align.share_frozen=false"]),
               "tp1pp1bf16": (1, 1, 1, ["precision=bf16"])}
    return run_layouts(out, layouts, data_overrides, checkpoint, [*GPT2, *FREEZE])


SP = ["parallel.sequence_parallel=true"]  # Megatron-Core's MoE layer trains TP > 1 only with SP
MOE_LAYOUTS = {"tp1pp1": (1, 1, 1, []), "tp2pp1sp": (2, 1, 2, SP), "tp1pp2": (1, 2, 2, []),
               "tp2pp2sp": (2, 2, 4, SP),
               "ep2": (1, 1, 2, ["parallel.expert_model_parallel_size=2"]),
               "tp1pp2ep2": (1, 2, 4, ["parallel.expert_model_parallel_size=2"]),
               # experts over EP2 whose data-parallel ranks split each sequence over CP2
               "ep2cp2": (1, 1, 4, ["parallel.expert_model_parallel_size=2",
                                    "parallel.context_parallel_size=2"])}


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory, data_overrides, moe_checkpoint):
    return run_layouts(tmp_path_factory.mktemp("moe"), MOE_LAYOUTS, data_overrides,
                       moe_checkpoint, MOE)


@pytest.fixture(scope="module")
def qwen3_runs(tmp_path_factory, data_overrides):
    out = tmp_path_factory.mktemp("qwen3")
    checkpoint = make_ar_checkpoint(out / "ar", data_overrides, QWEN3)
    # without sequence parallelism, so the q/k norm gradients are summed over TP by name (the
    # MoE layouts below cover it with SP, PP alone and EP)
    layouts = {name: LAYOUTS[name] for name in ("tp1pp1", "tp2pp2")}
    return run_layouts(out, layouts, data_overrides, checkpoint, QWEN3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=1e-7)


@pytest.mark.parametrize("layout", layouts_to_check(name for name in LAYOUTS if name != "tp1pp1"))
def test_losses_and_cosines_match(request, layout):
    runs = runs_for(request, layout)
    ref, got = runs["tp1pp1"]["summary"], runs[layout]["summary"]
    for kind in ("plain", "align"):
        assert close(got[kind]["diffusion_loss"], ref[kind]["diffusion_loss"]), (kind, got, ref)
        assert close(got[kind]["align_loss"], ref[kind]["align_loss"]), (kind, got, ref)
    for c_got, c_ref in zip(got["align"]["align_cos"], ref["align"]["align_cos"]):
        assert close(c_got, c_ref)
    assert len(got["losses"]) == 3
    for l_got, l_ref in zip(got["losses"], ref["losses"]):
        assert close(l_got, l_ref), (got["losses"], ref["losses"])


@pytest.mark.parametrize("layout", layouts_to_check(name for name in LAYOUTS if name != "tp1pp1"))
@pytest.mark.parametrize("kind", ["plain", "align"])
def test_gradients_match(request, layout, kind):
    runs = runs_for(request, layout)
    ref, got = runs["tp1pp1"]["grads"][kind], runs[layout]["grads"][kind]
    assert ref and set(ref) <= set(got), set(ref) - set(got)
    errors = {name: rel_err(got[name], ref[name]) for name in ref}
    worst = max(errors, key=errors.get)
    print(f"{layout} {kind}: worst gradient relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= RTOL, (worst, errors[worst])


@pytest.mark.slow
def test_gpt2_layouts_match_with_frozen_parameters(gpt2_runs):
    ref, got = gpt2_runs["tp1pp1"], gpt2_runs["tp2pp2"]
    for kind in ("plain", "align"):
        for key in ("diffusion_loss", "align_loss"):
            assert close(got["summary"][kind][key], ref["summary"][kind][key]), (kind, key)
        assert set(ref["grads"][kind]) <= set(got["grads"][kind])
        for name, grad in ref["grads"][kind].items():
            assert rel_err(got["grads"][kind][name], grad) <= RTOL, (kind, name)
    for l_got, l_ref in zip(got["summary"]["losses"], ref["summary"]["losses"]):
        assert close(l_got, l_ref)
    for run in gpt2_runs.values():
        if run is gpt2_runs["tp1pp1bf16"]:
            continue  # test_gpt2_in_bf16_matches_fp32
        frozen = {name for rank in run["ranks"] for name in rank["frozen"]}
        # the embedding, its tied copy on the last stage, and layer 0's MLP; biases exist (GPT-2)
        assert "embedding.word_embeddings.weight" in frozen
        assert "decoder.layers.0.mlp.linear_fc1.bias" in frozen
        assert "embedding.position_embeddings.weight" not in frozen
        if run["pp"] > 1:
            assert "output_layer.weight" in frozen
        assert all(rank["frozen_unchanged"] and rank["trainable_changed"] for rank in run["ranks"])
        assert "embedding.word_embeddings.weight" not in run["grads"]["align"]  # no grad buffer
        # the teacher holds the frozen tensors themselves, and still never changes
        shared = {name for rank in run["ranks"] for name in rank["teacher_shared"]}
        if run is gpt2_runs["tp1pp1copies"]:
            assert not shared
        else:
            assert {"embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                    "decoder.layers.0.mlp.linear_fc1.bias"} <= shared, shared
            assert not any("self_attention" in name or "layers.1" in name for name in shared)
        assert all(rank["teacher_unchanged"] for rank in run["ranks"])
    # holding them once changes no number: the same losses and gradients as with copies
    copies = gpt2_runs["tp1pp1copies"]
    assert copies["summary"]["losses"] == ref["summary"]["losses"]
    for kind in ("plain", "align"):
        assert copies["summary"][kind] == ref["summary"][kind]
        for name, grad in ref["grads"][kind].items():
            assert torch.equal(copies["grads"][kind][name], grad), (kind, name)


@pytest.mark.slow
def test_gpt2_in_bf16_matches_fp32(gpt2_runs):
    """GPT-2's learned position embedding, which Megatron-Core makes in fp32, is bf16 in the
    teacher too (unwrapped models are not converted by Float16Module)."""
    ref, got = gpt2_runs["tp1pp1"], gpt2_runs["tp1pp1bf16"]
    for kind in ("plain", "align"):
        for key in ("diffusion_loss", "align_loss"):
            a, b = got["summary"][kind][key], ref["summary"][kind][key]
            assert math.isclose(a, b, rel_tol=2e-2, abs_tol=1e-3), (kind, key, a, b)
    for rank in got["ranks"]:
        assert rank["student_dtypes"] == rank["teacher_dtypes"] == ["torch.bfloat16"]
        assert rank["teacher_unchanged"]


# what a GPU run at scale changes, each against its fp32 / plain counterpart in CORE or LAYOUTS
SCALE_LAYOUTS = {
    "tp2pp2bf16": (2, 2, 4, ["precision=bf16"]),
    "tp1pp1full": (1, 1, 1, ["recompute.granularity=full"]),
    "tp2pp2block": (2, 2, 4, ["recompute.granularity=full", "recompute.method=block",
                              "recompute.num_layers=2"]),
    "tp2pp2selective": (2, 2, 4, ["recompute.granularity=selective",
                                  "recompute.modules=[core_attn, mlp]"]),
    "dp2distributed": (1, 1, 2, ["optimizer.distributed=true"]),
}


@pytest.fixture(scope="module")
def scale_runs(tmp_path_factory, data_overrides, ar_checkpoint):
    return run_layouts(tmp_path_factory.mktemp("scale"), SCALE_LAYOUTS, data_overrides,
                       ar_checkpoint)


@pytest.mark.slow
def test_bf16_matches_fp32_within_bf16_tolerance(core_runs, scale_runs):
    """Megatron-LM's bf16 recipe on CPU: Float16Module, bf16 weights, activations, pipeline
    messages and teacher; fp32 main weights in the optimizer and fp32 gradient reduction."""
    ref, got = core_runs["tp2pp2"], scale_runs["tp2pp2bf16"]
    for kind in ("plain", "align"):
        for key in ("diffusion_loss", "align_loss"):
            a, b = got["summary"][kind][key], ref["summary"][kind][key]
            assert math.isclose(a, b, rel_tol=2e-2, abs_tol=1e-3), (kind, key, a, b)
        errors = {name: rel_err(got["grads"][kind][name].float(), grad)
                  for name, grad in ref["grads"][kind].items()}
        worst = max(errors, key=errors.get)
        print(f"bf16 {kind}: worst gradient relative error {errors[worst]:.2e} ({worst})")
        assert errors[worst] <= 0.1, (worst, errors[worst])
    for a, b in zip(got["summary"]["losses"], ref["summary"]["losses"]):
        assert math.isclose(a, b, rel_tol=2e-2), (got["summary"]["losses"],
                                                  ref["summary"]["losses"])
    for rank in got["ranks"]:
        assert rank["wrappers"] == ["Float16Module"]
        assert rank["student_dtypes"] == rank["teacher_dtypes"] == ["torch.bfloat16"]
        assert rank["main_param_dtypes"] == ["torch.float32"]
        assert rank["teacher_unchanged"]  # (a bf16 weight may round back to itself: fp32 main)
    for rank in ref["ranks"]:
        assert rank["wrappers"] == ["GPTModel"] and rank["student_dtypes"] == ["torch.float32"]


@pytest.mark.slow
@pytest.mark.parametrize("layout, reference", [("tp1pp1full", "tp1pp1"), ("tp2pp2block", "tp2pp2"),
                                               ("tp2pp2selective", "tp2pp2")])
def test_recomputation_leaves_losses_and_gradients_unchanged(core_runs, scale_runs, layout,
                                                            reference):
    ref, got = core_runs[reference], scale_runs[layout]
    assert got["summary"]["plain"] == ref["summary"]["plain"]
    assert got["summary"]["align"]["align_loss"] == ref["summary"]["align"]["align_loss"]
    assert got["summary"]["align"]["diffusion_loss"] == ref["summary"]["align"]["diffusion_loss"]
    for name, grad in ref["grads"]["plain"].items():
        assert torch.equal(got["grads"]["plain"][name], grad), name
    for name, grad in ref["grads"]["align"].items():
        if layout == "tp2pp2selective":
            assert torch.equal(got["grads"]["align"][name], grad), name
        else:  # a recomputed layer's output gradient sums the alignment term and the next
            # layer's in another order (float addition is not associative)
            assert rel_err(got["grads"]["align"][name], grad) <= 1e-6, name
    assert all(rank["recorders_empty_after_step"] for rank in got["ranks"])


@pytest.mark.slow
def test_distributed_optimizer_gives_the_plain_optimizers_losses(runs, scale_runs):
    ref, got = runs["dp2"]["summary"], scale_runs["dp2distributed"]["summary"]
    assert got["plain"] == ref["plain"] and got["align"] == ref["align"]
    for a, b in zip(got["losses"], ref["losses"]):
        assert math.isclose(a, b, rel_tol=1e-6), (got["losses"], ref["losses"])
    assert all(rank["trainable_changed"] for rank in scale_runs["dp2distributed"]["ranks"])


def test_alignment_changes_gradients_but_not_the_diffusion_loss(core_runs):
    summary, grads = core_runs["tp1pp1"]["summary"], core_runs["tp1pp1"]["grads"]
    # the teacher's forward must not perturb the student: bit-identical diffusion loss
    assert summary["plain"]["diffusion_loss"] == summary["align"]["diffusion_loss"]
    assert summary["align"]["align_loss"] > 0
    assert any(rel_err(grads["align"][n], grads["plain"][n]) > 1e-3 for n in grads["plain"])


@pytest.mark.slow
def test_teacher_is_frozen_and_outside_the_optimizer(runs):
    for name, run in runs.items():
        for rank in run["ranks"]:
            assert rank["teacher_unchanged"], name
            assert not rank["teacher_has_grad"], name
            assert not rank["teacher_requires_grad"], name
            assert not rank["teacher_in_optimizer"], name
            keeps_head = name == "tp2pp2g2" and rank["is_last_stage"]
            assert rank["teacher_output_layer"] == keeps_head, name
        assert (run["summary"]["align"]["teacher_loss"] is None) == (name != "tp2pp2g2"), name


@pytest.mark.parametrize("layout", layouts_to_check(["tp1pp2", "tp2pp2", "tp2pp2sp", "tp2pp2g2",
                                                     "pp2cp2"]))
def test_pipeline_p2p_carries_only_the_teacher_stream_forward(request, layout):
    runs = runs_for(request, layout)
    # SP and CP: this rank's positions
    hidden, seq = 64, 128 // (2 if layout.endswith("sp") else 1) // (2 if "cp2" in layout else 1)
    micro_batches = GLOBAL_BATCH // MICRO_BATCH
    group = 2 if layout.endswith("g2") else 1  # align.teacher_microbatches per teacher send
    activation = (seq, MICRO_BATCH, hidden)
    teacher_stream = (seq, group * MICRO_BATCH, hidden)
    total_plain = total_align = 0
    for rank in runs[layout]["ranks"]:
        plain, align = rank["plain_p2p"], rank["align_p2p"]
        total_plain += plain["forward_bytes"] + plain["backward_bytes"]
        total_align += align["forward_bytes"] + align["backward_bytes"]
        # backward sends carry no teacher data
        assert align["backward_bytes"] == plain["backward_bytes"]
        assert align["backward_messages"] == plain["backward_messages"]
        assert all(tuple(shape) == activation
                   for _, shape, _, direction in align["sends"] if direction == "bwd")
        forward = sorted(tuple(shape) for _, shape, _, direction in align["sends"]
                         if direction == "fwd")
        if rank["is_last_stage"]:
            assert forward == []
        else:
            # the student's activation per micro-batch plus the teacher's residual stream per
            # group of micro-batches: no other layer's hidden states travel
            expected = [activation] * micro_batches + [teacher_stream] * (micro_batches // group)
            assert forward == sorted(expected)
            assert align["forward_bytes"] == 2 * micro_batches * math.prod(activation) * 4
    assert total_align / total_plain == pytest.approx(1.5)


@pytest.mark.slow
def test_masks_identical_across_tp_pp_ranks_and_distinct_across_dp(runs):
    from megalign.diffusion.masking import sample_noise

    ranks = runs["tp2pp2"]["ranks"]
    assert all(r["first_input_tokens"] == ranks[0]["first_input_tokens"] for r in ranks)
    assert all(r["first_t"] == ranks[0]["first_t"] for r in ranks)
    dp = runs["dp2"]["ranks"]
    assert dp[0]["first_sample_indices"] != dp[1]["first_sample_indices"]
    assert dp[0]["first_input_tokens"] != dp[1]["first_input_tokens"]
    # reproducible from (seed, sample index) alone
    for rank in dp + ranks:
        t, _ = sample_noise(torch.tensor(rank["first_sample_indices"]), 129, 1234, 0.002)
        assert t.tolist() == pytest.approx(rank["first_t"], abs=0)


# ------------------------------------------------------------------ plain PyTorch reference


def _rms_norm(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x, positions, base=10000.0):
    """x [s, b, n, d]; rotate-half convention, at ``positions`` [s]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


def _swiglu(x, fc1, fc2):
    gate, up = torch.chunk(x @ fc1.T, 2, dim=-1)
    return (F.silu(gate) * up) @ fc2.T


def _experts(p, x, topk, pre_softmax, shared):
    """A mixture-of-experts MLP on x [s, b, h] and its Switch load-balancing loss (without the
    coefficient): softmax router, top-k (renormalised unless ``pre_softmax``), SwiGLU experts;
    ``shared``: plus a shared SwiGLU expert scaled by a sigmoid gate (Qwen2-MoE)."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ p("mlp.router.weight").T
    experts = logits.shape[-1]
    scores = logits.softmax(-1)
    if pre_softmax:
        weights, chosen = scores.topk(topk, dim=-1)
    else:
        top, chosen = logits.topk(topk, dim=-1)
        weights = top.softmax(-1)
    out = torch.zeros_like(tokens)
    for e in range(experts):
        rows, slot = (chosen == e).nonzero(as_tuple=True)
        expert = _swiglu(tokens[rows], p(f"mlp.experts.local_experts.{e}.linear_fc1.weight"),
                         p(f"mlp.experts.local_experts.{e}.linear_fc2.weight"))
        out = out.index_add(0, rows, expert * weights[rows, slot, None])
    if shared:
        out = out + torch.sigmoid(tokens @ p("mlp.shared_experts.gate_weight").T) * _swiglu(
            tokens, p("mlp.shared_experts.linear_fc1.weight"),
            p("mlp.shared_experts.linear_fc2.weight"))
    count = tokens.shape[0]
    routed = torch.zeros_like(scores).scatter(1, chosen, 1.0).sum(0)  # tokens per expert
    balance = experts * ((routed / (count * topk)) * (scores.sum(0) / count)).sum()
    return out.view_as(x), balance


def _llama(params, tokens, blocked, num_layers, heads, groups, positions=None, head_dim=None,
           qk_norm=False, moe=None, aux=None):
    """Returns the L+1 aligned states and the logits. tokens [b, s]; blocked [b, 1, s, s];
    ``positions`` [s] the rotary positions (default 0..s-1); ``head_dim`` (default hidden /
    heads) and ``qk_norm`` (RMSNorm over each head's queries and keys before RoPE) for Qwen3;
    ``moe`` (topk, pre_softmax, shared): mixture-of-experts MLPs, each layer's load-balancing loss
    appended to ``aux``."""
    emb = params["embedding.word_embeddings.weight"]
    h = emb[tokens].transpose(0, 1)  # [s, b, hidden]
    s, b, hidden = h.shape
    positions = torch.arange(s) if positions is None else positions
    hn = head_dim or hidden // heads
    states = [h]
    for i in range(num_layers):
        p = lambda n: params[f"decoder.layers.{i}.{n}"]  # noqa: E731
        x = _rms_norm(h, p("input_layernorm.weight"))
        qkv = (x @ p("self_attention.linear_qkv.weight").T).view(s, b, groups,
                                                                  (heads // groups + 2) * hn)
        q, k, v = torch.split(qkv, [heads // groups * hn, hn, hn], dim=-1)
        q = q.reshape(s, b, heads, hn)
        if qk_norm:
            q = _rms_norm(q, p("self_attention.q_layernorm.weight"))
            k = _rms_norm(k, p("self_attention.k_layernorm.weight"))
        q = _rope(q, positions)
        k = _rope(k, positions).repeat_interleave(heads // groups, dim=2)
        v = v.repeat_interleave(heads // groups, dim=2)
        scores = torch.einsum("sbnd,tbnd->bnst", q, k) / math.sqrt(hn)
        scores = scores.masked_fill(blocked, float("-inf"))
        context = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v).reshape(s, b, heads * hn)
        h = h + context @ p("self_attention.linear_proj.weight").T
        x = _rms_norm(h, p("pre_mlp_layernorm.weight"))
        if moe is not None:
            mlp, balance = _experts(p, x, *moe)
            h = h + mlp
            aux.append(balance)
        else:
            gate, up = torch.chunk(x @ p("mlp.linear_fc1.weight").T, 2, dim=-1)
            h = h + (F.silu(gate) * up) @ p("mlp.linear_fc2.weight").T
        if i < num_layers - 1:
            states.append(h)
    final = _rms_norm(h, params["decoder.final_layernorm.weight"])
    states.append(final)
    return states, final @ emb.T


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [s, b, v], labels [b, s] -> cross-entropy [b, s]."""
    return F.cross_entropy(logits.transpose(0, 1).reshape(-1, logits.shape[-1]),
                           labels.reshape(-1), reduction="none").view_as(labels)


def plain_reference(run, data_overrides, extra=(), student_input=None) -> dict:
    """Loss, per-layer cosines, teacher loss and student gradients computed from scratch in plain
    PyTorch, from ``run``'s initial TP1PP1 weights and the same global batch. ``student_input(raw,
    batch, cfg)`` -> (tokens, blocked mask, rotary positions, supervised, aligned) builds the
    student's input as the test writes it (default: the batch's single stream); the noise draw
    (``make_batch``) is the one shared part."""
    from megalign.config import load_config
    from megalign.data.dataset import build_datasets, micro_batches
    from megalign.data.tokenizer import build_tokenizer
    from megalign.data.vocabulary import Vocabulary
    from megalign.diffusion.objective import MaskedDiffusion, make_batch

    cfg = load_config(str(TINY_CONFIG), [*data_overrides, f"data.global_batch_size={GLOBAL_BATCH}",
                                         *extra])
    tok = build_tokenizer(cfg.data.tokenizer)
    train, _, _ = build_datasets(cfg.data.paths, tok, cfg.model.seq_length, cfg.data.split,
                                 cfg.seed, [cfg.schedule.train_iters * GLOBAL_BATCH, 0, 0],
                                 cfg.data.cache_dir,
                                 reset_position_ids=True, loss_mask=cfg.data.sft)
    iterator = micro_batches(train, 0, MICRO_BATCH, 0, 1)
    m = cfg.model

    # a tied model under PP > 1 keeps a copy of the word embedding on the last stage
    params = {n: t.clone().requires_grad_(True) for n, t in run["grads"]["params"].items()
              if not (m.tie_embeddings and n == "output_layer.weight")}
    teacher_params = {n: t.detach() for n, t in params.items()}
    num_mb = GLOBAL_BATCH // MICRO_BATCH
    L = m.num_layers
    total, teacher_loss, cos_means, aux_means = 0.0, 0.0, torch.zeros(L + 1), torch.zeros(L)
    for _ in range(num_mb):
        raw = next(iterator)
        batch = make_batch(raw["tokens"], raw["position_ids"], raw["sample_index"],
                           MaskedDiffusion.of(cfg), Vocabulary.of(cfg, tok), with_teacher=True,
                           training=True,
                           response=raw.get("response"))
        if student_input is None:
            tokens, blocked, positions = batch.input_tokens, batch.student_mask, None
            supervised = aligned = batch.supervised
        else:
            tokens, blocked, positions, supervised, aligned = student_input(raw, batch, cfg)
        labels = batch.sequence_labels
        shape = {"head_dim": m.head_dim, "qk_norm": m.qk_norm,
                 "moe": (m.moe_topk, m.moe_router_pre_softmax,
                         m.moe_shared_expert_ffn_hidden_size is not None)
                 if m.num_experts else None}
        balance = []
        s_states, logits = _llama(params, tokens, blocked, L, m.num_attention_heads,
                                  m.num_query_groups, positions, **shape, aux=balance)
        with torch.no_grad():
            t_states, t_logits = _llama(teacher_params, batch.clean_tokens, batch.teacher_mask, L,
                                        m.num_attention_heads, m.num_query_groups, **shape,
                                        aux=[])
        sup = supervised.float()
        # two streams (block diffusion, the hybrid objective): both predict the next tokens
        repeat = tokens.shape[1] // labels.shape[1]
        ce = token_ce(logits, labels.repeat(1, repeat))
        if cfg.diffusion.loss_weighting == "path":  # the reference code's L_mdm + L_path
            diffusion = (ce * sup * (1 + torch.exp(-ce.detach()))).sum() / sup.sum()
        elif cfg.diffusion.ar_loss_weight:  # [noisy | clean]: diffusion CE, then next-token CE
            noisy, clean = (ce * sup).chunk(2, dim=1)
            diffusion = (cfg.diffusion.dlm_loss_weight * noisy.sum()
                         + cfg.diffusion.ar_loss_weight * clean.sum()) / sup.sum()
        else:
            diffusion = (ce * sup).sum() / sup.sum()
        if cfg.align.kd_weight:  # KL(teacher || student) where the diffusion CE is taken
            student = F.log_softmax(logits.transpose(0, 1), dim=-1)
            teacher = F.log_softmax(t_logits.transpose(0, 1), dim=-1).repeat(1, repeat, 1)
            kl = (teacher.exp() * (teacher - student)).sum(-1)
            supervised_diffusion = (aligned.float() if cfg.diffusion.ar_loss_weight else sup)
            diffusion = diffusion + cfg.align.kd_weight * (kl * supervised_diffusion).sum() / (
                sup.sum())
        t_sup = batch.supervised_targets.float()
        teacher_loss += float((token_ce(t_logits, labels) * t_sup).sum() / t_sup.sum()) / num_mb
        weight = aligned.float()[:, : labels.shape[1]].T  # the (noisy) positions the teacher sees
        layer_cos = torch.stack([
            (F.cosine_similarity(a[: labels.shape[1]], b, dim=-1) * weight).sum() / weight.sum()
            for a, b in zip(s_states, t_states)])
        align = ALIGN_WEIGHT * (1.0 - layer_cos).mean()
        moe_aux = m.moe_aux_loss_coeff * torch.stack(balance) if balance else torch.zeros(L)
        (diffusion + align + moe_aux.sum()).div(num_mb).backward()
        total += float(diffusion + align) / num_mb
        aux_means += moe_aux.detach() / num_mb
        cos_means += layer_cos.detach() / num_mb

    return {"total": total, "cos": cos_means.tolist(), "teacher_loss": teacher_loss,
            "moe_aux_loss": aux_means.tolist(),
            "grads": {name: param.grad for name, param in params.items()}}


@pytest.fixture(scope="module")
def reference(core_runs, corpus_prefix, data_overrides):
    return plain_reference(core_runs["tp1pp1"], data_overrides)


def assert_matches_reference(run, reference):
    summary = run["summary"]["align"]
    got_total = summary["diffusion_loss"] + summary["align_loss"]
    assert got_total == pytest.approx(reference["total"], rel=RTOL)
    assert summary["align_cos"] == pytest.approx(reference["cos"], rel=RTOL)
    megatron_grads = run["grads"]["align"]
    errors = {name: rel_err(megatron_grads[name], grad)
              for name, grad in reference["grads"].items()}
    worst = max(errors, key=errors.get)
    print(f"reference: loss {reference['total']:.6f} vs {got_total:.6f}; worst gradient error "
          f"{errors[worst]:.2e}")
    assert errors[worst] <= RTOL, (worst, errors[worst])


def test_matches_plain_pytorch_reference(core_runs, reference):
    """Loss, per-layer cosines and student gradients of TP1PP1 equal the from-scratch ones."""
    assert_matches_reference(core_runs["tp1pp1"], reference)


@pytest.mark.slow
def test_qwen3_attention_matches_across_layouts_and_plain_pytorch(qwen3_runs, data_overrides):
    """QK-norm and an explicit head size: losses, cosines and every gradient (the q/k norm
    weights' summed over TP) agree between TP1PP1 and TP2PP2, and TP1PP1 equals the from-scratch
    computation."""
    ref = qwen3_runs["tp1pp1"]
    assert any("q_layernorm" in name for name in ref["grads"]["align"])
    for layout, run in qwen3_runs.items():
        for key in ("diffusion_loss", "align_loss"):
            assert close(run["summary"]["align"][key], ref["summary"]["align"][key]), (layout, key)
        assert run["summary"]["align"]["align_cos"] == pytest.approx(
            ref["summary"]["align"]["align_cos"], rel=RTOL)
        for kind in ("plain", "align"):
            for name, grad in ref["grads"][kind].items():
                assert rel_err(run["grads"][kind][name], grad) <= RTOL, (layout, kind, name)
    assert_matches_reference(ref, plain_reference(ref, data_overrides, QWEN3))


@pytest.mark.slow
def test_moe_alignment_matches_across_layouts_and_plain_pytorch(moe_runs, data_overrides):
    """A mixture-of-experts student (with a gated shared expert) aligned to its MoE teacher:
    losses, cosines, the load-balancing loss and every gradient (experts gathered over EP) agree
    across TP1PP1, TP2PP1, TP1PP2, TP2PP2 (SP), EP2, TP1PP2EP2 and EP2 x CP2, and TP1PP1 equals the
    from-scratch computation with the router, top-k, the shared expert and the Switch loss
    written here; the teacher's router and experts take no gradient and no optimizer state."""
    ref = moe_runs["tp1pp1"]
    experts = {n for n in ref["grads"]["align"] if "local_experts" in n}
    assert len(experts) == 4 * 4 * 2 and any("mlp.router" in n for n in ref["grads"]["align"])
    assert any("shared_experts.gate_weight" in n for n in ref["grads"]["align"])
    for layout, run in moe_runs.items():
        for kind in ("plain", "align"):
            got, want = run["summary"][kind], ref["summary"][kind]
            for key in ("diffusion_loss", "align_loss"):
                assert close(got[key], want[key]), (layout, kind, key)
            assert got["moe_aux_loss"] == pytest.approx(want["moe_aux_loss"], rel=RTOL)
            for name, grad in ref["grads"][kind].items():
                assert rel_err(run["grads"][kind][name], grad) <= RTOL, (layout, kind, name)
        assert all(not r["teacher_has_grad"] and not r["teacher_in_optimizer"]
                   and r["teacher_unchanged"] for r in run["ranks"]), layout
    reference = plain_reference(ref, data_overrides, MOE)
    assert ref["summary"]["align"]["moe_aux_loss"] == pytest.approx(reference["moe_aux_loss"],
                                                                    rel=RTOL)
    assert min(reference["moe_aux_loss"]) > 0  # in every layer's loss and gradients
    assert_matches_reference(ref, reference)


@pytest.mark.slow
def test_logged_teacher_loss_matches_plain_pytorch_reference(runs, reference):
    """The teacher's AR loss on the supervised positions, logged by the layout that asks for it."""
    assert runs["tp2pp2g2"]["summary"]["align"]["teacher_loss"] == pytest.approx(
        reference["teacher_loss"], rel=RTOL)


# ------------------------------------------------------- block diffusion and attention annealing

BLOCK = 32  # tiny.yaml's sequences of 128: four blocks
MODES = {"block": [f"diffusion.block_length={BLOCK}"],
         # one iteration of annealing: the step's samples 0..3 attend 0, 1/4, 1/2, 3/4 of the
         # future; with the path-weighted loss, which changes the loss alone, checked here across
         # the layouts and against the plain reference without launches of its own
         "anneal": ["diffusion.anneal_iters=1", "diffusion.loss_weighting=path"],
         # diffusion SFT on the bundled instruction set (data.paths: the sft_prefix fixture)
         "sft": ["data.sft=true"],
         # the hybrid objective with Nemotron-Labs-Diffusion's weights, and teacher-logit
         # distillation beside REPR-ALIGN (the teacher's logits mirrored onto both streams; its
         # logged loss computed from the logits it hands over)
         "hybrid_kd": ["diffusion.ar_loss_weight=1.0", "diffusion.dlm_loss_weight=0.3",
                       "align.kd_weight=0.5", "align.log_teacher_loss=true"]}


def mode_overrides(mode: str, request) -> list[str]:
    if mode == "sft":
        return [*MODES[mode], f"data.paths=[{request.getfixturevalue('sft_prefix')}]"]
    return MODES[mode]


# TP and PP together, with and without sequence parallelism (TP alone and PP alone are checked for
# full-sequence training: the modes change the batch and the masks, not the parallel paths)
MODE_LAYOUTS = ("tp2pp2", "tp2pp2sp")


@pytest.fixture(scope="module")
def mode_core_runs(request, tmp_path_factory, data_overrides, ar_checkpoint):
    out = tmp_path_factory.mktemp("modes")
    return {mode: run_layouts(out / mode, {name: LAYOUTS[name] for name in CORE}, data_overrides,
                              ar_checkpoint, mode_overrides(mode, request)) for mode in MODES}


@pytest.fixture(scope="module")
def mode_runs(request, mode_core_runs, tmp_path_factory, data_overrides, ar_checkpoint):
    out = tmp_path_factory.mktemp("modes_more")
    more = {name: LAYOUTS[name] for name in MODE_LAYOUTS if name not in CORE}
    return {mode: {**mode_core_runs[mode],
                   **run_layouts(out / mode, more, data_overrides, ar_checkpoint,
                                 mode_overrides(mode, request))}
            for mode in MODES}


@pytest.fixture(scope="module")
def hybrid_kd_more_runs(tmp_path_factory, data_overrides, ar_checkpoint):
    """The hybrid objective and distillation under TP alone and PP alone (MODE_LAYOUTS has TP and
    PP together)."""
    return run_layouts(tmp_path_factory.mktemp("hybrid_kd_more"),
                       {name: LAYOUTS[name] for name in ("tp2pp1", "tp1pp2")}, data_overrides,
                       ar_checkpoint, MODES["hybrid_kd"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_hybrid_and_distillation_match_under_tp_alone_and_pp_alone(mode_core_runs,
                                                                   hybrid_kd_more_runs, layout):
    assert_runs_match(mode_core_runs["hybrid_kd"]["tp1pp1"], hybrid_kd_more_runs[layout])


@pytest.fixture(scope="module")
def sft_more_runs(request, tmp_path_factory, data_overrides, ar_checkpoint):
    """Diffusion SFT with each sequence split over 2 context-parallel ranks (THD is checked on
    full-sequence diffusion, whose attention SFT shares)."""
    return run_layouts(tmp_path_factory.mktemp("sft_more"), CP_LAYOUTS,
                       data_overrides, ar_checkpoint, mode_overrides("sft", request))


@pytest.mark.slow
@pytest.mark.parametrize("layout", CP_LAYOUTS)
def test_sft_matches_under_context_parallelism(mode_core_runs, sft_more_runs, layout):
    assert_runs_match(mode_core_runs["sft"]["tp1pp1"], sft_more_runs[layout])


@pytest.fixture(scope="module")
def one_sample_runs(tmp_path_factory, data_overrides, ar_checkpoint):
    """One sample per micro-batch, its documents as an explicit mask and as THD."""
    one = ["data.micro_batch_size=1"]
    return run_layouts(tmp_path_factory.mktemp("one_sample"), {
        "mask": (1, 1, 1, one), "thd": (1, 1, 1, [*one, "model.document_format=thd"])},
        data_overrides, ar_checkpoint)


@pytest.mark.slow
def test_thd_equals_the_explicit_mask_bit_for_bit(one_sample_runs):
    """With one sample per micro-batch the packed row is the masked layout's sequence, and every
    number is the same: losses, per-layer cosines, every gradient (with more samples the rows
    are summed in another order: within RTOL, tp2pp2spthd above)."""
    mask, thd = one_sample_runs["mask"], one_sample_runs["thd"]
    assert thd["summary"] == mask["summary"]
    for kind in ("plain", "align"):
        assert mask["grads"][kind] and set(thd["grads"][kind]) == set(mask["grads"][kind])
        for name, grad in mask["grads"][kind].items():
            assert torch.equal(thd["grads"][kind][name], grad), (kind, name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", layouts_to_check(MODE_LAYOUTS))
def test_training_modes_match_across_layouts(request, mode, layout):
    """Block diffusion (two streams, and the teacher's states mirrored under sequence parallelism),
    annealed attention and diffusion SFT: losses, per-layer cosines and every gradient as on one
    process."""
    runs = request.getfixturevalue("mode_core_runs" if layout in CORE else "mode_runs")[mode]
    assert_runs_match(runs["tp1pp1"], runs[layout])


def assert_runs_match(ref: dict, got: dict) -> None:
    """Losses, per-layer cosines and every gradient of ``got`` as ``ref``'s (to RTOL)."""
    for kind in ("plain", "align"):
        for key in ("diffusion_loss", "align_loss"):
            assert close(got["summary"][kind][key], ref["summary"][kind][key]), (kind, key)
        errors = {name: rel_err(got["grads"][kind][name], grad)
                  for name, grad in ref["grads"][kind].items()}
        assert errors and max(errors.values()) <= RTOL, (kind, max(errors, key=errors.get))
    for c_got, c_ref in zip(got["summary"]["align"]["align_cos"],
                            ref["summary"]["align"]["align_cos"]):
        assert close(c_got, c_ref)
    for l_got, l_ref in zip(got["summary"]["losses"], ref["summary"]["losses"]):
        assert close(l_got, l_ref)


def _document_ids(tokens: list[int], eod: int) -> list[int]:
    ids, current = [], 0
    for token in tokens:
        ids.append(current)
        current += token == eod
    return ids


def _noised(raw, cfg):
    """(vocabulary, clean tokens [b, s], the noise draw over the s + 1 tokens, the masked input)
    of a micro-batch, drawn from (seed, sample index) as training draws it."""
    from megalign.data.tokenizer import build_tokenizer
    from megalign.data.vocabulary import Vocabulary
    from megalign.diffusion.masking import sample_noise

    vocab = Vocabulary.of(cfg, build_tokenizer(cfg.data.tokenizer))
    clean = raw["tokens"][:, :-1]
    s = clean.shape[1]
    _, masked = sample_noise(raw["sample_index"], s + 1, cfg.seed, cfg.diffusion.eps)
    return vocab, clean, masked, torch.where(masked[:, :s], torch.full_like(clean, vocab.mask),
                                             clean)


def block_student_input(raw, batch, cfg):
    """The two-stream input written out position by position: [noisy; clean], a noisy position
    sees its own noisy block and the clean earlier blocks, a clean one the clean blocks up to its
    own; the token opening a block is predicted from the clean stream."""
    vocab, clean, masked, noisy = _noised(raw, cfg)
    b, s = clean.shape
    blocked = torch.ones(b, 1, 2 * s, 2 * s, dtype=torch.bool)
    for row in range(b):
        docs = _document_ids(clean[row].tolist(), vocab.eod)
        block = [p // BLOCK for p in raw["position_ids"][row].tolist()]
        for q in range(2 * s):
            for k in range(2 * s):
                qi, ki = q % s, k % s
                if docs[qi] != docs[ki]:
                    continue
                if q < s:  # noisy query
                    blocked[row, 0, q, k] = not (block[ki] == block[qi] if k < s
                                                 else block[ki] < block[qi])
                else:  # clean query
                    blocked[row, 0, q, k] = k < s or block[ki] > block[qi]
    targets = batch.supervised_targets
    opens = (raw["position_ids"] + 1) % BLOCK == 0
    supervised = torch.cat([targets & ~opens, targets & opens], dim=1)
    aligned = torch.cat([targets & ~opens, torch.zeros_like(targets)], dim=1)
    tokens = torch.cat([noisy, clean], dim=1)
    # the library builds the same batch
    assert torch.equal(batch.input_tokens, tokens)
    assert torch.equal(batch.student_mask, blocked)
    assert torch.equal(batch.supervised, supervised) and torch.equal(batch.aligned, aligned)
    return tokens, blocked, torch.cat([torch.arange(s), torch.arange(s)]), supervised, aligned


def anneal_student_input(raw, batch, cfg):
    """Causal attention plus the future positions the sample's annealing draw opens: position j > i
    is open to i when the sample's uniform draw u[i, j] < sample index / (K * global batch)."""
    from megalign.data.tokenizer import build_tokenizer
    from megalign.data.vocabulary import Vocabulary
    from megalign.diffusion.masking import ANNEAL_STREAM, sample_seed
    from megalign.diffusion.objective import MaskedDiffusion, make_batch

    s = batch.clean_tokens.shape[1]
    bidirectional = make_batch(raw["tokens"], raw["position_ids"], raw["sample_index"],
                               MaskedDiffusion.of(cfg),
                               Vocabulary.of(cfg, build_tokenizer(cfg.data.tokenizer))).student_mask
    closed = []
    for index in raw["sample_index"].tolist():
        fraction = min(1.0, index / (cfg.diffusion.anneal_iters * GLOBAL_BATCH))
        u = torch.rand(s, s, generator=torch.Generator().manual_seed(
            sample_seed(cfg.seed + ANNEAL_STREAM, index)))
        closed.append(torch.ones(s, s, dtype=torch.bool).triu(1) & ~(u < fraction))
    blocked = bidirectional | torch.stack(closed).unsqueeze(1)
    assert torch.equal(batch.student_mask, blocked)
    return batch.input_tokens, blocked, None, batch.supervised, batch.supervised


def sft_student_input(raw, batch, cfg):
    """Only response tokens are noised: the noise draw restricted to the loss-mask stream; a
    position is supervised when the token it predicts is a masked response token."""
    from megalign.data.tokenizer import build_tokenizer
    from megalign.diffusion.masking import sample_noise

    eod = build_tokenizer(cfg.data.tokenizer).eod
    clean = raw["tokens"][:, :-1]
    s = clean.shape[1]
    _, drawn = sample_noise(raw["sample_index"], s + 1, cfg.seed, cfg.diffusion.eps)
    masked = drawn & raw["response"]
    supervised = masked[:, 1:] & (clean != eod)
    assert torch.equal(batch.input_tokens != clean, masked[:, :s])
    assert torch.equal(batch.supervised, supervised)
    assert supervised.any() and (drawn & ~raw["response"]).any()  # prompts were drawn, not masked
    return batch.input_tokens, batch.student_mask, None, supervised, supervised


def hybrid_student_input(raw, batch, cfg):
    """[noisy; clean], written out position by position: a noisy position sees the noisy
    positions of its document, a clean one the clean positions of its document up to itself; the
    noisy stream is supervised where a masked token follows, the clean one wherever a token of
    the same document follows."""
    vocab, clean, masked, noisy = _noised(raw, cfg)
    b, s = clean.shape
    blocked = torch.ones(b, 1, 2 * s, 2 * s, dtype=torch.bool)
    for row in range(b):
        docs = _document_ids(clean[row].tolist(), vocab.eod)
        for q in range(2 * s):
            for k in range(2 * s):
                qi, ki = q % s, k % s
                if docs[qi] == docs[ki] and (q < s) == (k < s):
                    blocked[row, 0, q, k] = q >= s and ki > qi
    following = raw["tokens"][:, 1:]
    in_document = (clean != vocab.eod) & (following != vocab.pad)
    diffusion = masked[:, 1:] & in_document
    supervised = torch.cat([diffusion, in_document], dim=1)
    aligned = torch.cat([diffusion, torch.zeros_like(diffusion)], dim=1)
    tokens = torch.cat([noisy, clean], dim=1)
    # the library builds the same batch
    assert torch.equal(batch.input_tokens, tokens) and torch.equal(batch.student_mask, blocked)
    assert torch.equal(batch.supervised | batch.next_token, supervised)
    assert torch.equal(batch.aligned, aligned) and in_document.sum() > diffusion.sum() > 0
    return tokens, blocked, torch.cat([torch.arange(s), torch.arange(s)]), supervised, aligned


@pytest.mark.parametrize("mode", MODES)
def test_training_modes_match_plain_pytorch_reference(request, mode_core_runs, data_overrides,
                                                      mode):
    inputs = {"block": block_student_input, "anneal": anneal_student_input,
              "sft": sft_student_input, "hybrid_kd": hybrid_student_input}[mode]
    reference = plain_reference(mode_core_runs[mode]["tp1pp1"], data_overrides,
                                mode_overrides(mode, request), student_input=inputs)
    assert_matches_reference(mode_core_runs[mode]["tp1pp1"], reference)
    if mode == "hybrid_kd":  # the teacher's loss from the logits it hands to distillation
        assert mode_core_runs[mode]["tp1pp1"]["summary"]["align"]["teacher_loss"] == (
            pytest.approx(reference["teacher_loss"], rel=RTOL))


@pytest.mark.slow
@pytest.mark.parametrize("mode, renormalised", [("block", False), ("sft", True)])
def test_moe_training_modes_match_plain_pytorch_reference(request, mode, renormalised,
                                                         moe_checkpoint, tmp_path, data_overrides):
    """Block diffusion and diffusion SFT of the mixture-of-experts student under pipeline and
    expert parallelism (TP1PP2EP2): losses, cosines, the load-balancing loss and every gradient
    equal the from-scratch computation (the router sees both streams of a block batch). SFT runs
    with the top k renormalised (Mixtral's and Qwen3-30B-A3B's router; ``MOE`` keeps them as
    they are)."""
    overrides = [*MOE, *mode_overrides(mode, request),
                 *(["model.moe_router_pre_softmax=false"] if renormalised else [])]
    run = run_layouts(tmp_path, {"tp1pp2ep2": MOE_LAYOUTS["tp1pp2ep2"]}, data_overrides,
                      moe_checkpoint, overrides)["tp1pp2ep2"]
    reference = plain_reference(run, data_overrides, overrides, student_input={
        "block": block_student_input, "sft": sft_student_input}[mode])
    assert run["summary"]["align"]["moe_aux_loss"] == pytest.approx(reference["moe_aux_loss"],
                                                                    rel=RTOL)
    assert_matches_reference(run, reference)
    # the last stage's copy of the tied word embedding gets the same (summed) gradient
    assert rel_err(run["grads"]["align"]["output_layer.weight"],
                   reference["grads"]["embedding.word_embeddings.weight"]) <= RTOL


@pytest.mark.slow
def test_one_block_is_full_sequence_training_bit_for_bit(core_runs, tmp_path, data_overrides,
                                                        ar_checkpoint):
    one_block = run_layouts(tmp_path, {"tp1pp1": LAYOUTS["tp1pp1"]}, data_overrides, ar_checkpoint,
                            ["diffusion.block_length=128"])["tp1pp1"]
    full = core_runs["tp1pp1"]
    assert one_block["summary"] == {**full["summary"], "world_size": 1}
    for kind in ("plain", "align"):
        assert all(torch.equal(one_block["grads"][kind][n], g)
                   for n, g in full["grads"][kind].items())


# ------------------------------------------------------------- causal-LM pretraining (objective=ar)

CAUSAL_LM = ["objective=ar", "align.weight=0"]


def run_causal_lm(out, layouts: dict, data_overrides, checkpoint) -> dict:
    runs = {}
    for name, (tp, pp, nproc, layout_extra) in layouts.items():
        torchrun(nproc, WORKERS / "causal_lm_checks.py", [
            "--config", TINY_CONFIG, "--out", out / name, *data_overrides, *CAUSAL_LM,
            f"parallel.tensor_model_parallel_size={tp}",
            f"parallel.pipeline_model_parallel_size={pp}", f"model.init_checkpoint={checkpoint}",
            f"data.global_batch_size={GLOBAL_BATCH}", f"data.micro_batch_size={MICRO_BATCH}",
            f"logging.run_dir={out / name}/run", *layout_extra])
        grads, params = {}, {}
        for stage in range(pp):
            part = torch.load(out / name / f"grads_stage{stage}.pt")
            grads.update(part["grads"])
            params.update(part["params"])
        runs[name] = {"summary": json.loads((out / name / "summary.json").read_text()),
                      "grads": grads, "params": params}
    return runs


@pytest.fixture(scope="module")
def causal_lm_core(tmp_path_factory, data_overrides, ar_checkpoint):
    """objective=ar on TP1PP1 and TP2PP2, from the same initial weights."""
    return run_causal_lm(tmp_path_factory.mktemp("causal_lm"),
                         {name: LAYOUTS[name] for name in CORE}, data_overrides, ar_checkpoint)


@pytest.fixture(scope="module")
def causal_lm_runs(causal_lm_core, tmp_path_factory, data_overrides, ar_checkpoint):
    """... and on TP2PP1, TP1PP2, TP2 x CP2 and PP2 x CP2 (the full suite; the causal attention
    of packed documents is the teacher's in tp2pp2spthd)."""
    more = {**{name: LAYOUTS[name] for name in ("tp2pp1", "tp1pp2")}, **CP_LAYOUTS}
    return {**causal_lm_core, **run_causal_lm(tmp_path_factory.mktemp("causal_lm_more"), more,
                                              data_overrides, ar_checkpoint)}


@pytest.mark.parametrize("layout", layouts_to_check(["tp2pp1", "tp1pp2", "tp2pp2", *CP_LAYOUTS]))
def test_causal_lm_matches_across_layouts(request, layout):
    runs = request.getfixturevalue("causal_lm_core" if layout in CORE else "causal_lm_runs")
    ref, got = runs["tp1pp1"], runs[layout]
    assert got["summary"]["align_loss"] == 0.0
    assert close(got["summary"]["loss"], ref["summary"]["loss"])
    assert all(close(a, b) for a, b in zip(got["summary"]["losses"], ref["summary"]["losses"]))
    assert ref["grads"] and set(ref["grads"]) <= set(got["grads"])  # PP: the tied output copy too
    worst = max(rel_err(got["grads"][n], ref["grads"][n]) for n in ref["grads"])
    assert worst <= RTOL, worst


def test_causal_lm_loss_is_the_plain_next_token_loss(causal_lm_core, data_overrides):
    """The next-token loss and gradients computed from scratch: the clean tokens in, every
    position whose next token is in its document supervised, causal attention inside each
    document (written here position by position), no mask token anywhere."""
    from megalign.config import load_config
    from megalign.data.dataset import build_datasets, micro_batches
    from megalign.data.tokenizer import build_tokenizer

    run = causal_lm_core["tp1pp1"]
    cfg = load_config(str(TINY_CONFIG), [*data_overrides, *CAUSAL_LM,
                                         f"data.global_batch_size={GLOBAL_BATCH}"])
    tok = build_tokenizer(cfg.data.tokenizer)
    train, _, _ = build_datasets(cfg.data.paths, tok, cfg.model.seq_length, cfg.data.split,
                                 cfg.seed, [cfg.schedule.train_iters * GLOBAL_BATCH, 0, 0],
                                 cfg.data.cache_dir, reset_position_ids=True)
    iterator = micro_batches(train, 0, MICRO_BATCH, 0, 1)
    params = {n: t.clone().requires_grad_(True) for n, t in run["params"].items()}
    m, total = cfg.model, 0.0
    for _ in range(GLOBAL_BATCH // MICRO_BATCH):
        tokens = next(iterator)["tokens"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        seq = inputs.shape[1]
        blocked = torch.ones(inputs.shape[0], 1, seq, seq, dtype=torch.bool)
        for row, sample in enumerate(inputs.tolist()):
            docs = _document_ids(sample, tok.eod)
            for i in range(seq):
                for j in range(i + 1):
                    blocked[row, 0, i, j] = docs[i] != docs[j]
        supervised = (inputs != tok.eod).float()
        _, logits = _llama(params, inputs, blocked, m.num_layers, m.num_attention_heads,
                           m.num_query_groups)
        loss = (token_ce(logits, labels) * supervised).sum() / supervised.sum()
        (loss / (GLOBAL_BATCH // MICRO_BATCH)).backward()
        total += float(loss) / (GLOBAL_BATCH // MICRO_BATCH)
    assert run["summary"]["loss"] == pytest.approx(total, rel=RTOL)
    worst = max(rel_err(run["grads"][n], p.grad) for n, p in params.items())
    assert worst <= RTOL, worst
