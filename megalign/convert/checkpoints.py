"""Checkpoint conversion between Hugging Face and megalign (megalign-convert's library).

HF -> megalign writes a weights-only distributed checkpoint (torch_dist) in one process; its
tensors carry global keys, so it loads into any TP/PP layout. Next to it: ``megalign.yaml`` (the
model/diffusion/data config sections to train from it: ``--config megalign.yaml --config
run.yaml``) and the tokenizer, named relative to the directory (``${config_dir}``), so it can
move. The vocabulary is padded to a multiple of 128 with room for the mask token.

megalign -> HF writes a self-contained transformers directory: safetensors weights, a config,
megalign's modeling file (``modeling_megalign.py``: the bidirectional network and
``diffusion_generate``, the same decoding rules as megalign-generate), ``generation_config.json``,
the tokenizer and a model card; it loads with ``AutoModel.from_pretrained(DIR,
trust_remote_code=True)`` and needs only torch and transformers. Remote code is never run unless
``trust_remote_code`` is asked for.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import torch
import yaml

from megalign.config import CONFIG_DIR, Config, config_from_dict, to_dict
from megalign.convert.hf import (
    ConversionError,
    check_layout,
    hf_to_megatron,
    megatron_to_hf,
    model_config_from_hf,
)

MEGALIGN_YAML = "megalign.yaml"


def _single_process_group(cfg: Config) -> None:
    from megalign import distributed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    distributed.initialize(distributed.LaunchEnv(0, 1, 0), 1, 1, cfg.seed)


def _build_single_process_model(cfg: Config):
    from megalign.model.gpt import build_chunks

    _single_process_group(cfg)
    return build_chunks(cfg, cfg.model.padded_vocab_size, causal=True, params_dtype=torch.float32)


def _load_exact(chunk, tensors: dict) -> None:
    """Load every converted tensor; list missing/unexpected names and shape mismatches."""
    expected = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape)
    if missing or unexpected or shapes:
        raise ConversionError(
            "tensors do not match the model:"
            + (f"\n  missing: {missing}" if missing else "")
            + (f"\n  unexpected: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {shapes}" if shapes else "")
        )
    chunk.load_state_dict(tensors, strict=False)


def hf_to_megalign(source: str, output: str, gguf_file: Optional[str] = None, tp: int = 1,
                   pp: int = 1, make_vocab_size_divisible_by: int = 128,
                   trust_remote_code: bool = False) -> str:
    """Convert the HF causal LM in ``source`` (a directory; ``gguf_file`` inside it) into a
    megalign checkpoint ``output`` trainable with ``tp`` x ``pp``; returns its path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megalign.checkpoint import save_weights
    from megalign.data.tokenizer import MASK_CANDIDATES, build_tokenizer

    load_kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        load_kwargs["gguf_file"] = gguf_file
    if not os.path.isdir(source):
        raise ConversionError(f"--input '{source}' is not a directory")
    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **load_kwargs)
    model = model_config_from_hf(hf_model.config)
    check_layout(model, tp, pp)
    rows = hf_model.get_input_embeddings().weight.shape[0]

    tokenizer_dir = os.path.join(output, "tokenizer")
    mask_id = rows  # the first padded row, unless the tokenizer has a mask token
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **load_kwargs)
    except (OSError, ValueError, TypeError):
        pass  # a weights-only directory
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        mask_id = next((vocab[t] for t in MASK_CANDIDATES if t in vocab), mask_id)
    multiple = make_vocab_size_divisible_by
    padded = -(-max(rows, mask_id + 1) // multiple) * multiple

    cfg = Config()
    for key, value in model.items():
        setattr(cfg.model, key, value)
    cfg.model.padded_vocab_size = padded
    cfg.model.make_vocab_size_divisible_by = multiple
    cfg.model.seq_length = min(cfg.model.seq_length, model["max_position_embeddings"])
    cfg.diffusion.mask_token_id = mask_id
    tensors = hf_to_megatron(hf_model.state_dict(), model, padded)
    del hf_model
    chunks = _build_single_process_model(cfg)
    _load_exact(chunks[0], tensors)
    output = os.path.abspath(output)
    if tokenizer is not None:  # recorded relative to the checkpoint: the directory can move
        cfg.data.tokenizer = os.path.join(CONFIG_DIR, "tokenizer")
    save_weights(output, chunks, meta={"config": to_dict(cfg), "hf_vocab_size": rows,
                                       "source": os.path.basename(os.path.normpath(source))})
    sections = {
        "model": {**model, "padded_vocab_size": padded, "init_checkpoint": CONFIG_DIR},
        "diffusion": {"mask_token_id": mask_id},
    }
    if tokenizer is not None:
        tokenizer.save_pretrained(tokenizer_dir)
        # the document separator by the rule of megalign/data/tokenizer.py, recorded so that
        # training keeps it and preprocessing can be checked against it
        eod = build_tokenizer(tokenizer_dir)
        sections["data"] = {"tokenizer": cfg.data.tokenizer, "eod_token": eod.eod_token}
        print(f"megalign-convert: documents end with {eod.eod_token!r} (id {eod.eod}; "
              "data.eod_token)", file=sys.stderr)
    with open(os.path.join(output, MEGALIGN_YAML), "w", encoding="utf-8") as handle:
        yaml.safe_dump(sections, handle, sort_keys=False)
    return output


def megalign_to_hf(source: str, output: str) -> str:
    """The megalign checkpoint ``source`` as a self-contained transformers directory ``output``
    (see ``export_diffusion_model``); returns its path."""
    from megalign.checkpoint import load_checkpoint, read_meta, resolve
    from megalign.model.gather import full_tensors

    path = resolve(source)
    meta = read_meta(path)
    if "config" not in meta:
        raise ConversionError(f"checkpoint '{path}' records no model config")
    cfg = config_from_dict(meta["config"], path)
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    cfg.parallel.virtual_pipeline_model_parallel_size = None
    cfg.parallel.sequence_parallel = False
    m = cfg.model
    if m.padded_vocab_size is None:
        raise ConversionError(f"checkpoint '{path}' records no padded vocabulary size")
    chunks = _build_single_process_model(cfg)
    load_checkpoint(path, chunks)
    model = {k: getattr(m, k) for k in ("arch", "num_layers", "num_attention_heads",
                                         "num_query_groups", "qkv_bias", "tie_embeddings")}
    hf_state = megatron_to_hf(full_tensors(chunks, "param"), model, m.padded_vocab_size)
    export_diffusion_model(cfg, meta, hf_state, output)
    return output


def export_diffusion_model(cfg: Config, meta: dict, hf_state: dict, output: str) -> None:
    """Weights (safetensors), config, megalign's modeling file with ``diffusion_generate``,
    generation defaults, tokenizer and a model card: loads with transformers alone
    (``AutoModel.from_pretrained(output, trust_remote_code=True)``)."""
    import json

    from megalign.convert import modeling_megalign
    from megalign.data.tokenizer import build_tokenizer
    from megalign.diffusion.sampler import SamplerConfig
    from megalign.model.gpt import ffn_hidden_size

    m = cfg.model
    tokenizer = build_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else None
    config = modeling_megalign.MegalignDiffusionConfig(
        arch=m.arch, vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size,
        intermediate_size=ffn_hidden_size(cfg), num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        norm_epsilon=m.norm_epsilon, rope_theta=float(m.rotary_base), qkv_bias=m.qkv_bias,
        tie_word_embeddings=m.tie_embeddings, mask_token_id=cfg.diffusion.mask_token_id,
        shift=cfg.diffusion.shift, document_attention=m.document_attention,
        sample_vocab_size=tokenizer.vocab_size if tokenizer else m.padded_vocab_size,
        eos_token_id=tokenizer.eod if tokenizer else None,
        pad_token_id=tokenizer.pad if tokenizer else None)
    config.auto_map = {"AutoConfig": "modeling_megalign.MegalignDiffusionConfig",
                       "AutoModel": "modeling_megalign.MegalignForDiffusionLM"}
    config.architectures = ["MegalignForDiffusionLM"]
    hf_model = modeling_megalign.MegalignForDiffusionLM(config)
    if m.tie_embeddings:
        hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    missing, unexpected = hf_model.load_state_dict(hf_state, strict=False)
    if missing or unexpected:
        raise ConversionError(f"HF model mismatch: missing {missing}, unexpected {unexpected}")
    os.makedirs(output, exist_ok=True)
    hf_model.save_pretrained(output, safe_serialization=True)
    shutil.copy(modeling_megalign.__file__, os.path.join(output, "modeling_megalign.py"))
    defaults = SamplerConfig()
    with open(os.path.join(output, "generation_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"mask_token_id": config.mask_token_id, "eos_token_id": config.eos_token_id,
                   "pad_token_id": config.pad_token_id, "max_new_tokens": defaults.gen_length,
                   "diffusion": {"steps": "max_new_tokens", "block_length": defaults.block_length,
                                 "temperature": defaults.temperature, "top_k": defaults.top_k,
                                 "top_p": defaults.top_p, "confidence": defaults.confidence,
                                 "unmasking": defaults.unmasking, "seed": defaults.seed}},
                  handle, indent=1)
    source = cfg.data.tokenizer
    if source and os.path.isdir(source):
        for name in os.listdir(source):
            shutil.copy(os.path.join(source, name), output)
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(model_card(cfg, meta, bool(source and os.path.isdir(source))))


def training_mode_lines(cfg: Config) -> list[str]:
    """The model card's lines on how training departed from full-sequence masked diffusion."""
    d, lines = cfg.diffusion, []
    if d.block_length:
        lines.append(f"- block diffusion, blocks of {d.block_length}: decode block by block with "
                     "block-causal attention (megalign-generate does; `diffusion_generate` "
                     "below attends bidirectionally, which this model was not trained for)")
    if d.anneal_iters:
        lines.append(f"- attention annealed from causal to bidirectional over the first "
                     f"{d.anneal_iters} steps")
    if cfg.data.sft:
        lines.append("- diffusion SFT: only response tokens noised and supervised"
                     + (f", starting from `{cfg.model.student_checkpoint}`"
                        if cfg.model.student_checkpoint else ""))
    return lines


def model_card(cfg: Config, meta: dict, has_tokenizer: bool) -> str:
    """What the model is, how it was made (base model, recipe), its held-out metrics when the
    run's validation.jsonl is at hand, and how to sample it."""
    import json

    a, o, d = cfg.align, cfg.optimizer, cfg.data
    iterations = meta.get("iteration", 0)
    base = meta.get("ar_checkpoint") or meta.get("source") or "an AR model"
    lines = [
        "# megalign masked diffusion LM", "",
        f"A bidirectional masked diffusion language model converted by megalign from the "
        f"autoregressive model `{os.path.basename(os.path.normpath(str(base)))}` "
        f"({cfg.model.arch}, {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}).", "",
        "## Recipe", "",
        f"- REPR-ALIGN weight λ = {a.weight:g}" + (" (plain masked diffusion)" if not a.weight
                                                  else " (per-layer cosine alignment to the AR "
                                                       "teacher)"),
        f"- frozen parameters: {', '.join(o.freeze) if o.freeze else 'none'}",
        f"- optimizer steps: {iterations}; tokens seen: "
        f"{iterations * d.global_batch_size * cfg.model.seq_length:,}",
        f"- learning rate {o.lr:g} ({cfg.schedule.lr_decay_style} after "
        f"{cfg.schedule.warmup_iters} warm-up steps), global batch {d.global_batch_size} x "
        f"{cfg.model.seq_length} tokens",
        f"- mask token id {cfg.diffusion.mask_token_id}; position i predicts token i+1: "
        f"{cfg.diffusion.shift}",
        *training_mode_lines(cfg), "",
    ]
    validation = os.path.join(cfg.logging.run_dir, "validation.jsonl")
    if iterations and os.path.isfile(validation):
        with open(validation, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        last = next((r for r in reversed(records) if r.get("iteration") == iterations), None)
        if last:
            lines += ["## Held-out metrics at the last step", ""]
            lines += [f"- {key}: {value:.4g}" for key, value in last.items()
                      if isinstance(value, float)] + [""]
    lines += [
        "## Sampling", "",
        "```python",
        "from transformers import AutoModel" + (", AutoTokenizer" if has_tokenizer else ""),
        "model = AutoModel.from_pretrained(path, trust_remote_code=True)",
        ("tokenizer = AutoTokenizer.from_pretrained(path)\n"
         "ids = model.diffusion_generate(tokenizer('In the beginning', return_tensors='pt')"
         ".input_ids, max_new_tokens=32)\nprint(tokenizer.decode(ids[0]))" if has_tokenizer else
         "ids = model.diffusion_generate(prompt_ids, max_new_tokens=32)"),
        "```", "",
        "`diffusion_generate` takes megalign-generate's options (`steps`, `block_length`, "
        "`temperature`, `top_k`, `top_p`, `confidence`, `unmasking`, `seed`) with its defaults: "
        "blocks of 8 tokens, one token per step, greedy, stop at the end-of-document token.", "",
    ]
    return "\n".join(lines)
