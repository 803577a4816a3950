"""The Hugging Face export of a trained diffusion student: loads and samples with transformers
alone (megalign not importable), matching megalign's logits and megalign-generate's tokens."""

import json
import sys
from pathlib import Path

import pytest
import torch
from test_hf import VOCAB, family_model, tiny_hf_model

from conftest import CORPUS, TINY_CONFIG, TOKENIZER, WORKERS, run_python

pytestmark = pytest.mark.slow  # each model is converted, trained and exported

PROMPTS = ["In the beginning God", "And the LORD said unto Moses, Go"]
# megalign-generate options -> diffusion_generate keyword options
OPTION_SETS = [
    ({}, {}),  # the defaults: blocks of 8, one token per step, greedy
    ({"--block-length": 16, "--steps": 8}, {"block_length": 16, "steps": 8}),
    ({"--confidence": "margin", "--unmasking": "p2", "--block-length": 16, "--steps": 16},
     {"confidence": "margin", "unmasking": "p2", "block_length": 16, "steps": 16}),
    ({"--temperature": 0.8, "--top-k": 20, "--seed": 3},
     {"temperature": 0.8, "top_k": 20, "seed": 3}),
    ({"--threshold": 0.05}, {"threshold": 0.05}),  # parallel decoding
    ({"--cache": True}, {"cache": True}),  # the prefix cache
    ({"--dual-cache": True, "--threshold": 0.05}, {"dual_cache": True, "threshold": 0.05}),
    ({"--dual-cache": True, "--cache-refresh": 2}, {"dual_cache": True, "cache_refresh": 2}),
    ({"--cache": True, "--no-suffix": True, "--temperature": 0.8, "--seed": 3},
     {"cache": True, "suffix": False, "temperature": 0.8, "seed": 3}),
]
# the fast settings, checked in bfloat16 too (megalign-generate --bf16 against dtype=bfloat16)
BF16_OPTION_SETS = [({}, {}), ({"--dual-cache": True, "--threshold": 0.05},
                               {"dual_cache": True, "threshold": 0.05})]
GEN_LENGTH = 16
# config.json keys of Dream-org's checkpoints: Dream's DreamConfig as transformers saves it
DREAM_KEYS = {"architectures", "attention_dropout", "auto_map", "bos_token_id", "eos_token_id",
              "hidden_act", "hidden_size", "initializer_range", "intermediate_size",
              "mask_token_id", "max_position_embeddings", "max_window_layers", "model_type",
              "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "pad_token_id",
              "rms_norm_eps", "rope_scaling", "rope_theta", "sliding_window",
              "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache",
              "use_sliding_window", "vocab_size"}
# megalign-generate options -> Dream's diffusion_generate arguments for the same decoding
DREAM_OPTION_SETS = [
    ({}, {"steps": GEN_LENGTH, "alg": "maskgit_plus", "temperature": 0.0, "top_p": None,
          "top_k": None, "return_dict_in_generate": True}),  # megalign's defaults, Dream's words
    ({"--confidence": "entropy", "--block-length": 16}, {"alg": "entropy", "block_length": 16}),
    ({"--confidence": "margin", "--dual-cache": True, "--threshold": 0.05},
     {"alg": "topk_margin", "dual_cache": True, "threshold": 0.05}),
    ({"--unmasking": "origin", "--temperature": 0.8, "--seed": 3},
     {"alg": "origin", "temperature": 0.8, "seed": 3, "eps": 1e-3}),
]


@pytest.fixture(scope="module",
                params=["llama", "qwen2_moe", "qwen3_moe", "gpt2", "qwen3_moe_block"])
