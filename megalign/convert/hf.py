"""Hugging Face <-> Megatron-Core weight layouts for the architectures megalign trains.

Names on the Megatron side are megalign's global names (TP=1, PP-independent): a single process
converts, and ``dist_checkpointing`` reshards the result into any TP/PP layout when it is loaded.

* Llama family (Llama, SmolLM2, Qwen2 with QKV bias; tied or untied embeddings; GQA): Megatron's
  fused ``linear_qkv`` holds, per KV group, that group's query heads then its key and value head;
  ``linear_fc1`` holds [gate; up]. Both use the rotate-half RoPE convention, like HF.
* GPT-2: HF's ``Conv1D`` weights are transposed; ``c_attn`` is [q; k; v] over all heads, Megatron
  interleaves per head; activations are GeLU with the tanh approximation (HF ``gelu_new``).
"""

from __future__ import annotations

import torch

from megalign.errors import ConfigError, ConversionError

SUPPORTED = {"llama": "llama", "qwen2": "llama", "gpt2": "gpt2"}  # HF model_type -> megalign arch


def model_config_from_hf(hf_config) -> dict:
    """The ``model`` section of a megalign config for an HF causal LM config."""
    model_type = getattr(hf_config, "model_type", None)
    arch = SUPPORTED.get(model_type)
    if arch is None:
        raise ConversionError(
            f"model type {model_type} is not supported; megalign converts {sorted(SUPPORTED)}"
        )
    if arch == "gpt2":
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConversionError(
                f"GPT-2 activation {hf_config.activation_function} is not supported (gelu_new)"
            )
        return {
            "arch": "gpt2",
            "num_layers": hf_config.n_layer,
            "hidden_size": hf_config.n_embd,
            "ffn_hidden_size": hf_config.n_inner or 4 * hf_config.n_embd,
            "num_attention_heads": hf_config.n_head,
            "num_query_groups": None,
            "max_position_embeddings": hf_config.n_positions,
            "qkv_bias": True,
            "tie_embeddings": True,
            "norm_epsilon": hf_config.layer_norm_epsilon,
        }
    rope = getattr(hf_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"RoPE scaling {rope.get('rope_type')} is not supported")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim not in (None, hf_config.hidden_size // hf_config.num_attention_heads):
        raise ConversionError(f"head_dim {head_dim} != hidden_size / heads is not supported")
    return {
        "arch": "llama",
        "num_layers": hf_config.num_hidden_layers,
        "hidden_size": hf_config.hidden_size,
        "ffn_hidden_size": hf_config.intermediate_size,
        "num_attention_heads": hf_config.num_attention_heads,
        "num_query_groups": hf_config.num_key_value_heads,
        "max_position_embeddings": hf_config.max_position_embeddings,
        "qkv_bias": model_type == "qwen2",
        "tie_embeddings": bool(hf_config.tie_word_embeddings),
        "rotary_base": int(theta),
        "norm_epsilon": hf_config.rms_norm_eps,
    }


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] > rows:
        raise ConversionError(f"vocabulary of {tensor.shape[0]} rows exceeds the padded {rows}")
    padded = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype)
    padded[: tensor.shape[0]] = tensor
    return padded


