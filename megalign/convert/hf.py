"""Hugging Face <-> Megatron-Core weight layouts for the architectures megalign trains.

One table (``name_table``) lists every tensor on both sides with the transform each way; import
and export both read it. Names on the Megatron side are megalign's global names (TP=1,
PP-independent): a single process converts, and ``dist_checkpointing`` reshards the result
into any TP/PP layout when it is loaded.

* Llama family (Llama incl. 3.x RoPE scaling, SmolLM2, Mistral, Qwen2 with QKV bias, Qwen3 with
  RMSNorm on queries and keys and its own head size; Qwen3-MoE and Mixtral, whose router and
  experts map to Megatron-Core's ``router`` and ``SequentialMLP``; tied or untied embeddings;
  GQA; Qwen2-MoE's gated shared expert maps to ``shared_experts``): Megatron's
  fused ``linear_qkv`` holds, per KV group, that group's query heads then its key and value head;
  ``linear_fc1`` holds [gate; up]. Both use the rotate-half RoPE convention, like HF.
* GPT-2: HF's ``Conv1D`` weights are transposed; ``c_attn`` is [q; k; v] over all heads, Megatron
  interleaves per head; activations are GeLU with the tanh approximation (HF ``gelu_new``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megalign.errors import ConfigError, ConversionError

# HF model_type -> megalign arch
SUPPORTED = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
             "qwen3_moe": "llama", "mixtral": "llama", "qwen2_moe": "llama", "gpt2": "gpt2"}
# Llama 3.x RoPE scaling as Megatron-Core implements it (only the factor is a parameter there)
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def model_config_from_hf(hf_config) -> dict:
    """The ``model`` section of a megalign config for an HF causal LM config; what megalign cannot
    reproduce exactly is refused naming the config.json field."""
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
    check_full_attention(hf_config)
    for field, allowed in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        value = getattr(hf_config, field, allowed)
        if value != allowed and not (field == "attention_bias" and model_type == "qwen2"):
            raise ConversionError(f"config.json {field}={value} is not supported "
                                  f"(megalign's Llama family has {allowed})")
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling",
                                                                  None) or {}
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    scaling = rope.get("rope_type", rope.get("type", "default"))
    if scaling not in ("default", "llama3"):
        raise ConversionError(f"config.json rope_type={scaling} is not supported (default, "
                              "llama3)")
    if scaling == "llama3":
        for field, value in LLAMA3_ROPE.items():
            if float(rope.get(field, value)) != value:
                raise ConversionError(f"config.json rope {field}={rope.get(field)} is not "
                                      f"supported (Llama 3.x's {value:g})")
    default_head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or default_head_dim
    return {**experts_from_hf(hf_config),
        "arch": "llama",
        "num_layers": hf_config.num_hidden_layers,
        "hidden_size": hf_config.hidden_size,
        "ffn_hidden_size": hf_config.intermediate_size,
        "num_attention_heads": hf_config.num_attention_heads,
        "num_query_groups": hf_config.num_key_value_heads,
        "head_dim": None if head_dim == default_head_dim else head_dim,
        "qk_norm": model_type in ("qwen3", "qwen3_moe"),
        "max_position_embeddings": hf_config.max_position_embeddings,
        "qkv_bias": model_type == "qwen2" or bool(getattr(hf_config, "qkv_bias", False)),
        "tie_embeddings": bool(hf_config.tie_word_embeddings),
        "rotary_base": int(theta),
        "rope_scaling_factor": float(rope["factor"]) if scaling == "llama3" else None,
        "norm_epsilon": hf_config.rms_norm_eps,
    }


def experts_from_hf(hf_config) -> dict:
    """The mixture-of-experts part of the ``model`` section (empty for a dense model): Qwen3-MoE
    and Qwen2-MoE (softmax over all experts, top k renormalised only with ``norm_topk_prob``;
    Qwen2-MoE adds a shared expert behind a sigmoid gate) or Mixtral (top k renormalised); every
    layer must be sparse."""
    shared = None
    if hf_config.model_type == "mixtral":
        experts, size, normalised = (hf_config.num_local_experts, hf_config.intermediate_size,
                                     True)
    elif hf_config.model_type in ("qwen3_moe", "qwen2_moe"):
        experts, size = hf_config.num_experts, hf_config.moe_intermediate_size
        normalised = bool(hf_config.norm_topk_prob)
        dense = list(getattr(hf_config, "mlp_only_layers", None) or [])
        if dense or getattr(hf_config, "decoder_sparse_step", 1) != 1:
            raise ConversionError(
                f"config.json mlp_only_layers={dense} / decoder_sparse_step="
                f"{hf_config.decoder_sparse_step}: dense layers between expert layers are not "
                "supported (every layer must be a mixture of experts)")
        if hf_config.model_type == "qwen2_moe":
            shared = hf_config.shared_expert_intermediate_size
    else:
        return {}
    return {"num_experts": experts, "moe_topk": hf_config.num_experts_per_tok,
            "moe_ffn_hidden_size": size, "moe_router_pre_softmax": not normalised,
            "moe_aux_loss_coeff": float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
            "moe_shared_expert_ffn_hidden_size": shared, "moe_shared_expert_gate": bool(shared)}


def split_experts(state: dict) -> dict:
    """transformers 5's fused expert tensors (``experts.gate_up_proj`` [E, 2I, H],
    ``experts.down_proj`` [E, H, I]) as one Linear weight per expert, the layout of the
    published checkpoints (``experts.{e}.gate_proj/up_proj/down_proj.weight``)."""
    out = {}
    for name, tensor in state.items():
        prefix, _, kind = name.rpartition("experts.")
        if kind == "gate_up_proj":
            for e, fused in enumerate(tensor):
                gate, up = fused.chunk(2, dim=0)
                out[f"{prefix}experts.{e}.gate_proj.weight"] = gate
                out[f"{prefix}experts.{e}.up_proj.weight"] = up
        elif kind == "down_proj":
            for e, down in enumerate(tensor):
                out[f"{prefix}experts.{e}.down_proj.weight"] = down
        else:
            out[name] = tensor
    return out


def check_full_attention(hf_config) -> None:
    """Sliding-window attention (Mistral, Qwen2/3 ``use_sliding_window``, ``layer_types``) is
    refused: megalign's layers attend over the whole sequence."""
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", window is not None)
    if uses_window and window is not None and window < hf_config.max_position_embeddings:
        raise ConversionError(
            f"config.json sliding_window={window} (below max_position_embeddings="
            f"{hf_config.max_position_embeddings}) is not supported: megalign's attention is "
            "full; set it to null only if the model was trained without a window")
    kinds = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ConversionError(f"config.json layer_types {sorted(kinds)} are not supported "
                              "(full_attention only)")


