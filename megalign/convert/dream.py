"""megalign -> Dream's format (``megalign-convert --from megalign --to dream``).

Dream (Dream-org's 7B, converted from Qwen2.5) is the published format of megalign's kind of
model: AR-initialised, masked diffusion, the AR shift kept, attention bidirectional. Dream's own
code, Fast-dLLM v1, ZHZisZZ/dllm, Diffulex and llama.cpp's converter read it, keyed on
``model_type: Dream`` and Qwen2's tensor names. The export keeps the student's weights unchanged
(a Llama-family student without q/k/v biases gets zero ones), writes Dream's config keys, a
tokenizer that declares the mask token and ``generation_config.json`` (Dream's loader refuses a
directory without one), and ships megalign's own modeling files under Dream's class names
(``configuration_dream.py``, ``modeling_dream.py``, with ``modeling_megalign.py`` and
``decoding.py`` beside them): nothing is taken from Dream's code. What Dream's network cannot
hold is refused before anything is read or written (``dream_refusal``).
"""

# Imports inside functions are deliberate here: transformers and safetensors are optional (the
# hf extra) and imported only when a model is exported.

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megalign.checkpoint import resolve
from megalign.config import Config
from megalign.convert.checkpoints import (
    export_config,
    model_card,
    refuse_foreign_output,
    student_for_export,
    transformers_tokenizer,
    write_directory_atomically,
)
from megalign.convert.hf import LLAMA3_ROPE
from megalign.diffusion import decoding
from megalign.diffusion.objective import block_diffusion
from megalign.errors import ConversionError
from megalign.model.gpt import ffn_hidden_size

MODELING_FILES = ("configuration_dream.py", "modeling_dream.py", "modeling_megalign.py")
MASK_TOKEN = "<|mask|>"  # the mask token's text where the tokenizer has none (Dream's)


def network_refusal(cfg: Config, name: str) -> Optional[str]:
    """What of this student the Qwen2 network of ``name``'s format (Dream's, Fast-dLLM v2's)
    cannot hold, or None: it is RMSNorm, SwiGLU, rotary positions, q/k/v biases, head size =
    hidden / heads, no norm on queries and keys, dense."""
    m = cfg.model
    if m.arch == "gpt2":
        return f"GPT-2's LayerNorm, GeLU and learned positions ({name}'s network is Qwen2's)"
    if m.num_experts:
        return f"a mixture of experts ({name}'s MLPs are dense)"
    if m.qk_norm:
        return f"RMSNorm on queries and keys (Qwen3's; {name} has none)"
    if m.kv_channels != m.hidden_size // m.num_attention_heads:
        return (f"a head size of {m.kv_channels} ({name}'s is hidden / heads = "
                f"{m.hidden_size // m.num_attention_heads})")
    return None


def dream_refusal(cfg: Config) -> Optional[str]:
    """Why Dream's format cannot hold this student, or None. Dream's network is Qwen2's
    (``network_refusal``), bidirectional, and its decoding shifts logits right by one."""
    m, d = cfg.model, cfg.diffusion
    network = network_refusal(cfg, "Dream")
    if network:
        return network
    if block_diffusion(d, m.seq_length):
        return (f"block diffusion (blocks of {d.block_length}): Dream decodes with bidirectional "
                "attention, not block-causal")
    if not d.shift:
        return ("a student trained without the AR shift (diffusion.shift=false): Dream's decoding "
                "reads position i's logits for token i + 1")
    return None


def dream_config(cfg: Config, tokenizer) -> dict:
    """config.json: Dream's keys (those of Dream-org's published checkpoints) with this student's
    values, and megalign's ``sample_vocab_size``."""
    import transformers

    m = cfg.model
    rope_scaling = None
    if m.rope_scaling_factor is not None:
        rope_scaling = {"rope_type": "llama3", "factor": m.rope_scaling_factor, **LLAMA3_ROPE}
    eos = tokenizer.eod if tokenizer else None
    return {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                     "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": eos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": m.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": ffn_hidden_size(m),
        "mask_token_id": cfg.diffusion.mask_token_id,
        "max_position_embeddings": m.max_position_embeddings or m.seq_length,
        "max_window_layers": m.num_layers,
        "model_type": "Dream",
        "num_attention_heads": m.num_attention_heads,
        "num_hidden_layers": m.num_layers,
        "num_key_value_heads": m.query_groups,
        "pad_token_id": tokenizer.pad if tokenizer else None,
        "rms_norm_eps": m.norm_epsilon,
        "rope_scaling": rope_scaling,
        "rope_theta": float(m.rotary_base),
        "sample_vocab_size": tokenizer.vocab_size if tokenizer else m.padded_vocab_size,
        "sliding_window": None,
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": "float32",
        "transformers_version": transformers.__version__,
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": m.padded_vocab_size,
    }


