"""Hugging Face import/export: tiny random Llama, Qwen2 and GPT-2 models built from transformers
configs (no downloads) round-trip with identical logits, through any TP/PP layout."""

import json

import gguf
import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG, TOKENIZER, WORKERS, chat_tokenizer, run_python, torchrun

VOCAB = 4000  # the bundled tokenizer's, so converted models can train on the bundled corpus


def tiny_hf_model(kind):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if kind in ("qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "llama3", "mistral"):
        return family_model(kind)
    torch.manual_seed(0)
    if kind == "llama":  # tied embeddings, GQA
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=True, rope_theta=50000.0))
    if kind == "qwen2":  # QKV bias, untied embeddings
        return Qwen2ForCausalLM(Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=False))
    # large weights: MLP inputs of order 1, where exact and tanh GeLU differ visibly
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                      n_positions=128, bos_token_id=0, eos_token_id=0,
                                      initializer_range=0.3))


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def family_model(kind, **changes):
    """Tiny random models of the families megalign converts besides Llama/Qwen2/GPT-2, with
    norm weights away from 1 (so a misplaced norm shows) and weights large enough that RoPE
    scaling changes the logits by about 0.3."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(0)
    shared = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    if kind == "qwen3":  # RMSNorm on queries and keys, head size 32 (not 64 / 4), untied
        model = Qwen3ForCausalLM(Qwen3Config(**{**shared, "head_dim": 32,
                                                "max_position_embeddings": 128,
                                                "tie_word_embeddings": False, **changes}))
    elif kind == "qwen3_moe":  # 4 experts of 32, top 2 of a softmax over all, QK-norm
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{
            **shared, "head_dim": 32, "moe_intermediate_size": 32, "num_experts": 4,
            "num_experts_per_tok": 2, "norm_topk_prob": False, "max_position_embeddings": 128,
            "tie_word_embeddings": False, **changes}))
    elif kind == "qwen2_moe":  # QKV bias, 4 experts of 32 and a gated shared expert of 48
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{
            **shared, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
            "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False,
            "max_position_embeddings": 128, "tie_word_embeddings": False, **changes}))
    elif kind == "mixtral":  # 4 experts of 32, the top 2 renormalised
        model = MixtralForCausalLM(MixtralConfig(**{
            **shared, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
            "max_position_embeddings": 128, "tie_word_embeddings": False, **changes}))
    elif kind == "llama3":  # Llama 3.x RoPE scaling, tied
        model = LlamaForCausalLM(LlamaConfig(**{**shared, "max_position_embeddings": 131072,
                                                "rope_scaling": dict(LLAMA3_ROPE),
                                                "tie_word_embeddings": True, **changes}))
    else:  # Mistral without a sliding window (v0.3 and later), untied
        model = MistralForCausalLM(MistralConfig(**{**shared, "max_position_embeddings": 128,
                                                    "sliding_window": None,
                                                    "tie_word_embeddings": False, **changes}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def convert_hf_model(tmp_path, model, *convert_args):
    """``model`` saved as an HF directory and converted by megalign-convert into tmp_path/ml;
    returns random tokens (saved for the logits worker) and transformers' logits on them."""
    model.save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, VOCAB, (2, 48))
    torch.save(tokens, tmp_path / "tokens.pt")
    reference = hf_logits(model, tokens)
    run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign",
                "--input", tmp_path / "hf", "--output", tmp_path / "ml", *convert_args])
    return tokens, reference


def hf_logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens).logits


