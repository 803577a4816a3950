"""Configuration: typed loading, overrides, and every impossible combination failing early."""

import pytest

from megalign.config import check_vocabulary, load_config, validate
from megalign.errors import ConfigError

from conftest import REPO, TINY_CONFIG


@pytest.mark.unit
def test_yaml_and_overrides_are_typed():
    cfg = load_config(str(TINY_CONFIG), ["align.weight=3", "model.num_layers=2",
                                         "optimizer.lr=3e-4", "optimizer.freeze=[embedding]",
                                         "diffusion.shift=false"])
    assert cfg.align.weight == 3.0 and isinstance(cfg.align.weight, float)
    assert cfg.model.num_layers == 2 and cfg.diffusion.shift is False
    assert cfg.optimizer.freeze == ["embedding"]
    assert cfg.optimizer.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; float fields accept it


@pytest.mark.unit
@pytest.mark.parametrize("override, message", [
    ("model.num_layer=3", "did you mean 'model.num_layers'"),
    ("modle.num_layers=3", "did you mean 'model'"),
    ("model.num_layers=three", "model.num_layers: expected int"),
    ("align.weight=true", "align.weight: expected float"),
    ("model.num_layers", "not of the form key.sub=value"),
])
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(TINY_CONFIG), [override])


@pytest.mark.unit
@pytest.mark.parametrize("overrides, world, key", [
    (["parallel.tensor_model_parallel_size=3"], 6, "num_attention_heads"),
    (["model.num_attention_heads=8", "model.num_query_groups=2",
      "parallel.tensor_model_parallel_size=4", "parallel.pipeline_model_parallel_size=1"], 4,
     "num_query_groups"),
    (["parallel.pipeline_model_parallel_size=3", "parallel.tensor_model_parallel_size=1"], 3,
     "num_layers"),
    (["data.global_batch_size=6", "parallel.tensor_model_parallel_size=1",
      "parallel.pipeline_model_parallel_size=1"], 2, "data.global_batch_size"),
    (["parallel.tensor_model_parallel_size=2"], 3, "world size"),
    (["diffusion.loss_weighting=elbo"], 4, "diffusion.loss_weighting"),
    (["align.layers=[0, 9]"], 4, "align.layers"),
    (["align.teacher_microbatches=0"], 4, "align.teacher_microbatches=0"),
    (["parallel.virtual_pipeline_model_parallel_size=4"], 4,
     "virtual_pipeline_model_parallel_size=4"),
    (["parallel.virtual_pipeline_model_parallel_size=2", "data.global_batch_size=3",
      "data.micro_batch_size=1"], 4, "interleaved schedule needs"),
    (["resilience.failure_timeout_s=2", "resilience.heartbeat_interval_s=1"], 4,
     "resilience.failure_timeout_s=2"),
    (["resilience.collective_timeout_minutes=0"], 4, "collective_timeout_minutes"),
    (["checkpoint.on_save_failure=retry"], 4, "checkpoint.on_save_failure"),
    (["checkpoint.async_save=true", "resilience.inprocess_restart=true"], 4,
     "checkpoint.async_save=true with resilience.inprocess_restart=true"),
    (["resilience.inprocess_restart=true", "resilience.failure_timeout_s=0"], 4,
     "resilience.failure_timeout_s: set it > 0"),
    (["resilience.inprocess_restart=true", "resilience.inprocess_max_restarts=0"], 4,
     "resilience.inprocess_max_restarts=0"),
    (["resilience.inprocess_restart=true", "resilience.collective_timeout_minutes=1"], 4,
     "must exceed 2 x resilience.failure_timeout_s"),
    # model families: head size, QK-norm, RoPE scaling, experts and expert parallelism
    (["model.head_dim=15"], 4, "model.head_dim=15 must be even"),
    (["model.hidden_size=66"], 4, "set model.head_dim"),
    (["model.arch=gpt2", "model.qk_norm=true"], 4, "need model.arch=llama"),
    (["model.rope_scaling_factor=0.5"], 4, "model.rope_scaling_factor=0.5"),
    (["parallel.expert_model_parallel_size=2"], 4, "needs experts"),
    (["model.num_experts=0"], 4, "model.num_experts=0 must be at least 1"),
    (["model.num_experts=4", "model.moe_topk=5"], 4, "model.moe_topk=5"),
    (["model.moe_shared_expert_ffn_hidden_size=8"], 4, "need model.num_experts"),
    (["model.num_experts=4", "model.moe_shared_expert_gate=true"], 4,
     "needs model.moe_shared_expert_ffn_hidden_size"),
    (["model.num_experts=4", "model.moe_shared_expert_ffn_hidden_size=0"], 4,
     "model.moe_shared_expert_ffn_hidden_size=0 must be at least 1"),
    (["model.num_experts=3", "parallel.expert_model_parallel_size=2",
      "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"], 4,
     "does not divide model.num_experts=3"),
    (["model.num_experts=4", "parallel.sequence_parallel=false"], 4,
     "needs parallel.sequence_parallel=true"),
    (["model.num_experts=4", "parallel.expert_model_parallel_size=4",
      "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"], 2,
     "does not divide the data-parallel size 2"),
    # activation recomputation (tiny: 4 layers, PP 2)
    (["recompute.granularity=partial"], 4, r"recompute.granularity='partial' is not one of"),
    (["recompute.granularity=full", "recompute.method=every"], 4, "recompute.method='every'"),
    (["recompute.granularity=full", "recompute.num_layers=3"], 4,
     r"recompute.num_layers=3 must lie in 1..2"),
    (["recompute.granularity=full", "recompute.num_layers=2"], 4,
     "the aligned hidden states inside a unit get no gradient"),
    (["recompute.granularity=selective", "recompute.modules=[attention]"], 4,
     r"recompute.modules=\['attention'\]: give some of"),
    (["recompute.granularity=selective", "recompute.modules=[moe]"], 4, "this model has none"),
    # context parallelism (tiny: TP2 x PP2, sequences of 128)
    (["parallel.context_parallel_size=2"], 4, r"x context \(2\) = 8 does not divide"),
    (["parallel.context_parallel_size=0"], 8, "parallel.context_parallel_size=0 must be at least"),
    (["parallel.context_parallel_size=3"], 12,
     "does not split over parallel.context_parallel_size=3"),
    (["parallel.context_parallel_size=2", "model.seq_length=102"], 8, "use a multiple of 4"),
    (["parallel.context_parallel_size=2", "parallel.sequence_parallel=true",
      "model.seq_length=132"], 8, "and the sequence-parallel ranks.*use a multiple of 8"),
    (["parallel.context_parallel_size=2", "diffusion.block_length=32"], 8,
     "diffusion.block_length=32 with parallel.context_parallel_size=2: block diffusion"),
    (["parallel.context_parallel_size=2", "evaluation.generation_samples=2"], 8,
     "set evaluation.generation_samples=0 or parallel.context_parallel_size=1"),
    (["parallel.context_parallel_size=2", "evaluation.infill_span=4"], 8,
     "evaluation.infill_span=4 with parallel.context_parallel_size=2"),
    (["parallel.cp_comm_type=ring"], 8, "parallel.cp_comm_type='ring' is not one of"),
    # packed documents (THD)
    (["model.document_format=packed"], 4, "model.document_format='packed' is not one of"),
    (["model.document_format=thd", "model.document_attention=false"], 4,
     "model.document_format=thd needs model.document_attention=true"),
    (["model.document_format=thd", "diffusion.block_length=32"], 4,
     "cannot carry block diffusion's two streams"),
    (["model.document_format=thd", "diffusion.anneal_iters=5"], 4,
     "cannot carry annealed attention"),
    (["model.document_format=thd", "parallel.context_parallel_size=2"], 8,
     "is not split over context-parallel ranks yet"),
])
def test_impossible_combinations(overrides, world, key):
    with pytest.raises(ConfigError, match=key):
        validate(load_config(str(TINY_CONFIG), overrides), world)


