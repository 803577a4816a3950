"""GGUF files read through transformers' GGUF loader, with what that loader skips read here.

transformers builds the model's config from a fixed list of GGUF fields and drops tensors it has
no name for. For the families megalign converts, that loses: Qwen3's head size
(``attention.key_length``; it falls back to 128), the expert and shared-expert widths of
Qwen3-MoE and Qwen2-MoE (``expert_feed_forward_length``, ``expert_shared_feed_forward_length``)
and their top-k renormalisation (``expert_weights_norm``), Llama 3.x RoPE scaling (llama.cpp
stores it as the ``rope_freqs`` tensor), and the experts of a Mixtral file (architecture
``llama``, read as a dense Llama). All but the last are restored from the file; what cannot be
reproduced exactly is refused naming the GGUF field. ``gguf`` (of the ``hf`` extra) is imported
only when a file is read.
"""

from __future__ import annotations

import math

import numpy as np

from megalign.convert.hf import LLAMA3_ROPE
from megalign.errors import ConversionError, first_line


def complete_gguf_config(path: str, hf_config):
    """``hf_config`` (what transformers read from the GGUF file ``path``) with the fields its
    loader skips set from the file; raises ConversionError for what megalign cannot convert."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # a truncated or foreign file: gguf raises ValueError and others
        raise ConversionError(f"'{path}' is not a readable GGUF file ({first_line(err)})") from None
    try:
        for name, value in _skipped_fields(reader, hf_config).items():
            setattr(hf_config, name, value)
    except ConversionError as err:
        raise ConversionError(f"'{path}': {err}") from None
    return hf_config


def _skipped_fields(reader, hf_config) -> dict:
    """Config attribute -> value for the fields transformers skipped (refusing the rest)."""
    arch = _field(reader, "general.architecture")

    def field(name):
        return _field(reader, f"{arch}.{name}")

    experts = field("expert_count") or 0
    if experts and hf_config.model_type not in ("qwen3_moe", "qwen2_moe"):
        raise ConversionError(
            f"GGUF field {arch}.expert_count={experts}: transformers reads this {arch} file as a "
            "dense model without its experts (Mixtral); convert the Hugging Face safetensors "
            "directory instead")
    window = field("attention.sliding_window")
    if window:
        raise ConversionError(f"GGUF field {arch}.attention.sliding_window={window} is not "
                              "supported: megalign's attention is full")
    scaling = field("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ConversionError(f"GGUF field {arch}.rope.scaling.type={scaling} is not supported "
                              "(Llama 3.x scaling is read from the rope_freqs tensor)")
    updates = {}
    head_dim = field("attention.key_length")
    if head_dim and hasattr(hf_config, "head_dim"):
        updates["head_dim"] = int(head_dim)
    if hf_config.model_type in ("qwen3_moe", "qwen2_moe"):
        for name, attribute in (("expert_feed_forward_length", "moe_intermediate_size"),
                                ("expert_shared_feed_forward_length",
                                 "shared_expert_intermediate_size")):
            if field(name) and hasattr(hf_config, attribute):
                updates[attribute] = int(field(name))
        if field("expert_weights_norm") is not None:
            updates["norm_topk_prob"] = bool(field("expert_weights_norm"))
    factors = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if factors is not None:
        theta = float(hf_config.rope_parameters["rope_theta"])
        dim = updates.get("head_dim") or hf_config.hidden_size // hf_config.num_attention_heads
        factor = llama3_factor(np.asarray(factors.data, dtype=np.float64), dim, theta)
        updates["rope_parameters"] = {**LLAMA3_ROPE, "rope_type": "llama3", "factor": factor,
                                      "rope_theta": theta}
    return updates


def llama3_factor(factors: np.ndarray, head_dim: int, theta: float) -> float:
    """The Llama 3.x scaling factor whose per-frequency divisors (llama.cpp's ``rope_freqs``) are
    ``factors``; refused unless every divisor is what that factor gives with Llama 3.x's fixed
    low/high frequency factors and original length (the only parameters Megatron-Core takes)."""
    factor = float(factors.max())
    if factors.shape != (head_dim // 2,) or not np.allclose(
            factors, llama3_divisors(head_dim, theta, factor), rtol=1e-5, atol=0):
        raise ConversionError(
            "GGUF tensor rope_freqs: its frequency divisors are not Llama 3.x RoPE scaling with "
            f"low/high frequency factors {LLAMA3_ROPE['low_freq_factor']:g}/"
            f"{LLAMA3_ROPE['high_freq_factor']:g} and original length "
            f"{LLAMA3_ROPE['original_max_position_embeddings']}; not supported")
    return factor


def llama3_divisors(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """What each rotary frequency is divided by under Llama 3.x scaling: 1 for short
    wavelengths, ``factor`` for long ones, a smooth blend between."""
    low, high = LLAMA3_ROPE["low_freq_factor"], LLAMA3_ROPE["high_freq_factor"]
    original = LLAMA3_ROPE["original_max_position_embeddings"]
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(divisors)


def _field(reader, key: str):
    """A scalar GGUF field (a string decoded), or None when the file lacks it."""
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()