def exported(request, tmp_path_factory, data_overrides):
    """A tiny HF model converted, trained 2 steps with REPR-ALIGN by megalign (``_block``: by block
    diffusion, blocks of 8), and exported. Qwen3-MoE renormalises its top k (Qwen3-30B-A3B's
    router; Qwen2-MoE's does not)."""
    kind, tmp = request.param, tmp_path_factory.mktemp(f"export_{request.param}")
    base = kind.removesuffix("_block")
    model = (family_model(base, norm_topk_prob=True) if base == "qwen3_moe"
             else tiny_hf_model(base))
    model.save_pretrained(tmp / "hf")
    run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign", "--input",
                tmp / "hf", "--output", tmp / "ml"])
    run_python(["-m", "megalign.cli.train", "--config", TINY_CONFIG,
                "--config", tmp / "ml" / "megalign.yaml",
                *data_overrides, "parallel.tensor_model_parallel_size=1",
                "parallel.pipeline_model_parallel_size=1", "schedule.train_iters=2",
                "schedule.warmup_iters=1", "optimizer.lr=1e-2", "align.weight=10",
                *(["diffusion.block_length=8"] if kind.endswith("_block") else []),
                f"logging.run_dir={tmp}/run", f"checkpoint.save={tmp}/ckpt"])
    run_python(["-m", "megalign.cli.convert", "--from", "megalign", "--to", "hf", "--input",
                tmp / "ckpt", "--output", tmp / "export"])
    return kind, tmp


def megalign_generate(checkpoint, option_sets: list[dict], out) -> list[list[list[int]]]:
    """megalign-generate's tokens for each option set (one process runs the command's main once
    per option set: tests/workers/generate_many.py)."""
    jobs = []
    for index, options in enumerate(option_sets):
        args = [arg for key, value in options.items()
                for arg in ((key,) if value is True else (key, value))]
        jobs.append(["--checkpoint", checkpoint, "--gen-length", GEN_LENGTH,
                     *[a for p in PROMPTS for a in ("--prompt", p)], *args,
                     "--output", f"{out}.{index}.jsonl"])
    (out.parent / f"{out.name}.jobs.json").write_text(json.dumps(jobs, default=str))
    run_python([WORKERS / "generate_many.py", out.parent / f"{out.name}.jobs.json"])
    return [[json.loads(line)["completion_ids"]
             for line in open(f"{out}.{index}.jsonl", encoding="utf-8")]
            for index in range(len(option_sets))]


def decodable(kind: str, option_sets: list) -> list:
    """The option sets a student decodes with: a block-diffusion student decodes without the
    suffix, which the dual cache needs."""
    return [(cli, kw) for cli, kw in option_sets
            if not (kind.endswith("_block") and "dual_cache" in kw)]