@pytest.mark.unit
def test_the_all_to_all_dispatcher_is_chosen_by_config_and_refused_without_cuda():
    import torch

    from megalign.model.gpt import check_platform, moe_config

    cfg = load_config(str(TINY_CONFIG), ["model.num_experts=4",
                                         "model.moe_token_dispatcher=alltoall"])
    chosen = moe_config(cfg.model, cfg.parallel)["moe_token_dispatcher_type"]
    if torch.cuda.is_available():
        assert chosen == "alltoall"
    else:  # training refuses it; a checkpoint trained with it still samples here
        assert chosen == "allgather"
        with pytest.raises(ConfigError, match="moe_token_dispatcher=alltoall needs CUDA"):
            check_platform(cfg)


@pytest.mark.unit
def test_context_parallelism_with_an_explicit_mask_is_refused_where_transformer_engine_runs(
        monkeypatch):
    """TE's context-parallel attention has no arbitrary-mask form; megalign's own (without TE)
    takes every mask."""
    from megalign.model import gpt

    cp = ["parallel.context_parallel_size=2"]
    gpt.check_platform(load_config(str(TINY_CONFIG), cp))
    monkeypatch.setattr(gpt, "transformer_engine_available", lambda: True)
    for overrides in (cp, [*cp, "model.document_attention=false", "diffusion.anneal_iters=5"]):
        with pytest.raises(ConfigError, match="no arbitrary-mask form"):
            gpt.check_platform(load_config(str(TINY_CONFIG), overrides))
    gpt.check_platform(load_config(str(TINY_CONFIG), [*cp, "model.document_attention=false"]))