def megalign_logits(tmp_path, config, tp=1, pp=1, name="logits", extra=(), ep=1):
    """Logits under TP x PP (x EP: experts over EP data-parallel ranks, TP x PP x EP processes)."""
    tokens = tmp_path / "tokens.pt"
    out = tmp_path / f"{name}_{tp}{pp}{ep}.pt"
    torchrun(tp * pp * ep, WORKERS / "logits.py", [
        "--config", config, "--tokens", tokens, "--out", out,
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.expert_model_parallel_size={ep}", *extra])
    return torch.load(out)


@pytest.mark.parametrize("kind", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("gpt2", marks=pytest.mark.slow)])
def test_hf_round_trip_keeps_logits(tmp_path, kind):
    from transformers import AutoModel

    tokens, reference = convert_hf_model(tmp_path, tiny_hf_model(kind))
    layouts = [(1, 1), (2, 2)] if kind == "llama" else [(1, 1)]
    for tp, pp in layouts:
        logits = megalign_logits(tmp_path, tmp_path / "ml" / "megalign.yaml", tp, pp)
        assert logits.shape[-1] == 4096  # padded: 4000 + mask row, multiple of 128
        assert (logits[..., :VOCAB] - reference).abs().max() <= 1e-4, (kind, tp, pp)

    run_python(["-m", "megalign.cli.convert", "--from", "megalign", "--to", "hf",
                "--input", tmp_path / "ml", "--output", tmp_path / "back"])
    # the export is megalign's bidirectional model; given a causal mask it is the AR model again
    back = AutoModel.from_pretrained(tmp_path / "back", trust_remote_code=True).eval()
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "megalign_diffusion"
    assert config["mask_token_id"] == VOCAB and config["shift"] is True
    causal = torch.ones(48, 48, dtype=torch.bool).triu(1).expand(2, 1, 48, 48)
    with torch.no_grad():
        logits = back(tokens, attention_mask=causal).logits
    assert (logits[..., :VOCAB] - reference).abs().max() <= 1e-4


# (TP, PP, EP) each family's logits are checked under (TP1PP1 where none is given)
LAYOUTS = {"qwen3": [(2, 2, 1)], "qwen3_moe": [(2, 2, 1), (1, 2, 2)], "mixtral": [(1, 1, 2)],
           "qwen2_moe": [(2, 1, 2)]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "mixtral", "qwen2_moe", "llama3",
                                  "mistral"])