def transformers_alone(export, tokens, option_sets: list, out, dtype="float32",
                       dual_window=None, window_tokens=None) -> dict:
    """The export's logits of ``tokens`` and diffusion_generate's tokens per option set, from a
    process where megalign cannot be imported."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    job = {"model": str(export), "tokens": str(tokens), "dtype": dtype,
           "prompts": [sp.encode(p) for p in PROMPTS],
           "options": [{"max_new_tokens": GEN_LENGTH, **kw} for _, kw in option_sets],
           "dual_window": dual_window, "window_tokens": str(window_tokens)}
    out.with_suffix(".job.json").write_text(json.dumps(job))
    run_python([WORKERS / "hf_diffusion.py", "--job", out.with_suffix(".job.json"), "--out", out])
    report = json.loads(out.read_text())
    report["logits"] = torch.load(f"{out}.logits.pt")
    if dual_window:
        report["window_logits"] = torch.load(f"{out}.window.pt")
    return report


def test_export_is_safetensors_with_its_own_modeling_file(exported):
    _, tmp = exported
    files = sorted(p.name for p in (tmp / "export").iterdir())
    assert "model.safetensors" in files and "modeling_megalign.py" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((tmp / "export" / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_megalign.MegalignForDiffusionLM"
    assert config["mask_token_id"] == VOCAB and config["shift"] is True
    card = (tmp / "export" / "README.md").read_text()
    assert "λ = 10" in card and "optimizer steps: 2" in card and "diffusion_generate" in card
    assert "AutoTokenizer" in card
    assert "val_nelbo" not in card or "Held-out" in card


def test_exported_sentencepiece_tokenizer_encodes_as_the_model_file(exported):
    """The SentencePiece .model the student was trained with, exported as tokenizer.json:
    AutoTokenizer loads it without remote code and encodes the corpus exactly as the .model."""
    import gzip

    import sentencepiece as spm
    from transformers import AutoTokenizer

    _, tmp = exported
    tokenizer = AutoTokenizer.from_pretrained(tmp / "export", trust_remote_code=False)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        documents = [json.loads(line)["text"] for line in handle][:300]
    documents += ["  two  spaces ", "tab\there", "ünïcödé ＡＢＣ", "\u200b", "x\ny", "😀"]
    assert [tokenizer(d).input_ids for d in documents] == [sp.encode(d) for d in documents]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id) == (
        sp.piece_to_id("</s>"), sp.piece_to_id("<pad>"), sp.piece_to_id("<mask>"))
    assert tokenizer.decode(sp.encode(documents[0])) == sp.decode(sp.encode(documents[0]))


def test_transformers_alone_matches_megalign(exported, tmp_path):
    """The export's logits equal megalign's; diffusion_generate returns megalign-generate's tokens
    for every option set (caches, block-causal decoding of a block-diffusion student, sampling),
    batched and alone; in bfloat16 too, bit for bit."""
    kind, tmp = exported
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 40))
    tokens[:, 10:30:3] = VOCAB  # mask tokens in the input
    torch.save(tokens, tmp_path / "tokens.pt")
    option_sets, half_sets = decodable(kind, OPTION_SETS), decodable(kind, BF16_OPTION_SETS)
    generated = megalign_generate(
        tmp / "ckpt", [cli for cli, _ in option_sets]
        + [{**cli, "--bf16": True} for cli, _ in half_sets], tmp_path / "gen")
    expected, expected_bf16 = generated[:len(option_sets)], generated[len(option_sets):]
    report = transformers_alone(tmp / "export", tmp_path / "tokens.pt", option_sets,
                                tmp_path / "hf.json")
    # the written file, loaded by transformers
    assert report["module"].endswith("modeling_megalign")
    run_python([WORKERS / "student_logits.py", "--checkpoint", tmp / "ckpt", "--tokens",
                tmp_path / "tokens.pt", "--out", tmp_path / "megalign_logits.pt"])
    reference = torch.load(tmp_path / "megalign_logits.pt")
    assert (report["logits"][..., :VOCAB] - reference[..., :VOCAB]).abs().max() <= 1e-4, kind
    assert len({json.dumps(e) for e in expected}) > 1  # the option sets decode differently
    for (cli, options), alone, batched, want in zip(option_sets, report["alone"],
                                                    report["batched"], expected):
        assert batched == want, (kind, cli)  # megalign-generate's tokens, same options
        if not options.get("temperature"):  # sampling draws noise for the whole batch at once
            assert alone == batched, (kind, cli)  # padding and batching change nothing

    # a dual-cached window of a long sequence: the export keeps megalign's key order (bf16
    # rounds sums in the order they are taken; a short one rarely shows it)
    long = torch.randint(0, VOCAB, (2, 128))
    long[:, 48:80] = VOCAB
    torch.save(long, tmp_path / "long.pt")
    half = transformers_alone(tmp / "export", tmp_path / "tokens.pt", half_sets,
                              tmp_path / "hf_bf16.json", dtype="bfloat16", dual_window=[48, 56],
                              window_tokens=tmp_path / "long.pt")
    run_python([WORKERS / "student_logits.py", "--checkpoint", tmp / "ckpt", "--tokens",
                tmp_path / "tokens.pt", "--out", tmp_path / "megalign_bf16.pt", "--bf16"])
    half_reference = torch.load(tmp_path / "megalign_bf16.pt")[..., :VOCAB]
    difference = (half["logits"][..., :VOCAB] - half_reference).abs().max()
    # bit for bit where megalign's local spec and the export round alike; GPT-2's GeLU and
    # LayerNorm kernels differ in their last bits (measured 0.0625 on logits of order 10)
    assert difference == 0 if kind != "gpt2" else difference <= 0.25, (kind, float(difference))
    for (cli, _), batched, want in zip(half_sets, half["batched"], expected_bf16):
        assert batched == want, (kind, cli, "bf16")
    run_python([WORKERS / "student_logits.py", "--checkpoint", tmp / "ckpt", "--tokens",
                tmp_path / "long.pt", "--out", tmp_path / "megalign_window.pt", "--bf16",
                "--dual-window", 48, 56])
    window = torch.load(tmp_path / "megalign_window.pt")[..., :VOCAB].float()
    difference = (half["window_logits"][..., :VOCAB] - window).abs().max()
    assert difference == 0 if kind != "gpt2" else difference <= 0.25, (kind, float(difference))


def dream_tensor_names(layers: int, tied: bool) -> set:
    """The tensor names of a Dream checkpoint (Qwen2's) with ``layers`` layers."""
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                 "self_attn.o_proj.weight"] + [f"self_attn.{p}_proj.{w}" for p in "qkv"
                                              for w in ("weight", "bias")]
    return ({"model.embed_tokens.weight", "model.norm.weight"}
            | {f"model.layers.{i}.{n}" for i in range(layers) for n in per_layer}
            | (set() if tied else {"lm_head.weight"}))


