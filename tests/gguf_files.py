"""Tiny GGUF files written the way llama.cpp's converter lays them out (tensor names from gguf's
own name map, experts stacked per layer, Llama's queries and keys permuted to interleaved RoPE),
so that ``megalign-convert --gguf-file`` can be tested on the families it reads from GGUF."""

import gguf
import numpy as np
import torch

ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3,
        "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE, "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
        "mixtral": gguf.MODEL_ARCH.LLAMA}


def _interleaved(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's permutation of Llama's q/k rows (rotate-half -> interleaved pairs)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's tensors under GGUF names, as llama.cpp's converter writes them (float32)."""
    config, kind = model.config, model.config.model_type
    names = gguf.get_tensor_name_map(ARCH[kind], config.num_hidden_layers)
    out = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        base, _, suffix = name.rpartition(".")
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, H] -> gate [E, I, H], up [E, I, H]
            layer = name.split(".")[2]
            gate, up = tensor.chunk(2, dim=1)
            out[f"blk.{layer}.ffn_gate_exps.weight"] = gate
            out[f"blk.{layer}.ffn_up_exps.weight"] = up
            continue
        if name.endswith("experts.down_proj"):
            out[f"blk.{name.split('.')[2]}.ffn_down_exps.weight"] = tensor
            continue
        target = names.get_name(base)
        assert target is not None, name
        if kind in ("llama", "mixtral") and target.endswith(("attn_q", "attn_k")):
            heads = (config.num_attention_heads if target.endswith("attn_q")
                     else config.num_key_value_heads)
            tensor = _interleaved(tensor, heads)
        if target.endswith("ffn_gate_inp_shexp"):  # stored as a vector
            tensor = tensor.reshape(-1)
        out[f"{target}.{suffix}"] = tensor
    return {name: t.detach().float().contiguous().numpy() for name, t in out.items()}


def write_gguf(model, path, extra_tensors=(), **fields) -> None:
    """``model`` (a transformers causal LM) as a float32 GGUF file at ``path``; ``fields``: more
    metadata (``add_<field>`` of gguf's writer), ``extra_tensors``: (name, array) written too."""
    config, kind = model.config, model.config.model_type
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[ARCH[kind]])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(f"tiny-{kind}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if kind in ("qwen3_moe", "qwen2_moe", "mixtral"):
        experts = config.num_local_experts if kind == "mixtral" else config.num_experts
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    if kind in ("qwen3_moe", "qwen2_moe"):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_expert_weights_norm(config.norm_topk_prob)
    if kind == "qwen2_moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    for field, value in fields.items():
        getattr(writer, f"add_{field}")(value)
    for name, array in [*gguf_tensors(model).items(), *extra_tensors]:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama3_rope_freqs(model) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` tensor for a Llama 3.x model: what each rotary frequency is
    divided by, here taken from transformers' own Llama 3 frequencies."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = model.config
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (plain / scaled.double()).float().numpy()