def test_family_converts_exactly(tmp_path, kind):
    """HF -> megalign: logits within 1e-4 of transformers' (Qwen3 under TP2PP2, Qwen3-MoE under
    TP2PP2 and TP1PP2EP2, Mixtral at EP2, Qwen2-MoE with its shared expert under TP2 x EP2, Llama
    3 and Mistral at TP1PP1) and the same greedy continuation; megalign -> HF: every tensor
    bit-identical to the original (experts as the published checkpoints store them), and
    the export under a causal mask is the AR model again."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from megalign.convert.hf import split_experts

    model = family_model(kind)
    tokens, reference = convert_hf_model(tmp_path, model)
    greedy = model.generate(tokens[:1, :8], max_new_tokens=12, do_sample=False,
                            pad_token_id=0)[0, 8:].tolist()
    for tp, pp, ep in LAYOUTS.get(kind, [(1, 1, 1)]):
        out = megalign_logits(tmp_path, tmp_path / "ml" / "megalign.yaml", tp, pp, ep=ep,
                              extra=["--greedy", "12"])
        assert (out["logits"][..., :VOCAB] - reference).abs().max() <= 1e-4, (kind, tp, pp, ep)
        assert out["greedy"] == greedy, (kind, tp, pp, ep)

    run_python(["-m", "megalign.cli.convert", "--from", "megalign", "--to", "hf",
                "--input", tmp_path / "ml", "--output", tmp_path / "back"])
    original = split_experts(model.state_dict())
    exported = load_file(tmp_path / "back" / "model.safetensors")
    if model.config.tie_word_embeddings:
        original.pop("lm_head.weight")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        rows = exported[name][:VOCAB] if tensor.shape[0] == VOCAB else exported[name]
        assert torch.equal(rows, tensor), name
    back = AutoModel.from_pretrained(tmp_path / "back", trust_remote_code=True).eval()
    causal = torch.ones(48, 48, dtype=torch.bool).triu(1).expand(2, 1, 48, 48)
    with torch.no_grad():
        logits = back(tokens, attention_mask=causal).logits
    assert (logits[..., :VOCAB] - reference).abs().max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen2_moe", "llama3"])
def test_gguf_file_converts_exactly(tmp_path, kind):
    """A GGUF file laid out as llama.cpp writes it (tests/gguf_files.py) converts to the model it
    was written from, logits within 1e-4: transformers' GGUF loader skips Qwen3's head size,
    the MoE families' expert and shared-expert widths and top-k renormalisation, and Llama 3.x
    RoPE scaling (llama.cpp's ``rope_freqs`` tensor), and megalign reads them from the file
    (without that: shape errors for the Qwen families, logits 0.37 off for Llama 3)."""
    from gguf_files import llama3_rope_freqs, write_gguf

    from fuzz import targets

    model = family_model(kind)
    (tmp_path / "gguf").mkdir()
    extra = [("rope_freqs.weight", llama3_rope_freqs(model))] if kind == "llama3" else []
    write_gguf(model, tmp_path / "gguf" / "model.gguf", extra)
    tokens = torch.randint(0, VOCAB, (2, 48))
    torch.save(tokens, tmp_path / "tokens.pt")
    outcome = targets.convert_hf(tmp_path, tmp_path / "gguf", "model.gguf")
    assert outcome.code == 0, outcome.stderr
    logits = megalign_logits(tmp_path, tmp_path / "converted" / "model" / "megalign.yaml")
    assert (logits[..., :VOCAB] - hf_logits(model, tokens)).abs().max() <= 1e-4, kind


@pytest.mark.unit
@pytest.mark.parametrize("kind, fields, tensors, refusal", [
    ("mixtral", {}, [], "llama.expert_count=4"),
    ("llama3", {}, [("rope_freqs.weight", np.full(8, 2.0, dtype=np.float32))], "rope_freqs"),
    ("llama3", {"rope_scaling_type": gguf.RopeScalingType.YARN}, [],
     "llama.rope.scaling.type=yarn"),
    ("qwen3", {"sliding_window": 16}, [], "qwen3.attention.sliding_window=16"),
])
def test_what_a_gguf_file_holds_and_transformers_would_drop_is_refused(tmp_path, kind, fields,
                                                                       tensors, refusal):
    """A Mixtral file (read by transformers as a dense Llama), RoPE frequencies other than Llama
    3.x's, other RoPE scalings, sliding windows: one line naming the GGUF field, nothing written."""
    from gguf_files import write_gguf

    from fuzz import targets

    (tmp_path / "gguf").mkdir()
    write_gguf(family_model(kind), tmp_path / "gguf" / "model.gguf", tensors, **fields)
    outcome = targets.convert_hf(tmp_path, tmp_path / "gguf", "model.gguf")
    assert outcome.code == 2 and refusal in outcome.stderr, outcome.stderr
    assert not (tmp_path / "converted" / "model").exists()


@pytest.mark.unit
def test_mistral_without_a_window_converts_as_llama(tmp_path):
    """Mistral v0.3 and later (no sliding window) is the Llama network: converted in-process, its
    recorded model is the Llama family's (its logits: test_family_converts_exactly)."""
    import yaml

    from fuzz import targets

    family_model("mistral").save_pretrained(tmp_path / "hf")
    assert targets.convert_hf(tmp_path, tmp_path / "hf").code == 0
    model = yaml.safe_load(
        (tmp_path / "converted" / "model" / "megalign.yaml").read_text())["model"]
    assert model["arch"] == "llama" and not model["qk_norm"] and model["head_dim"] is None


@pytest.mark.unit
@pytest.mark.parametrize("kind, changes, refusal", [
    ("mistral", {"sliding_window": 16}, "sliding_window=16"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0},
     "sliding_window=16"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True"),
    ("llama3", {"mlp_bias": True}, "mlp_bias=True"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers=[1]"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ("qwen2_moe", {"mlp_only_layers": [0]}, "mlp_only_layers=[0]"),
    ("mixtral", {"sliding_window": 16}, "sliding_window=16"),
    ("llama3", {"hidden_act": "gelu"}, "hidden_act=gelu"),
    ("llama3", {"rope_scaling": {**LLAMA3_ROPE, "high_freq_factor": 2.0}}, "high_freq_factor=2.0"),
    ("llama3", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 32}}, "rope_type=yarn"),
])
def test_what_a_family_has_and_megalign_cannot_reproduce_is_refused(tmp_path, kind, changes,
                                                                     refusal):
    """One line naming the config.json field, exit 2, nothing written."""
    from fuzz import targets

    family_model(kind, **changes).save_pretrained(tmp_path / "hf")
    outcome = targets.convert_hf(tmp_path, tmp_path / "hf")
    assert outcome.code == 2 and refusal in outcome.stderr, outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "converted" / "model").exists()