def test_dream_export_reads_as_dream_and_as_qwen2(exported, tmp_path):
    """--to dream: Dream's config keys and tensor names, a tokenizer declaring the mask token; the
    export's logits equal megalign's, and so do those of transformers' own Qwen2 layers made
    bidirectional reading the same files; diffusion_generate called with Dream's arguments returns
    megalign-generate's tokens. The students Dream cannot hold are refused in one line, exit 2,
    nothing written."""
    from safetensors import safe_open
    from transformers import PreTrainedTokenizerFast

    from megalign.cli.convert import main

    from fuzz.targets import run_main

    kind, tmp = exported
    export = tmp_path / "dream"
    if kind != "llama":  # Dream's MLPs are dense, its network Qwen2's
        outcome = run_main(main, ["--from", "megalign", "--to", "dream", "--input",
                                  str(tmp / "ckpt"), "--output", str(export)])
        reason = "GPT-2" if kind == "gpt2" else "mixture of experts"
        assert outcome.code == 2 and reason in outcome.stderr, outcome.stderr
        assert len(outcome.stderr.strip().splitlines()) == 1 and not export.exists()
        if kind == "qwen3_moe":  # llama.cpp's RND1 architecture holds it
            assert_moe_gguf_logits(tmp / "ckpt", tmp_path, "rnd1")
        return
    refused = run_main(main, ["--from", "megalign", "--to", "fast-dllm-v2", "--input",
                              str(tmp / "ckpt"), "--output", str(export)])
    assert refused.code == 2 and "without block diffusion" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not export.exists()
    run_python(["-m", "megalign.cli.convert", "--from", "megalign", "--to", "dream", "--input",
                tmp / "ckpt", "--output", export])
    config = json.loads((export / "config.json").read_text())
    assert set(config) == DREAM_KEYS | {"sample_vocab_size"}, set(config) ^ DREAM_KEYS
    assert (config["model_type"], config["architectures"]) == ("Dream", ["DreamModel"])
    assert config["mask_token_id"] == VOCAB and config["sample_vocab_size"] == VOCAB
    with safe_open(export / "model.safetensors", "pt") as weights:
        assert set(weights.keys()) == dream_tensor_names(config["num_hidden_layers"], True)
        assert not weights.get_tensor("model.layers.0.self_attn.q_proj.bias").any()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(export)
    assert tokenizer.mask_token_id == VOCAB
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation["mask_token_id"] == VOCAB and generation["eos_token_id"] == config[
        "eos_token_id"] == tokenizer.eos_token_id

    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 40))
    tokens[:, 10:30:3] = VOCAB
    torch.save(tokens, tmp_path / "tokens.pt")
    run_python([WORKERS / "student_logits.py", "--checkpoint", tmp / "ckpt", "--tokens",
                tmp_path / "tokens.pt", "--out", tmp_path / "megalign_logits.pt"])
    reference = torch.load(tmp_path / "megalign_logits.pt")[..., :VOCAB]
    run_python([WORKERS / "qwen2_reading.py", "--export", export, "--tokens",
                tmp_path / "tokens.pt", "--out", tmp_path / "qwen2_logits.pt"])
    qwen2 = torch.load(tmp_path / "qwen2_logits.pt")[..., :VOCAB]
    assert (qwen2 - reference).abs().max() <= 1e-4
    expected = megalign_generate(tmp / "ckpt", [cli for cli, _ in DREAM_OPTION_SETS],
                                 tmp_path / "gen")
    report = transformers_alone(export, tmp_path / "tokens.pt", DREAM_OPTION_SETS,
                                tmp_path / "dream.json")
    assert report["module"].endswith("modeling_dream")
    assert (report["logits"][..., :VOCAB] - reference).abs().max() <= 1e-4
    assert report["batched"] == expected  # each option set: megalign-generate's tokens
    # a prompt alone as in the batch (greedy; megalign's own export test checks every setting)
    assert report["alone"][0] == report["batched"][0]

    # llama.cpp's own converter makes a GGUF file of the export; llama.cpp computes its logits
    converter = Path(sys.prefix) / "llama.cpp" / "convert_hf_to_gguf.py"
    assert converter.is_file(), f"{converter} is missing: run tools/setup_llama_cpp.sh"
    run_python([converter, export, "--outtype", "f32", "--outfile", tmp_path / "dream.gguf"])
    run_python([WORKERS / "llama_cpp_logits.py", "--gguf", tmp_path / "dream.gguf", "--tokens",
                tmp_path / "tokens.pt", "--out", tmp_path / "llama_cpp_logits.pt"])
    llama_cpp = torch.load(tmp_path / "llama_cpp_logits.pt")
    assert llama_cpp.shape == (*tokens.shape, config["vocab_size"])
    assert (llama_cpp[..., :VOCAB] - reference).abs().max() <= 1e-4

    # megalign's own GGUF file (--to gguf): llama.cpp's logits and its tokenization of the corpus
    import gzip

    import gguf
    import sentencepiece as spm

    run_python(["-m", "megalign.cli.convert", "--from", "megalign", "--to", "gguf", "--input",
                tmp / "ckpt", "--output", tmp_path / "megalign.gguf"])
    fields = gguf.GGUFReader(tmp_path / "megalign.gguf").fields
    assert fields["general.architecture"].contents() == "dream"
    assert fields["diffusion.shift_logits"].contents() is True
    assert fields["tokenizer.ggml.mask_token_id"].contents() == VOCAB
    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        # (llama.cpp does not apply SentencePiece's normaliser: runs of spaces and spaces at the
        # ends encode differently there; the corpus has none inside its texts)
        texts = [json.loads(line)["text"][:400].strip() for line, _ in zip(handle, range(40))]
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    run_python([WORKERS / "llama_cpp_logits.py", "--gguf", tmp_path / "megalign.gguf",
                "--tokens", tmp_path / "tokens.pt", "--out", tmp_path / "gguf_logits.pt",
                "--texts", tmp_path / "texts.json"])
    own = torch.load(tmp_path / "gguf_logits.pt")
    assert (own[..., :VOCAB] - reference).abs().max() <= 1e-4
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    encoded = json.loads((tmp_path / "gguf_logits.pt.tokens.json").read_text())
    assert encoded == [sp.encode(text) for text in texts]