@dataclass(frozen=True)
class Mapping:
    """HF tensors <-> one megalign tensor: the one table both directions read."""

    hf: tuple[str, ...]
    megatron: str
    to_megatron: Callable[[list], torch.Tensor]
    to_hf: Callable[[torch.Tensor], list]


def _same(name_hf: str, name_mg: str) -> Mapping:
    return Mapping((name_hf,), name_mg, lambda t: t[0], lambda t: [t])


def _transposed(name_hf: str, name_mg: str) -> Mapping:
    """GPT-2's ``Conv1D`` stores weights [in, out]."""
    return Mapping((name_hf,), name_mg, lambda t: t[0].T.contiguous(), lambda t: [t.T.contiguous()])


def _vocabulary(name_hf: str, name_mg: str, padded: int, vocab: int) -> Mapping:
    """Vocabulary rows: padded with zeros to ``padded`` one way, cut to ``vocab`` the other."""
    return Mapping((name_hf,), name_mg, lambda t: _pad_rows(t[0], padded), lambda t: [t[:vocab]])


def _qkv(names: tuple[str, ...], name_mg: str, heads: int, groups: int, fused_hf=False,
         transpose=False) -> Mapping:
    """q, k, v (or GPT-2's fused [q; k; v]) <-> Megatron's per-group [q_g; k_g; v_g]."""
    def to_megatron(tensors):
        q, k, v = ((tensors[0].T if transpose else tensors[0]).chunk(3, dim=0) if fused_hf
                   else tensors)
        return _qkv_to_megatron(q, k, v, heads, groups)

    def to_hf(tensor):
        q, k, v = _qkv_from_megatron(tensor, heads, groups)
        if not fused_hf:
            return [q, k, v]
        fused = torch.cat([q, k, v])
        return [fused.T.contiguous() if transpose else fused]

    return Mapping(names, name_mg, to_megatron, to_hf)


def _gated(gate: str, up: str, name_mg: str) -> Mapping:
    """SwiGLU's gate and up projections <-> Megatron's fused ``linear_fc1`` [gate; up]."""
    return Mapping((gate, up), name_mg, lambda t: torch.cat(t), lambda t: list(t.chunk(2, dim=0)))