@pytest.mark.slow
def test_checkpoints_reshard_tp2pp2_to_tp1pp1_to_tp1pp2(tmp_path, data_overrides):
    """Weights saved by a TP2xPP2 run load into TP1PP1, whose save loads into TP1PP2."""
    _, reference = convert_hf_model(tmp_path, tiny_hf_model("llama"), "--tp", "2", "--pp", "2")
    converted = tmp_path / "ml" / "megalign.yaml"
    # one iteration at learning rate 0 (warm-up start): weights are saved as loaded
    source = tmp_path / "ml"
    for name, tp, pp in (("a", 2, 2), ("b", 1, 1)):
        torchrun(tp * pp, "-m", ["megalign.cli.train", "--config", TINY_CONFIG,
                                 "--config", converted,
                                 *data_overrides, f"model.init_checkpoint={source}",
                                 f"parallel.tensor_model_parallel_size={tp}",
                                 f"parallel.pipeline_model_parallel_size={pp}",
                                 "schedule.train_iters=2", "schedule.warmup_iters=1",
                                 "checkpoint.save_interval=1", "align.weight=0",
                                 f"logging.run_dir={tmp_path}/{name}",
                                 f"checkpoint.save={tmp_path}/{name}/ckpt"])
        source = tmp_path / name / "ckpt" / "iter_0000001"
        loader = (1, 1) if name == "a" else (1, 2)
        logits = megalign_logits(tmp_path, converted, *loader, name=name,
                                 extra=[f"model.init_checkpoint={source}"])
        # the mask row was initialised at training start: compare the real vocabulary
        assert (logits[..., :VOCAB] - reference).abs().max() <= 1e-4, name


@pytest.mark.slow
def test_expert_parallel_checkpoints_reshard(tmp_path, data_overrides):
    """A Qwen3-MoE model trained under TP1 x PP2 x EP2 (one step at learning rate 0) saves
    weights that load into TP1PP1 with its experts where they were: transformers' logits."""
    _, reference = convert_hf_model(tmp_path, family_model("qwen3_moe"))
    converted = tmp_path / "ml" / "megalign.yaml"
    torchrun(4, "-m", ["megalign.cli.train", "--config", TINY_CONFIG, "--config", converted,
                       *data_overrides, "parallel.tensor_model_parallel_size=1",
                       "parallel.pipeline_model_parallel_size=2",
                       "parallel.expert_model_parallel_size=2", "schedule.train_iters=2",
                       "schedule.warmup_iters=1", "checkpoint.save_interval=1", "align.weight=10",
                       f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ckpt"])
    logits = megalign_logits(tmp_path, converted, extra=[
        f"model.init_checkpoint={tmp_path / 'ckpt' / 'iter_0000001'}"])
    assert (logits[..., :VOCAB] - reference).abs().max() <= 1e-4
    # what a MoE run logs: the load-balancing loss (in the loss) and each layer's expert load
    for record in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()):
        assert record["moe_aux_loss"] > 0 and record["loss"] == pytest.approx(
            record["diffusion_loss"] + record["align_loss"] + record["moe_aux_loss"])
        assert len(record["expert_load"]) == 4 and all(1 <= x <= 4 for x in record["expert_load"])


def test_unsupported_architecture_and_bad_layout_are_clear(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(
        tmp_path / "bert")
    result = run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign",
                         "--input", tmp_path / "bert", "--output", tmp_path / "out"], check=False)
    assert result.returncode == 2 and "bert is not supported" in result.stderr
    tiny_hf_model("llama").save_pretrained(tmp_path / "hf")
    result = run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign",
                         "--input", tmp_path / "hf", "--output", tmp_path / "out", "--tp", "4"],
                        check=False)
    assert result.returncode == 2 and "--tp 4 must divide" in result.stderr
    assert not (tmp_path / "out").exists()