def assert_moe_gguf_logits(checkpoint: Path, out: Path, architecture: str) -> None:
    """--to gguf writes the trained mixture-of-experts student as llama.cpp's ``architecture``
    (experts stacked per projection, QK-norm, the shift recorded), whose non-causal logits
    llama.cpp computes within 1e-4 of megalign's."""
    import gguf

    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 40))
    tokens[:, 10:30:3] = VOCAB  # mask tokens
    torch.save(tokens, out / "tokens.pt")
    run_python([WORKERS / "student_logits.py", "--checkpoint", checkpoint, "--tokens",
                out / "tokens.pt", "--out", out / "megalign_logits.pt"])
    reference = torch.load(out / "megalign_logits.pt")[..., :VOCAB]
    path = out / f"{architecture}.gguf"
    run_python(["-m", "megalign.cli.convert", "--from", "megalign", "--to", "gguf", "--input",
                checkpoint, "--output", path])
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == architecture
    assert fields[f"{architecture}.expert_count"].contents() == 4
    assert fields["diffusion.shift_logits"].contents() is True
    run_python([WORKERS / "llama_cpp_logits.py", "--gguf", path, "--tokens", out / "tokens.pt",
                "--out", out / f"{architecture}_logits.pt"])
    logits = torch.load(out / f"{architecture}_logits.pt")[..., :VOCAB]
    assert (logits - reference).abs().max() <= 1e-4