def name_table(model: dict, padded_vocab: int, vocab: int) -> list[Mapping]:
    """Every tensor of ``model`` (the ``model`` config section), HF side and megalign side."""
    L, heads = model["num_layers"], model["num_attention_heads"]
    groups = model["num_query_groups"] or heads
    table = []
    if model["arch"] == "gpt2":
        table += [_vocabulary("transformer.wte.weight", "embedding.word_embeddings.weight",
                              padded_vocab, vocab),
                  _same("transformer.wpe.weight", "embedding.position_embeddings.weight")]
        for i in range(L):
            h, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
            for part, name in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                table += [_same(h + part + ".weight", m + name + ".weight"),
                          _same(h + part + ".bias", m + name + ".bias")]
            table += [_qkv((h + "attn.c_attn.weight",), m + "self_attention.linear_qkv.weight",
                           heads, heads, fused_hf=True, transpose=True),
                      _qkv((h + "attn.c_attn.bias",), m + "self_attention.linear_qkv.bias",
                           heads, heads, fused_hf=True)]
            for part, name in (("attn.c_proj", "self_attention.linear_proj"),
                               ("mlp.c_fc", "mlp.linear_fc1"), ("mlp.c_proj", "mlp.linear_fc2")):
                table += [_transposed(h + part + ".weight", m + name + ".weight"),
                          _same(h + part + ".bias", m + name + ".bias")]
        table += [_same("transformer.ln_f.weight", "decoder.final_layernorm.weight"),
                  _same("transformer.ln_f.bias", "decoder.final_layernorm.bias")]
        return table
    table.append(_vocabulary("model.embed_tokens.weight", "embedding.word_embeddings.weight",
                             padded_vocab, vocab))
    for i in range(L):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        table += [
            _same(h + "input_layernorm.weight", m + "input_layernorm.weight"),
            _same(h + "post_attention_layernorm.weight", m + "pre_mlp_layernorm.weight"),
            _qkv(tuple(h + f"self_attn.{p}_proj.weight" for p in "qkv"),
                 m + "self_attention.linear_qkv.weight", heads, groups),
        ]
        if model["qkv_bias"]:
            table.append(_qkv(tuple(h + f"self_attn.{p}_proj.bias" for p in "qkv"),
                              m + "self_attention.linear_qkv.bias", heads, groups))
        if model.get("qk_norm"):  # Qwen3: RMSNorm over each head's queries and keys
            table += [_same(h + "self_attn.q_norm.weight", m + "self_attention.q_layernorm.weight"),
                      _same(h + "self_attn.k_norm.weight", m + "self_attention.k_layernorm.weight")]
        table.append(_same(h + "self_attn.o_proj.weight", m + "self_attention.linear_proj.weight"))
        if model.get("num_experts"):  # the router, then each expert's SwiGLU
            table.append(_same(h + "mlp.gate.weight", m + "mlp.router.weight"))
            for e in range(model["num_experts"]):
                x, y = f"{h}mlp.experts.{e}.", f"{m}mlp.experts.local_experts.{e}."
                table += [_gated(x + "gate_proj.weight", x + "up_proj.weight",
                                 y + "linear_fc1.weight"),
                          _same(x + "down_proj.weight", y + "linear_fc2.weight")]
            if model.get("moe_shared_expert_ffn_hidden_size"):  # Qwen2-MoE
                x, y = f"{h}mlp.shared_expert.", f"{m}mlp.shared_experts."
                table += [_gated(x + "gate_proj.weight", x + "up_proj.weight",
                                 y + "linear_fc1.weight"),
                          _same(x + "down_proj.weight", y + "linear_fc2.weight")]
                if model.get("moe_shared_expert_gate"):
                    table.append(_same(h + "mlp.shared_expert_gate.weight", y + "gate_weight"))
        else:
            table += [_gated(h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight",
                             m + "mlp.linear_fc1.weight"),
                      _same(h + "mlp.down_proj.weight", m + "mlp.linear_fc2.weight")]
    table.append(_same("model.norm.weight", "decoder.final_layernorm.weight"))
    if not model["tie_embeddings"]:
        table.append(_vocabulary("lm_head.weight", "output_layer.weight", padded_vocab, vocab))
    return table


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
    s = {k: v.float() for k, v in split_experts(hf_state).items()
         if not k.endswith("rotary_emb.inv_freq")}
    if model["arch"] == "gpt2" or model["tie_embeddings"]:
        s.pop("lm_head.weight", None)  # the word embedding, tied
    out = {}
    for mapping in name_table(model, padded_vocab, padded_vocab):
        missing = [name for name in mapping.hf if name not in s]
        if missing:
            raise ConversionError(f"HF tensors missing: {missing}")
        out[mapping.megatron] = mapping.to_megatron([s.pop(name) for name in mapping.hf])
    if s:
        raise ConversionError(f"unconverted HF tensors: {sorted(s)}")
    return out


def megatron_to_hf(state: dict, model: dict, vocab_size: int) -> dict:
    """megalign global-name tensors -> HF state dict (vocabulary cut to ``vocab_size`` rows;
    tied models get ``lm_head.weight`` as the word embedding)."""
    s = dict(state)
    out = {}
    for mapping in name_table(model, vocab_size, vocab_size):
        if mapping.megatron not in s:
            raise ConversionError(f"megalign tensor missing: {mapping.megatron}")
        out.update(zip(mapping.hf, mapping.to_hf(s.pop(mapping.megatron))))
    if s:
        raise ConversionError(f"unconverted megalign tensors: {sorted(s)}")
    embedding = "transformer.wte.weight" if model["arch"] == "gpt2" else "model.embed_tokens.weight"
    if model["arch"] == "gpt2" or model["tie_embeddings"]:
        out["lm_head.weight"] = out[embedding]
    return out


def check_layout(model: dict, tp: int, pp: int) -> None:
    """The TP/PP sizes this model can be trained with (a clear error otherwise)."""
    heads, groups = (model["num_attention_heads"],
                     model["num_query_groups"] or model["num_attention_heads"])
    if heads % tp or groups % tp:
        raise ConfigError(
            f"--tp {tp} must divide the {heads} attention heads and {groups} KV groups "
            f"(possible: {[t for t in range(1, groups + 1) if groups % t == 0 and heads % t == 0]})"
        )
    if model["num_layers"] % pp:
        raise ConfigError(f"--pp {pp} must divide the {model['num_layers']} layers")