@pytest.mark.unit
def test_packed_documents_refuse_a_teacher_group_split_over_sequence_parallel_ranks():
    from megalign.model.gpt import check_platform

    thd = ["model.document_format=thd", "parallel.sequence_parallel=true"]
    check_platform(load_config(str(TINY_CONFIG), thd))
    with pytest.raises(ConfigError, match="align.teacher_microbatches=2 with packed documents"):
        check_platform(load_config(str(TINY_CONFIG), [*thd, "align.teacher_microbatches=2"]))


@pytest.mark.unit
def test_inprocess_restart_without_the_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: (
        None if name == "nvidia_resiliency_ext" else find_spec(name, *args)))
    cfg = load_config(str(TINY_CONFIG), ["resilience.inprocess_restart=true"])
    with pytest.raises(ConfigError, match=r"pip install 'megalign\[resilience\]'"):
        validate(cfg, 4)


@pytest.mark.unit
def test_vocabulary_must_be_padded_for_tp():
    cfg = load_config(str(TINY_CONFIG), ["model.make_vocab_size_divisible_by=1"])
    with pytest.raises(ConfigError, match="make_vocab_size_divisible_by.*not divisible"):
        validate(cfg, 4, tokenizer_vocab=4001, tokenizer_mask=3)
    cfg = load_config(str(TINY_CONFIG), ["model.padded_vocab_size=4000"])
    with pytest.raises(ConfigError, match="padded_vocab_size=4000 is smaller"):
        validate(cfg, 4, tokenizer_vocab=4000, tokenizer_mask=None)
    with pytest.raises(ConfigError, match="padded_vocab_size=4000 is smaller"):
        check_vocabulary(cfg, tokenizer_vocab=4000, tokenizer_mask=None)  # what inference checks


SINGLE = ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"]


@pytest.mark.unit
@pytest.mark.parametrize("overrides, key", [
    (["parallel.tensor_model_parallel_size=3"], "parallel.tensor_model_parallel_size"),
    (["model.num_layerz=2"], "model.num_layers"),
    ([*SINGLE, "data.tokenizer=/nonexistent.model"], "/nonexistent.model"),
    ([*SINGLE, "model.make_vocab_size_divisible_by=1", "model.padded_vocab_size=100"],
     "model.padded_vocab_size"),
    ([*SINGLE, "parallel.sequence_parallel=true"], "parallel.sequence_parallel=true needs"),
])
def test_cli_fails_before_launch(tmp_path, overrides, key):
    """megalign-train's own entry point, in this process (a launch of it is checked in
    test_fp8.py): exit 2, one line naming the key, nothing started or written."""
    from megalign.cli.train import main

    from fuzz.targets import run_main

    run_dir = tmp_path / "run"
    outcome = run_main(main, ["--config", str(TINY_CONFIG), *overrides,
                              f"logging.run_dir={run_dir}"])
    assert outcome.code == 2
    assert key in outcome.stderr and "Traceback" not in outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()  # nothing was started or written