@pytest.mark.slow
def test_a_moe_student_whose_top_k_is_not_renormalised_runs_in_llama_cpp(tmp_path,
                                                                         data_overrides):
    """A Qwen3-MoE student whose router keeps the softmax's top-k weights as they are (no
    renormalisation: LLaDA-MoE's router) with heads x head size = hidden size and a tied
    embedding, trained a step: --to gguf writes llama.cpp's LLaDA-MoE architecture (the embedding
    written again as its required output layer), and llama.cpp's logits equal megalign's."""
    family_model("qwen3_moe", head_dim=16, tie_word_embeddings=True).save_pretrained(
        tmp_path / "hf")
    run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign", "--input",
                tmp_path / "hf", "--output", tmp_path / "ml"])
    run_python(["-m", "megalign.cli.train", "--config", TINY_CONFIG,
                "--config", tmp_path / "ml" / "megalign.yaml", *data_overrides,
                "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                "schedule.train_iters=1", "schedule.warmup_iters=0", "optimizer.lr=1e-2",
                f"logging.run_dir={tmp_path}/run", f"checkpoint.save={tmp_path}/ckpt"])
    assert "moe_router_pre_softmax: true" in (tmp_path / "ml" / "megalign.yaml").read_text()
    assert_moe_gguf_logits(tmp_path / "ckpt", tmp_path, "llada-moe")


def test_a_qwen2_model_exports_to_dream_with_its_own_weights(tmp_path):
    """A Qwen2 model converted and exported to Dream's format untrained: the tensors are the
    original's (the padded vocabulary rows aside), and the original read bidirectionally by
    transformers gives the export's logits."""
    from safetensors.torch import load_file

    original = tiny_hf_model("qwen2")
    original.save_pretrained(tmp_path / "hf")
    run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign", "--input",
                tmp_path / "hf", "--output", tmp_path / "ml"])
    run_python(["-m", "megalign.cli.convert", "--from", "megalign", "--to", "dream", "--input",
                tmp_path / "ml", "--output", tmp_path / "dream"])
    exported = load_file(tmp_path / "dream" / "model.safetensors")
    assert set(exported) == dream_tensor_names(2, False)
    for name, tensor in original.state_dict().items():
        assert torch.equal(exported[name][:VOCAB] if "embed" in name or "lm_head" in name
                           else exported[name], tensor), name
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.save(tokens, tmp_path / "tokens.pt")
    run_python([WORKERS / "qwen2_reading.py", "--export", tmp_path / "dream", "--tokens",
                tmp_path / "tokens.pt", "--out", tmp_path / "qwen2.pt", "--original",
                tmp_path / "hf"])
    report = transformers_alone(tmp_path / "dream", tmp_path / "tokens.pt", [], tmp_path / "d.json")
    reading, first = torch.load(tmp_path / "qwen2.pt"), torch.load(tmp_path / "qwen2.pt.original")
    assert (reading[..., :VOCAB] - first).abs().max() <= 1e-5
    assert (report["logits"][..., :VOCAB] - first).abs().max() <= 1e-5


