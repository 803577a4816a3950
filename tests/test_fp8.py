"""precision=fp8 plumbing, checked on CPU: config -> Megatron-Core's fp8 fields, the TE spec only
where Transformer Engine runs, and clear errors where FP8 cannot run (no GPU or no TE)."""

import pytest
import torch

from megalign.config import load_config, validate
from megalign.errors import ConfigError
from megalign.model.gpt import (
    ModelBuild,
    layer_spec,
    transformer_config,
    transformer_engine_available,
    transformer_engine_imports,
)
from megalign.model.norm import TorchNorm

from conftest import TINY_CONFIG, run_python


@pytest.mark.unit
def test_fp8_settings_reach_megatron_core():
    cfg = load_config(str(TINY_CONFIG), ["precision=fp8", "fp8.format=e4m3",
                                         "fp8.recipe=tensorwise",
                                         "fp8.margin=1", "fp8.amax_history_len=16",
                                         "fp8.amax_compute_algo=most_recent", "fp8.wgrad=false"])
    validate(cfg, 4)
    student = transformer_config(ModelBuild.of(cfg, causal=False, params_dtype=torch.bfloat16,
                                               fp8=True))
    assert (student.fp8, student.fp8_recipe, student.fp8_margin, student.fp8_amax_history_len,
            student.fp8_amax_compute_algo, student.fp8_wgrad) == ("e4m3", "tensorwise", 1, 16,
                                                                  "most_recent", False)
    assert student.bf16 and student.params_dtype == torch.bfloat16
    teacher = ModelBuild.of(cfg, causal=True, params_dtype=torch.bfloat16)
    assert transformer_config(teacher).fp8 is None  # e.g. the teacher by default


@pytest.mark.unit
@pytest.mark.parametrize("overrides, key", [
    (["precision=fp8", "fp8.recipe=nvfp4"], "fp8.recipe='nvfp4' is not one of"),
    (["precision=fp8", "fp8.format=e5m2"], "fp8.format='e5m2' is not one of"),
    (["precision=fp8", "fp8.amax_history_len=0"], "fp8.amax_history_len=0 must be at least 1"),
    (["precision=bf16", "fp8.teacher=true"], "fp8.teacher=true needs precision=fp8"),
])
def test_bad_fp8_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate(load_config(str(TINY_CONFIG), overrides), 4)


@pytest.mark.skipif(transformer_engine_available(), reason="this machine can run FP8")
def test_fp8_without_gpu_or_te_fails_before_launch(tmp_path):
    run_dir = tmp_path / "run"
    result = run_python(["-m", "megalign.cli.train", "--config", TINY_CONFIG, "precision=fp8",
                         f"logging.run_dir={run_dir}"], check=False, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "precision=fp8 needs a GPU and Transformer Engine" in result.stderr
    if not torch.cuda.is_available():
        assert "no GPU is visible" in result.stderr
    if not transformer_engine_imports():
        assert "transformer_engine does not import" in result.stderr
        assert "megalign[gpu]" in result.stderr
    assert not run_dir.exists()


@pytest.mark.unit
@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine runs here")
def test_local_spec_and_no_fused_kernels_without_te():
    cfg = load_config(str(TINY_CONFIG))
    build = ModelBuild.of(cfg, causal=False, params_dtype=torch.float32)
    layer = layer_spec(build.model, build.attention).submodules
    assert "transformer_engine" not in layer.self_attention.submodules.linear_qkv.__module__
    assert layer.input_layernorm is layer.pre_mlp_layernorm is TorchNorm  # SP-capable norms
    config = transformer_config(build)
    assert not (config.gradient_accumulation_fusion or config.apply_rope_fusion
                or config.bias_activation_fusion or config.masked_softmax_fusion)