@pytest.mark.unit
@pytest.mark.parametrize("override, key", [
    ("align.weight=10", "align.weight"),
    ("diffusion.block_length=32", "diffusion.block_length"),
    ("diffusion.anneal_iters=5", "diffusion.anneal_iters"),
    ("diffusion.loss_weighting=inv_t", "diffusion.loss_weighting"),
    ("evaluation.generation_samples=2", "evaluation.generation_samples"),
])
def test_causal_lm_objective_refuses_diffusion_settings(override, key):
    ar = ["objective=ar", "align.weight=0"]
    validate(load_config(str(TINY_CONFIG), ar), 4)
    with pytest.raises(ConfigError, match=f"{key}=.* is a diffusion setting: objective=ar"):
        validate(load_config(str(TINY_CONFIG), [*ar, override]), 4)
    with pytest.raises(ConfigError, match="objective='causal' is not one of"):
        validate(load_config(str(TINY_CONFIG), ["objective=causal"]), 4)


@pytest.mark.unit
def test_an_end_of_document_token_belongs_to_its_tokenizer(tmp_path):
    """megalign.yaml records a converted model's tokenizer with its end-of-document token; a
    different tokenizer given later without one brings its own rule (data.eod_token unset)."""
    recorded = tmp_path / "megalign.yaml"
    recorded.write_text("data: {tokenizer: a.json, eod_token: '<|endoftext|>'}\n")
    other = tmp_path / "run.yaml"
    other.write_text("data: {tokenizer: b.model}\n")
    same = tmp_path / "same.yaml"
    same.write_text("data: {tokenizer: a.json}\n")
    assert load_config([recorded]).data.eod_token == "<|endoftext|>"
    assert load_config([recorded], ["data.tokenizer=b.model"]).data.eod_token is None
    assert load_config([recorded, other]).data.eod_token is None
    assert load_config([recorded, same]).data.eod_token == "<|endoftext|>"
    assert load_config([recorded], ["data.tokenizer=b.model",
                                    "data.eod_token=</s>"]).data.eod_token == "</s>"
    assert load_config([other, recorded]).data.eod_token == "<|endoftext|>"


@pytest.mark.unit
def test_the_configuration_reference_is_current():
    """docs/configuration.md is generated from the sections (python tools/config_reference.py)."""
    from megalign.config.reference import reference_markdown

    written = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written == reference_markdown(), "run: python tools/config_reference.py"


@pytest.mark.unit
def test_a_section_is_checked_and_read_only_however_it_is_built():
    from dataclasses import replace

    from megalign.config import ModelConfig, choices

    model = load_config(str(TINY_CONFIG)).model
    with pytest.raises(AttributeError, match="read-only"):
        model.num_layers = 2
    assert replace(model, num_layers=2).num_layers == 2  # a copy, checked like any other
    with pytest.raises(ConfigError, match="model.num_layers=0 must be at least 1"):
        replace(model, num_layers=0)
    with pytest.raises(ConfigError, match=r"model.arch='gpt3' is not one of \['llama', 'gpt2'\]"):
        ModelConfig(arch="gpt3")
    assert choices(ModelConfig, "arch") == ("llama", "gpt2")


@pytest.mark.unit
def test_cp_comm_type_offers_the_names_megatron_core_passes_to_transformer_engine():
    """parallel.cp_comm_type goes to Megatron-Core's config unchanged and on to Transformer
    Engine, which refuses any other spelling (``all_gather``, not ``allgather``): every choice is
    one that TransformerConfig's own documentation of the field names."""
    import importlib.util
    import typing
    from pathlib import Path

    from megalign.config.sections import ParallelConfig

    # read as text: importing Megatron-Core's config runs ldconfig on 0.19 (a process)
    package = importlib.util.find_spec("megatron").submodule_search_locations[0]
    source = (Path(package) / "core" / "transformer" / "transformer_config.py").read_text()
    documented = source[source.index("cp_comm_type:"):]
    documented = documented[:documented.index('"""', documented.index('"""') + 3)]
    choices = typing.get_args(typing.get_type_hints(ParallelConfig)["cp_comm_type"])
    assert choices
    for choice in choices:
        assert f'"{choice}"' in documented, choice