def test_a_converted_model_moves_and_samples_as_the_step_0_student(tmp_path):
    """megalign-generate and megalign-eval on megalign-convert's output (the untrained student,
    a mixture of experts) after the directory was moved: nothing in it names the machine's
    paths."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megalign.checkpoint import read_meta

    words = ["</s>", "<pad>"] + [f"w{i}" for i in range(50)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny_hf_model("qwen3_moe").save_pretrained(tmp_path / "hf")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>",
                            pad_token="<pad>").save_pretrained(tmp_path / "hf")
    run_python(["-m", "megalign.cli.convert", "--from", "hf", "--to", "megalign", "--input",
                tmp_path / "hf", "--output", tmp_path / "made_here"])
    shutil.copytree(tmp_path / "made_here", tmp_path / "moved")
    shutil.rmtree(tmp_path / "made_here")
    recorded = (tmp_path / "moved" / "megalign.yaml").read_text() + json.dumps(
        read_meta(str(tmp_path / "moved")))
    assert str(tmp_path) not in recorded and "made_here" not in recorded
    out = run_python(["-m", "megalign.cli.generate", "--checkpoint", tmp_path / "moved", "--prompt",
                      "w1 w2 w3", "--gen-length", "8", "--ar"])
    sample = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(sample["completion_ids"]) == 8 and "ar_completion" in sample
    # exported, the step-0 student is the one megalign-generate samples (its mask row
    # initialised as training initialises it): the same tokens under transformers alone
    run_python(["-m", "megalign.cli.convert", "--from", "megalign", "--to", "hf", "--input",
                tmp_path / "moved", "--output", tmp_path / "export"])
    tokens = torch.tensor([[3, 4, 5] + [VOCAB] * 8])  # w1 w2 w3 and mask tokens
    torch.save(tokens, tmp_path / "tokens.pt")
    run_python([WORKERS / "student_logits.py", "--checkpoint", tmp_path / "moved", "--tokens",
                tmp_path / "tokens.pt", "--out", tmp_path / "megalign_logits.pt"])
    job = {"model": str(tmp_path / "export"), "tokens": str(tmp_path / "tokens.pt"),
           "prompts": [[3, 4, 5]], "options": [{"max_new_tokens": 8}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_python([WORKERS / "hf_diffusion.py", "--job", tmp_path / "job.json", "--out",
                tmp_path / "hf.json"])
    exported = torch.load(tmp_path / "hf.json.logits.pt")[..., :len(words)]
    assert (exported - torch.load(tmp_path / "megalign_logits.pt")[..., :len(words)]).abs().max() \
        <= 1e-4
    assert json.loads((tmp_path / "hf.json").read_text())["alone"] == [[sample["completion_ids"]]]
    from megalign.data.preprocess import preprocess

    generator = torch.Generator().manual_seed(0)
    with open(tmp_path / "words.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(200):
            ids = torch.randint(2, len(words), (200,), generator=generator).tolist()
            handle.write(json.dumps({"text": " ".join(words[i] for i in ids)}) + "\n")
    data = preprocess([str(tmp_path / "words.jsonl")], str(tmp_path / "moved" / "tokenizer"),
                      str(tmp_path / "words"), "text", True)
    scored = run_python(["-m", "megalign.cli.evaluate", "--checkpoint", tmp_path / "moved",
                         "--data", data, "--samples", "4", "--t-grid", "1", "--ar",
                         "--generate", "2", "--gen-length", "8"])
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    assert result["diffusion_nelbo_per_token"] > 0 and result["ar_nll_per_token"] > 0
    assert result["gen_tokens"] > 0 and result["gen_ppl"] > 1