def _qkv_to_megatron(q, k, v, heads: int, groups: int) -> torch.Tensor:
    """HF q [heads*d, ...], k/v [groups*d, ...] -> Megatron per-group [q_g; k_g; v_g]."""
    d = q.shape[0] // heads
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *rest)
    k = k.reshape(groups, d, *rest)
    v = v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_from_megatron(qkv, heads: int, groups: int):
    d = qkv.shape[0] // (heads + 2 * groups)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (heads // groups + 2) * d, *rest)
    q, k, v = torch.split(grouped, [heads // groups * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_to_megatron(hf_state: dict, model: dict, padded_vocab: int) -> dict:
    """HF state dict -> megalign global-name tensors (fp32)."""
    s = {k: v.float() for k, v in hf_state.items()}
    out = {}
    L, heads = model["num_layers"], model["num_attention_heads"]
    groups = model["num_query_groups"] or heads
    if model["arch"] == "gpt2":
        out["embedding.word_embeddings.weight"] = _pad_rows(s.pop("transformer.wte.weight"), padded_vocab)
        out["embedding.position_embeddings.weight"] = s.pop("transformer.wpe.weight")
        for i in range(L):
            h, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
            for part, name in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                out[m + name + ".weight"] = s.pop(h + part + ".weight")
                out[m + name + ".bias"] = s.pop(h + part + ".bias")
            q, k, v = s.pop(h + "attn.c_attn.weight").T.chunk(3, dim=0)
            out[m + "self_attention.linear_qkv.weight"] = _qkv_to_megatron(q, k, v, heads, heads)
            q, k, v = s.pop(h + "attn.c_attn.bias").chunk(3, dim=0)
            out[m + "self_attention.linear_qkv.bias"] = _qkv_to_megatron(q, k, v, heads, heads)
            for part, name in (("attn.c_proj", "self_attention.linear_proj"),
                               ("mlp.c_fc", "mlp.linear_fc1"), ("mlp.c_proj", "mlp.linear_fc2")):
                out[m + name + ".weight"] = s.pop(h + part + ".weight").T.contiguous()
                out[m + name + ".bias"] = s.pop(h + part + ".bias")
        out["decoder.final_layernorm.weight"] = s.pop("transformer.ln_f.weight")
        out["decoder.final_layernorm.bias"] = s.pop("transformer.ln_f.bias")
        s.pop("lm_head.weight", None)  # tied to wte
    else:
        out["embedding.word_embeddings.weight"] = _pad_rows(s.pop("model.embed_tokens.weight"), padded_vocab)
        for i in range(L):
            h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            out[m + "input_layernorm.weight"] = s.pop(h + "input_layernorm.weight")
            out[m + "pre_mlp_layernorm.weight"] = s.pop(h + "post_attention_layernorm.weight")
            q, k, v = (s.pop(h + f"self_attn.{p}_proj.weight") for p in "qkv")
            out[m + "self_attention.linear_qkv.weight"] = _qkv_to_megatron(q, k, v, heads, groups)
            if model["qkv_bias"]:
                q, k, v = (s.pop(h + f"self_attn.{p}_proj.bias") for p in "qkv")
                out[m + "self_attention.linear_qkv.bias"] = _qkv_to_megatron(q, k, v, heads, groups)
            out[m + "self_attention.linear_proj.weight"] = s.pop(h + "self_attn.o_proj.weight")
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [s.pop(h + "mlp.gate_proj.weight"), s.pop(h + "mlp.up_proj.weight")])
            out[m + "mlp.linear_fc2.weight"] = s.pop(h + "mlp.down_proj.weight")
        out["decoder.final_layernorm.weight"] = s.pop("model.norm.weight")
        head = s.pop("lm_head.weight", None)
        if not model["tie_embeddings"]:
            if head is None:
                raise ConversionError("untied model without lm_head.weight")
            out["output_layer.weight"] = _pad_rows(head, padded_vocab)
    s = {k: v for k, v in s.items() if not k.endswith("rotary_emb.inv_freq")}
    if s:
        raise ConversionError(f"unconverted HF tensors: {sorted(s)}")
    return out


def megatron_to_hf(state: dict, model: dict, vocab_size: int) -> dict:
    """megalign global-name tensors -> HF state dict (vocabulary cut to ``vocab_size`` rows)."""
    s = dict(state)
    out = {}
    L, heads = model["num_layers"], model["num_attention_heads"]
    groups = model["num_query_groups"] or heads
    if model["arch"] == "gpt2":
        out["transformer.wte.weight"] = s.pop("embedding.word_embeddings.weight")[:vocab_size]
        out["transformer.wpe.weight"] = s.pop("embedding.position_embeddings.weight")
        for i in range(L):
            h, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
            for part, name in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                out[h + part + ".weight"] = s.pop(m + name + ".weight")
                out[h + part + ".bias"] = s.pop(m + name + ".bias")
            q, k, v = _qkv_from_megatron(s.pop(m + "self_attention.linear_qkv.weight"), heads, heads)
            out[h + "attn.c_attn.weight"] = torch.cat([q, k, v]).T.contiguous()
            q, k, v = _qkv_from_megatron(s.pop(m + "self_attention.linear_qkv.bias"), heads, heads)
            out[h + "attn.c_attn.bias"] = torch.cat([q, k, v])
            for part, name in (("attn.c_proj", "self_attention.linear_proj"),
                               ("mlp.c_fc", "mlp.linear_fc1"), ("mlp.c_proj", "mlp.linear_fc2")):
                out[h + part + ".weight"] = s.pop(m + name + ".weight").T.contiguous()
                out[h + part + ".bias"] = s.pop(m + name + ".bias")
        out["transformer.ln_f.weight"] = s.pop("decoder.final_layernorm.weight")
        out["transformer.ln_f.bias"] = s.pop("decoder.final_layernorm.bias")
        out["lm_head.weight"] = out["transformer.wte.weight"]
    else:
        out["model.embed_tokens.weight"] = s.pop("embedding.word_embeddings.weight")[:vocab_size]
        for i in range(L):
            h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
            out[h + "input_layernorm.weight"] = s.pop(m + "input_layernorm.weight")
            out[h + "post_attention_layernorm.weight"] = s.pop(m + "pre_mlp_layernorm.weight")
            q, k, v = _qkv_from_megatron(s.pop(m + "self_attention.linear_qkv.weight"), heads, groups)
            out.update({h + "self_attn.q_proj.weight": q, h + "self_attn.k_proj.weight": k,
                        h + "self_attn.v_proj.weight": v})
            if model["qkv_bias"]:
                q, k, v = _qkv_from_megatron(s.pop(m + "self_attention.linear_qkv.bias"), heads, groups)
                out.update({h + "self_attn.q_proj.bias": q, h + "self_attn.k_proj.bias": k,
                            h + "self_attn.v_proj.bias": v})
            out[h + "self_attn.o_proj.weight"] = s.pop(m + "self_attention.linear_proj.weight")
            gate, up = s.pop(m + "mlp.linear_fc1.weight").chunk(2, dim=0)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
            out[h + "mlp.down_proj.weight"] = s.pop(m + "mlp.linear_fc2.weight")
        out["model.norm.weight"] = s.pop("decoder.final_layernorm.weight")
        if model["tie_embeddings"]:
            out["lm_head.weight"] = out["model.embed_tokens.weight"]
        else:
            out["lm_head.weight"] = s.pop("output_layer.weight")[:vocab_size]
    if s:
        raise ConversionError(f"unconverted megalign tensors: {sorted(s)}")
    return out


def check_layout(model: dict, tp: int, pp: int) -> None:
    """The TP/PP sizes this model can be trained with (a clear error otherwise)."""
    heads, groups = model["num_attention_heads"], model["num_query_groups"] or model["num_attention_heads"]
    if heads % tp or groups % tp:
        raise ConfigError(
            f"--tp {tp} must divide the {heads} attention heads and {groups} KV groups "
            f"(possible: {[t for t in range(1, groups + 1) if groups % t == 0 and heads % t == 0]})"
        )
    if model["num_layers"] % pp:
        raise ConfigError(f"--pp {pp} must divide the {model['num_layers']} layers")
