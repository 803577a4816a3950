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

# Imports inside functions are deliberate here: transformers, safetensors and the export's modeling
# file are optional (the hf extra) and imported only by the conversions that use them.

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
from dataclasses import asdict, replace
from typing import Optional

import torch
import yaml
from megatron.core import parallel_state

from megalign import distributed
from megalign.checkpoint import load_checkpoint, resolve, save_weights
from megalign.config import (
    CONFIG_DIR,
    Config,
    DiffusionConfig,
    ModelConfig,
    ParallelConfig,
    check_vocabulary,
    to_dict,
)
from megalign.convert.gguf import complete_gguf_config
from megalign.convert.hf import (
    ConversionError,
    check_layout,
    hf_to_megatron,
    megatron_to_hf,
    model_config_from_hf,
)
from megalign.convert.tokenizer import sentencepiece_as_transformers
from megalign.data.tokenizer import MASK_CANDIDATES, build_tokenizer
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion import decoding
from megalign.diffusion.objective import block_diffusion
from megalign.errors import ConfigError, first_line, one_line
from megalign.loading import recorded_config, start_step0_student
from megalign.model.gather import full_tensors
from megalign.model.gpt import ModelBuild, build_chunks, ffn_hidden_size, moe_ffn_hidden_size

MEGALIGN_YAML = "megalign.yaml"
# what a Hugging Face directory holds when it has a tokenizer of its own (without any,
# AutoTokenizer builds the model type's default tokenizer with an empty vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "spiece.model", "vocab.txt")


def _single_process_group(cfg: Config) -> None:
    """TP = PP = 1 process groups for building whole models; a process that already has them
    (a script that sampled first, then exports) keeps its own."""
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == 1
                and parallel_state.get_pipeline_model_parallel_world_size() == 1):
            return
        raise ConversionError("conversions build whole models: run them in a process without "
                              "tensor or pipeline parallel groups")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    distributed.initialize(distributed.LaunchEnv(0, 1, 0), 1, 1, cfg.seed)


def _build_single_process_model(cfg: Config):

    _single_process_group(cfg)
    return build_chunks(ModelBuild.of(cfg, causal=True, params_dtype=torch.float32),
                        cfg.model.padded_vocab_size)


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