def test_conversion_records_the_document_separator(tmp_path):
    """A chat model's tokenizer names <|im_end|> as eos; documents end with <|endoftext|>, and
    megalign.yaml says so for training (data.eod_token), as preprocessing chooses it."""
    import yaml

    from megalign.config import load_config
    from megalign.data.tokenizer import build_tokenizer

    _, tokenizer_dir = chat_tokenizer(tmp_path)
    tiny_hf_model("llama").save_pretrained(tokenizer_dir)
    result = run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign",
                         "--input", tokenizer_dir, "--output", tmp_path / "ml"])
    assert "documents end with '<|endoftext|>' (id 0" in result.stderr
    data = yaml.safe_load((tmp_path / "ml" / "megalign.yaml").read_text())["data"]
    assert data["eod_token"] == "<|endoftext|>"
    cfg = load_config([str(tmp_path / "ml" / "megalign.yaml")])
    assert build_tokenizer(cfg.data.tokenizer, cfg.data.eod_token).eod == 0
    assert build_tokenizer(cfg.data.tokenizer).eod == 0  # what megalign-preprocess chooses
    # another tokenizer brings its own end-of-document rule (it has no '<|endoftext|>')
    cfg = load_config([str(tmp_path / "ml" / "megalign.yaml")], [f"data.tokenizer={TOKENIZER}"])
    assert cfg.data.eod_token is None and build_tokenizer(cfg.data.tokenizer).eod_token == "</s>"


@pytest.mark.unit
def test_a_conversion_failing_after_the_weights_leaves_nothing(tmp_path, monkeypatch):
    """The tokenizer and megalign.yaml are written after the weights: a failure there (here a
    full disk while the tokenizer is read back) leaves no directory that looks like a converted
    model, and says so in one line."""
    import errno

    from megalign.cli.convert import main
    from megalign.convert import checkpoints

    from fuzz.targets import run_main

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ml"))

    _, tokenizer_dir = chat_tokenizer(tmp_path)
    tiny_hf_model("llama").save_pretrained(tokenizer_dir)
    monkeypatch.setattr(checkpoints, "build_tokenizer", disk_full)
    outcome = run_main(main, ["--from", "hf", "--to", "megalign", "--input", str(tokenizer_dir),
                              "--output", str(tmp_path / "ml")])
    assert outcome.code == 1 and "No space left" in outcome.stderr, outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ml")]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_directory_without_tokenizer_files_converts_without_a_tokenizer(tmp_path, kind,
                                                                            corpus_prefix):
    """transformers builds the model type's default tokenizer for such a directory (for Qwen2,
    one token); megalign-convert kept it and recorded its end-of-document token, so training
    with one's own tokenizer stopped unless data.eod_token=null was given too."""
    import yaml

    from fuzz import targets

    tiny_hf_model(kind).save_pretrained(tmp_path / "hf")
    assert targets.convert_hf(tmp_path, tmp_path / "hf").code == 0
    model = tmp_path / "converted" / "model"
    assert not (model / "tokenizer").exists()
    assert "data" not in yaml.safe_load((model / "megalign.yaml").read_text())
    base = {"parallel": {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1},
            "data": {"global_batch_size": 2, "paths": [corpus_prefix]}}
    outcome = targets.train_check(tmp_path, (model / "megalign.yaml").read_bytes(),
                                  [f"data.tokenizer={TOKENIZER}"], base,
                                  path=model / "megalign.yaml")
    assert outcome.code == 0, outcome.stderr


@pytest.mark.unit
def test_dream_refuses_what_its_network_cannot_hold():
    """Dream's format holds dense Llama-family students decoded bidirectionally with the AR shift;
    anything else is refused with the reason, before a checkpoint is read."""
    from megalign.config import load_config
    from megalign.convert.dream import dream_refusal

    def refusal(*overrides):
        return dream_refusal(load_config([str(TINY_CONFIG)], list(overrides)))

    assert refusal() is None
    assert refusal("model.qkv_bias=true", "model.rope_scaling_factor=8.0") is None
    assert "GPT-2" in refusal("model.arch=gpt2")
    assert "mixture of experts" in refusal("model.num_experts=4")
    assert "queries and keys" in refusal("model.qk_norm=true")
    assert "head size of 32" in refusal("model.head_dim=32")
    assert "block diffusion" in refusal("diffusion.block_length=8")
    assert "AR shift" in refusal("diffusion.shift=false")