def megalign_to_dream(source: str, output: str) -> str:
    """The megalign checkpoint ``source`` as a Dream-format directory ``output``; returns its
    path. Refused (ConversionError, nothing written) when Dream cannot hold the student."""
    path = resolve(source)
    cfg, meta, tokenizer = export_config(path)
    why = dream_refusal(cfg)
    if why:
        raise ConversionError(f"checkpoint '{path}': Dream's format cannot hold {why}; export it "
                              "with --to hf instead")
    refuse_foreign_output(output, "modeling_dream.py", "a Dream export")
    hf_state = student_for_export(path, cfg, meta, tokenizer)
    write_directory_atomically(output, lambda directory: _write(cfg, meta, hf_state, tokenizer,
                                                                directory))
    return output


def _write(cfg: Config, meta: dict, hf_state: dict, tokenizer, output: str) -> None:
    from safetensors.torch import save_file

    from megalign.convert import modeling_megalign

    state = dream_state(cfg, hf_state)
    config = dream_config(cfg, tokenizer)
    check_names(config, state)
    os.makedirs(output)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    package = os.path.dirname(modeling_megalign.__file__)
    for name in MODELING_FILES:
        shutil.copy(os.path.join(package, name), os.path.join(output, name))
    shutil.copy(decoding.__file__, os.path.join(output, "decoding.py"))
    with open(os.path.join(output, "generation_config.json"), "w", encoding="utf-8") as handle:
        # Dream's generation fields; megalign's defaults where Dream has one (greedy, the most
        # probable position first), Dream's own step count (its users pass steps)
        json.dump({"alg": "maskgit_plus", "alg_temp": None, "bos_token_id": config["bos_token_id"],
                   "eos_token_id": config["eos_token_id"], "eps": 1e-3,
                   "mask_token_id": config["mask_token_id"], "output_history": False,
                   "pad_token_id": config["pad_token_id"], "steps": 512, "temperature": 0.0,
                   "top_k": None, "top_p": None}, handle, indent=2)
    if tokenizer is not None:
        hf_tokenizer = transformers_tokenizer(cfg.data.tokenizer, tokenizer)
        declare_mask_token(hf_tokenizer, cfg.diffusion.mask_token_id)
        hf_tokenizer.save_pretrained(output)
        if cfg.data.tokenizer.endswith(".model"):  # llama.cpp's converter reads SentencePiece's
            shutil.copy(cfg.data.tokenizer, os.path.join(output, "tokenizer.model"))
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(model_card(cfg, meta, tokenizer is not None).replace(
            "\n## Recipe", "\nIn Dream's format (`model_type: Dream`): Dream's code, Fast-dLLM, "
            "dllm, Diffulex and llama.cpp's converter read it; `diffusion_generate` takes Dream's "
            "arguments and megalign's.\n\n## Recipe", 1))


def dream_state(cfg: Config, hf_state: dict) -> dict:
    """The student's tensors under Hugging Face names as Dream holds them: q/k/v biases always
    (zero where the student has none), no output layer when the embedding is tied."""
    m, state = cfg.model, dict(hf_state)
    if m.tie_embeddings:
        state.pop("lm_head.weight", None)
    for layer in range(m.num_layers):
        for name in ("q_proj", "k_proj", "v_proj"):
            weight = state[f"model.layers.{layer}.self_attn.{name}.weight"]
            state.setdefault(f"model.layers.{layer}.self_attn.{name}.bias",
                             torch.zeros(weight.shape[0], dtype=weight.dtype))
    return state


def check_names(config: dict, state: dict) -> None:
    """The tensors are exactly those Dream's network (the export's own DreamModel, built on the
    meta device) holds, with its shapes."""
    from megalign.convert.configuration_dream import DreamConfig
    from megalign.convert.modeling_dream import DreamModel

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DreamModel(DreamConfig(**config))
                    .state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted(set(got.items()) ^ set(expected.items()))[:4]
        raise ConversionError(f"the student's tensors do not fit Dream's network: {wrong}")


def declare_mask_token(tokenizer, mask: int) -> None:
    """Make ``tokenizer`` declare token ``mask`` as its mask token: the token already at that id,
    or a new one when the mask row is the first past the tokenizer's tokens (megalign's default
    row for a tokenizer without a mask token)."""
    if tokenizer.mask_token_id == mask:
        return
    if mask < len(tokenizer):
        tokenizer.add_special_tokens({"mask_token": tokenizer.convert_ids_to_tokens(mask)})
    elif mask == len(tokenizer):
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.mask_token_id != mask:
        raise ConversionError(f"the mask token is row {mask}, past the tokenizer's "
                              f"{len(tokenizer)} tokens and its first free row, so the tokenizer "
                              "cannot declare it (diffusion.mask_token_id)")