def stored_shapes(source: str) -> dict[str, tuple]:
    """Name -> shape of every tensor in the directory's safetensors files, read from their
    headers (no tensor is loaded); empty when the weights are in another format."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(glob.glob(os.path.join(source, "*.safetensors"))):
        try:
            with safe_open(file, "pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as err:  # safetensors' SafetensorError, a truncated header
            raise ConversionError(f"'{file}' is not a readable safetensors file "
                                  f"({first_line(err)}); download or copy it again") from None
    return shapes


def check_config_fits_weights(source: str, hf_config) -> None:
    """config.json against the shapes of the stored weights, before any weight is allocated: a
    damaged or mismatched config.json is refused by name instead of building a model of the
    size it claims."""
    from transformers import AutoModelForCausalLM

    stored = stored_shapes(source)
    if not stored:
        return
    layers = {int(m.group(1)) for m in map(re.compile(r"(?:layers|h)\.(\d+)\.").search, stored)
              if m is not None}
    claimed = model_config_from_hf(hf_config)["num_layers"]
    if layers and claimed != len(layers):
        raise ConversionError(f"'{source}/config.json' describes {claimed} layers, its weights "
                              f"hold {len(layers)}; the config does not belong to these weights")
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {name: tuple(tensor.shape) for name, tensor in
                    AutoModelForCausalLM.from_config(hf_config).state_dict().items()}
    wrong = [f"{name}: config {expected[key]} vs weights {shape}"
             for name, shape in stored.items()
             for key in [name if name in expected else f"transformer.{name}"]
             if key in expected and expected[key] != shape]
    if wrong:
        raise ConversionError(f"'{source}/config.json' does not describe its weights "
                              f"({'; '.join(wrong[:3])})")


def hf_to_megalign(source: str, output: str, gguf_file: Optional[str] = None, tp: int = 1,
                   pp: int = 1, make_vocab_size_divisible_by: int = 128,
                   trust_remote_code: bool = False) -> str:
    """Convert the HF causal LM in ``source`` (a directory; ``gguf_file`` inside it) into a
    megalign checkpoint ``output`` trainable with ``tp`` x ``pp``; returns its path."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging


    hf_logging.disable_progress_bar()  # megalign-convert says what it wrote, in one line
    hf_logging.set_verbosity_error()  # its loading report: missing weights are refused below
    load_kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        load_kwargs["gguf_file"] = gguf_file
    if not os.path.isdir(source):
        raise ConversionError(f"--input '{source}' is not a directory")
    try:
        hf_config = AutoConfig.from_pretrained(source, **load_kwargs)
        if gguf_file:  # the fields transformers' GGUF loader skips
            hf_config = complete_gguf_config(os.path.join(source, gguf_file), hf_config)
        try:
            model_config_from_hf(hf_config)  # an unsupported architecture is refused first
        except ConversionError as err:
            raise ConversionError(f"'{source}': {err}") from None
        if not gguf_file:
            check_config_fits_weights(source, hf_config)
        hf_model, loading = AutoModelForCausalLM.from_pretrained(
            source, config=hf_config, dtype=torch.float32, output_loading_info=True,
            **load_kwargs)
        if loading.get("missing_keys") or loading.get("mismatched_keys"):
            described = (f"'{os.path.join(source, gguf_file)}' lacks weights its metadata"
                         if gguf_file else f"'{source}' lacks weights its config.json")
            raise ConversionError(
                f"{described} asks for "
                f"({sorted(loading.get('missing_keys') or loading['mismatched_keys'])[:3]}); "
                "transformers would initialise them at random")
    except ConversionError:
        raise
    except Exception as err:  # what transformers raises for a directory it cannot load
        raise ConversionError(f"--input '{source}': transformers cannot load it "
                              f"({first_line(err)})") from None
    model = model_config_from_hf(hf_model.config)
    check_layout(model, tp, pp)
    rows = hf_model.get_input_embeddings().weight.shape[0]

    mask_id = rows  # the first padded row, unless the tokenizer has a mask token
    tokenizer = None
    if gguf_file or any(os.path.isfile(os.path.join(source, name)) for name in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **load_kwargs)
        except (OSError, ValueError, TypeError):
            pass  # files transformers cannot build a tokenizer from: treated as weights only
    if tokenizer is not None and len(tokenizer) > rows:
        print(f"megalign-convert: the tokenizer in '{source}' has {len(tokenizer)} tokens for "
              f"{rows} embedding rows; not kept (train with data.tokenizer=...)", file=sys.stderr)
        tokenizer = None
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        mask_id = next((vocab[t] for t in MASK_CANDIDATES if t in vocab), mask_id)
    multiple = make_vocab_size_divisible_by
    padded = -(-max(rows, mask_id + 1) // multiple) * multiple

    cfg = Config(
        model=ModelConfig(**model, padded_vocab_size=padded, make_vocab_size_divisible_by=multiple,
                          seq_length=min(ModelConfig.seq_length, model["max_position_embeddings"])),
        diffusion=DiffusionConfig(mask_token_id=mask_id))
    tensors = hf_to_megatron(hf_model.state_dict(), model, padded)
    del hf_model
    chunks = _build_single_process_model(cfg)
    _load_exact(chunks[0], tensors)
    output = os.path.abspath(output)
    if tokenizer is not None:  # recorded relative to the checkpoint: the directory can move
        cfg = replace(cfg, data=replace(cfg.data, tokenizer=os.path.join(CONFIG_DIR, "tokenizer")))
    sections = {
        "model": {**model, "padded_vocab_size": padded, "init_checkpoint": CONFIG_DIR},
        "diffusion": {"mask_token_id": mask_id},
    }

    def write(directory: str) -> None:
        save_weights(directory, chunks, meta={"config": to_dict(cfg), "hf_vocab_size": rows,
                                              "source": os.path.basename(os.path.normpath(source))})
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
            # the document separator by the rule of megalign/data/tokenizer.py, recorded so that
            # training keeps it and preprocessing can be checked against it
            eod = build_tokenizer(os.path.join(directory, "tokenizer"))
            sections["data"] = {"tokenizer": cfg.data.tokenizer, "eod_token": eod.eod_token}
            print(f"megalign-convert: documents end with {eod.eod_token!r} (id {eod.eod}; "
                  "data.eod_token)", file=sys.stderr)
        with open(os.path.join(directory, MEGALIGN_YAML), "w", encoding="utf-8") as handle:
            yaml.safe_dump(sections, handle, sort_keys=False)

    write_directory_atomically(output, write)
    return output


def megalign_to_hf(source: str, output: str) -> str:
    """The megalign checkpoint ``source`` as a self-contained transformers directory ``output``
    (see ``export_diffusion_model``); returns its path."""
    path = resolve(source)
    cfg, meta, tokenizer = export_config(path)
    refuse_foreign_output(output, "modeling_megalign.py", "a megalign export")
    hf_state = student_for_export(path, cfg, meta, tokenizer)
    write_directory_atomically(output, lambda directory: export_diffusion_model(
        cfg, meta, hf_state, tokenizer, directory))
    return output


def export_config(path: str) -> tuple[Config, dict, Optional[object]]:
    """The config a checkpoint was trained with, at one process, with the vocabulary sizes and
    mask row as training resolved them; its metadata; and its tokenizer (None if it records
    none)."""
    cfg, meta = recorded_config(path)
    cfg = replace(cfg, parallel=ParallelConfig())
    tokenizer = None
    try:
        if cfg.data.tokenizer:
            tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
            check_vocabulary(cfg, tokenizer.vocab_size, tokenizer.mask)
            vocab = Vocabulary.of(cfg, tokenizer)
            cfg = replace(cfg, model=replace(cfg.model, padded_vocab_size=vocab.padded),
                          diffusion=replace(cfg.diffusion, mask_token_id=vocab.mask))
        elif cfg.model.padded_vocab_size is None:
            raise ConversionError("it records neither a tokenizer nor a padded vocabulary size "
                                  "(model.padded_vocab_size)")
    except (ConfigError, OSError, ValueError) as err:
        raise ConversionError(f"checkpoint '{path}': {one_line(err)}") from None
    return cfg, meta, tokenizer


def student_for_export(path: str, cfg: Config, meta: dict, tokenizer) -> dict:
    """The student's weights under Hugging Face names, from the checkpoint at ``path`` with its
    ``export_config``; a step-0 student's mask row initialised as training initialises it."""
    chunks = _build_single_process_model(cfg)
    load_checkpoint(path, chunks)
    if tokenizer is not None:
        start_step0_student(chunks, cfg, meta, Vocabulary.of(cfg, tokenizer))
    m = cfg.model
    return megatron_to_hf(full_tensors(chunks, "param"), asdict(m), m.padded_vocab_size)


def refuse_foreign_output(output: str, marker: str, kind: str) -> None:
    """An ``output`` that exists is replaced only when it is an earlier export of the same
    ``kind`` (it holds the file ``marker``)."""
    if os.path.isdir(output) and os.listdir(output) and not os.path.isfile(
            os.path.join(output, marker)):
        raise ConversionError(f"--output '{output}' exists and is not {kind}; give a new "
                              "directory")


def write_directory_atomically(output: str, write) -> None:
    """``write(directory)`` into a temporary sibling renamed to ``output`` (replacing an earlier
    one) once complete, so a failure never leaves a partial directory that looks whole."""
    temp = f"{os.path.normpath(output)}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    try:
        write(temp)
        if os.path.isdir(output):
            shutil.rmtree(output)
        os.replace(temp, output)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def write_modeling_files(output: str) -> None:
    """The export's code: megalign's modeling file and, as its sibling ``decoding.py``, the
    library's decoding rules themselves (a torch-only module), so both decode alike."""
    from megalign.convert import modeling_megalign

    shutil.copy(modeling_megalign.__file__, os.path.join(output, "modeling_megalign.py"))
    shutil.copy(decoding.__file__, os.path.join(output, "decoding.py"))


def export_diffusion_model(cfg: Config, meta: dict, hf_state: dict, tokenizer,
                           output: str) -> None:
    """Weights (safetensors), config, megalign's modeling file with ``diffusion_generate``,
    generation defaults, tokenizer and a model card: loads with transformers alone
    (``AutoModel.from_pretrained(output, trust_remote_code=True)``)."""
    from transformers.utils import logging as hf_logging

    from megalign.convert import modeling_megalign

    m = cfg.model
    config = modeling_megalign.MegalignDiffusionConfig(
        arch=m.arch, vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size,
        intermediate_size=ffn_hidden_size(m), num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.query_groups,
        head_dim=m.kv_channels, qk_norm=m.qk_norm, rope_scaling_factor=m.rope_scaling_factor,
        num_experts=m.num_experts, moe_topk=m.moe_topk,
        moe_intermediate_size=moe_ffn_hidden_size(m),
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_shared_intermediate_size=m.moe_shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=m.moe_shared_expert_gate,
        max_position_embeddings=m.max_position_embeddings or m.seq_length,
        norm_epsilon=m.norm_epsilon, rope_theta=float(m.rotary_base), qkv_bias=m.qkv_bias,
        tie_word_embeddings=m.tie_embeddings, mask_token_id=cfg.diffusion.mask_token_id,
        shift=cfg.diffusion.shift, document_attention=m.document_attention,
        diffusion_block_length=(cfg.diffusion.block_length
                                if block_diffusion(cfg.diffusion, m.seq_length) else None),
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
    hf_logging.disable_progress_bar()  # megalign-convert says what it wrote, in one line
    hf_model.save_pretrained(output, safe_serialization=True)
    write_modeling_files(output)
    defaults = decoding.SamplerConfig()
    if config.diffusion_block_length:
        defaults = decoding.for_block_diffusion(defaults, config.diffusion_block_length)
    with open(os.path.join(output, "generation_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"mask_token_id": config.mask_token_id, "eos_token_id": config.eos_token_id,
                   "pad_token_id": config.pad_token_id, "max_new_tokens": defaults.gen_length,
                   "diffusion": {"steps": "max_new_tokens", "block_length": defaults.block_length,
                                 "temperature": defaults.temperature, "top_k": defaults.top_k,
                                 "top_p": defaults.top_p, "confidence": defaults.confidence,
                                 "unmasking": defaults.unmasking, "seed": defaults.seed,
                                 "threshold": defaults.threshold, "cache": defaults.cache,
                                 "dual_cache": defaults.dual_cache,
                                 "cache_refresh": defaults.cache_refresh,
                                 "suffix": defaults.suffix}},
                  handle, indent=1)
    source = cfg.data.tokenizer
    if source and os.path.isdir(source):
        for name in os.listdir(source):
            shutil.copy(os.path.join(source, name), output)
    elif source:
        transformers_tokenizer(source, tokenizer).save_pretrained(output)
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(model_card(cfg, meta, tokenizer is not None))


def transformers_tokenizer(source: str, tokenizer):
    """megalign's tokenizer ``tokenizer`` (built from ``source``: a Hugging Face directory, taken
    as it is, or a SentencePiece ``.model`` or tokenizer.json file, given the end-of-document
    token as their eos) as a transformers tokenizer."""
    if os.path.isdir(source):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if source.endswith(".model"):
        return sentencepiece_as_transformers(source, tokenizer.eod, tokenizer.pad, tokenizer.mask)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=source, eos_token=tokenizer.eod_token)


def training_mode_lines(cfg: Config) -> list[str]:
    """The model card's lines on how training departed from full-sequence masked diffusion."""
    d, lines = cfg.diffusion, []
    if d.block_length:
        lines.append(f"- block diffusion, blocks of {d.block_length}: decoded block by block with "
                     "block-causal attention (megalign-generate and `diffusion_generate` below "
                     "both do; the key/value cache is then exact)")
    if d.anneal_iters:
        lines.append(f"- attention annealed from causal to bidirectional over the first "
                     f"{d.anneal_iters} steps")
    if cfg.data.sft:
        lines.append("- diffusion SFT: only response tokens noised and supervised"
                     + (f", starting from `{cfg.model.student_checkpoint}`"
                        if cfg.model.student_checkpoint else ""))
    if d.ar_loss_weight:
        lines.append(f"- hybrid objective: the student's own next-token loss on the clean "
                     f"sequence (weight {d.ar_loss_weight:g}) beside the diffusion loss (weight "
                     f"{d.dlm_loss_weight:g}); it samples as a plain diffusion model")
    if cfg.align.kd_weight:
        lines.append(f"- distilled from the AR teacher's next-token distributions (KL, weight "
                     f"{cfg.align.kd_weight:g})")
    return lines


def model_card(cfg: Config, meta: dict, has_tokenizer: bool) -> str:
    """What the model is, how it was made (base model, recipe), its held-out metrics when the
    run's validation.jsonl is at hand, and how to sample it."""
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
        ("# the tokenizer needs no remote code (without False, transformers asks: config.json\n"
         "# names the model's code)\n"
         "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)\n"
         "ids = model.diffusion_generate(tokenizer('In the beginning', return_tensors='pt')"
         ".input_ids, max_new_tokens=32)\nprint(tokenizer.decode(ids[0]))" if has_tokenizer else
         "ids = model.diffusion_generate(prompt_ids, max_new_tokens=32)"),
        "```", "",
        "`diffusion_generate` takes megalign-generate's options (`steps`, `block_length`, "
        "`temperature`, `top_k`, `top_p`, `confidence`, `unmasking`, `seed`, `threshold`, "
        "`cache`, `dual_cache`, `cache_refresh`, `suffix`) with its defaults: blocks of 8 "
        "tokens, one token per step, greedy, no cache, stop at the end-of-document token. "
        "`dual_cache=True, threshold=0.9` is the fast setting; loaded with "
        "`dtype=torch.bfloat16` the model decodes in bfloat16, as `megalign-generate --bf16` does.",
        "",
    ]
    return "\n".join(lines)