@pytest.mark.unit
def test_the_fast_dllm_v2_export_says_why_it_cannot_hold_a_student():
    """Fast-dLLM v2's format holds block-diffusion Qwen2 students decoded its way; megalign's
    block decoding differs (blocks from the prompt's end, the block opener from the clean
    stream), so every student is refused with the reason (docs/hugging-face.md)."""
    from megalign.config import load_config
    from megalign.convert.fast_dllm import DECODING, fast_dllm_v2_refusal

    def refusal(*overrides):
        return fast_dllm_v2_refusal(load_config([str(TINY_CONFIG)], list(overrides)))

    assert "without block diffusion" in refusal()
    assert refusal("diffusion.block_length=8") == DECODING
    assert "counts blocks from the prompt's end" in DECODING
    assert "mixture of experts (Fast-dLLM v2's" in refusal("diffusion.block_length=8",
                                                           "model.num_experts=4")
    assert "AR shift" in refusal("diffusion.block_length=8", "diffusion.shift=false")


@pytest.mark.unit
def test_the_gguf_export_refuses_what_it_cannot_write():
    """--to gguf: dense students as Dream, mixtures of experts as RND1 (Qwen3-MoE's network)
    or, when their top k is not renormalised, LLaDA-MoE (heads x head size = hidden size); what
    those cannot hold, Llama 3.x RoPE scaling (no graph has a frequency table) and
    tokenizers other than SentencePiece (their pre-tokenizer is named in llama.cpp's tables: its
    converter makes those files from a --to dream export)."""
    from megalign.config import load_config
    from megalign.convert.dream_gguf import gguf_refusal, moe_architecture

    def refusal(*overrides):
        return gguf_refusal(load_config([str(TINY_CONFIG)], list(overrides)))

    assert refusal() is None
    qwen3_moe = ("model.num_experts=4", "model.qk_norm=true", "model.moe_router_pre_softmax=false")
    assert refusal(*qwen3_moe) is None
    assert refusal(*qwen3_moe, "diffusion.shift=false") is None  # the shift is recorded
    assert "without RMSNorm on queries and keys" in refusal("model.num_experts=4")
    llada_moe = (*qwen3_moe[:2], "model.moe_router_pre_softmax=true")  # 4 heads of 16 = 64
    assert refusal(*llada_moe) is None
    assert [moe_architecture(load_config([str(TINY_CONFIG)], list(overrides)))
            for overrides in (qwen3_moe, llada_moe)] == ["rnd1", "llada-moe"]
    wide_heads = refusal(*llada_moe, "model.head_dim=32")
    assert "not renormalised" in wide_heads and "4 heads of 32 != hidden size 64" in wide_heads
    assert refusal(*qwen3_moe, "model.head_dim=32") is None  # RND1 takes any head size
    assert "shared expert" in refusal(*qwen3_moe, "model.moe_shared_expert_ffn_hidden_size=48")
    assert "block diffusion" in refusal(*qwen3_moe, "diffusion.block_length=8")
    assert "queries and keys (Qwen3's" in refusal("model.qk_norm=true")  # dense Qwen3: neither
    assert "RoPE scaling" in refusal("model.rope_scaling_factor=8.0")
    assert "convert_hf_to_gguf.py" in refusal("data.tokenizer=tokenizer.json")


@pytest.mark.unit
def test_an_export_replaces_only_an_earlier_export_of_its_kind(tmp_path):
    """--output that holds something else is refused in one line before anything is read or
    written; an empty directory or an earlier export of the same kind is replaced."""
    from megalign.convert.checkpoints import refuse_foreign_output
    from megalign.errors import ConversionError

    (tmp_path / "empty").mkdir()
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "modeling_dream.py").write_text("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for name in ("empty", "earlier", "missing"):
        refuse_foreign_output(str(tmp_path / name), "modeling_dream.py", "a Dream export")
    with pytest.raises(ConversionError, match="exists and is not a Dream export; give a new"):
        refuse_foreign_output(str(tmp_path / "other"), "modeling_dream.py", "a Dream export")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
