"""The configuration of a megalign student exported in Dream's format (``megalign-convert --to
dream``), under Dream's class and argument names.

Dream (Dream-org's 7B, converted from Qwen2.5) is the published format for what megalign trains:
an AR-initialised masked diffusion LM that keeps the AR shift, with Qwen2's network (q/k/v biases,
no output bias, head size = hidden / heads, no norm on queries and keys) attending
bidirectionally. ``config.json`` holds Dream's keys, so Dream's code, Fast-dLLM, dllm, Diffulex
and llama.cpp's converter read it; this class reads them back for megalign's modeling file
(``modeling_megalign.py``, beside it), whose network reads megalign's names: the properties
below give those names Dream's fixed answers. It needs only transformers and never imports
megalign.
"""

from __future__ import annotations

import warnings
from typing import Optional

from transformers import PretrainedConfig


class DreamConfig(PretrainedConfig):
    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size: int = 151936, hidden_size: int = 4096,
                 intermediate_size: int = 22016, num_hidden_layers: int = 32,
                 num_attention_heads: int = 32, num_key_value_heads: Optional[int] = 32,
                 hidden_act: str = "silu", max_position_embeddings: int = 32768,
                 initializer_range: float = 0.02, rms_norm_eps: float = 1e-6,
                 use_cache: bool = False, tie_word_embeddings: bool = False,
                 rope_theta: float = 10000.0, rope_scaling: Optional[dict] = None,
                 use_sliding_window: bool = False, sliding_window: Optional[int] = None,
                 max_window_layers: int = 28, attention_dropout: float = 0.0,
                 mask_token_id: Optional[int] = None, sample_vocab_size: Optional[int] = None,
                 **kwargs):
        if hidden_act != "silu" or use_sliding_window or attention_dropout:
            raise ValueError(f"config.json hidden_act={hidden_act}, use_sliding_window="
                             f"{use_sliding_window}, attention_dropout={attention_dropout}: "
                             "megalign's network is SwiGLU with full attention and no dropout")
        scaling = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
        if scaling not in (None, "default", "llama3"):
            raise ValueError(f"config.json rope_scaling type {scaling}: megalign's network has "
                             "Llama 3.x's scaling or none")
        self.vocab_size = vocab_size  # rows of the embedding (padded; the mask token's included)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        with warnings.catch_warnings():  # transformers 5 calls the key Dream's format has
            warnings.simplefilter("ignore", FutureWarning)  # (and this class reads) deprecated
            self.rope_scaling = rope_scaling
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        # megalign's one key beyond Dream's: the tokenizer's tokens, the rows decoding may choose
        # (the padded rows and the mask row above them never are); None: every row
        self.sample_vocab_size = sample_vocab_size or vocab_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # what megalign's network (modeling_megalign.py) reads, fixed by Dream's format
    arch = "llama"
    qk_norm = False  # no RMSNorm on queries and keys
    qkv_bias = True  # Qwen2's q/k/v biases (zero for a student that had none)
    num_experts = None  # dense MLPs
    shift = True  # position i's logits predict token i + 1
    diffusion_block_length = None  # bidirectional decoding

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def norm_epsilon(self) -> float:
        return self.rms_norm_eps

    @property
    def rope_scaling_factor(self) -> Optional[float]:
        """Llama 3.x RoPE scaling's factor (its other parameters are Llama 3.x's), or None."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type", "default")) == "default":
            return None
        return float(scaling["factor"])
