"""A megalign masked diffusion LM for Hugging Face transformers, with its sampler.

megalign-convert (``--from megalign --to hf``) copies this file next to the weights, so the
directory loads with transformers alone::

    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    ids = model.diffusion_generate(tokenizer("In the beginning", return_tensors="pt").input_ids,
                                   max_new_tokens=32)

It needs only torch and transformers and never imports megalign. The network is the AR model's
(Llama family: RMSNorm, SwiGLU, RoPE with optional Llama 3 scaling, grouped-query attention,
optional QKV bias, optional RMSNorm on queries and keys (Qwen3), dense or mixture-of-experts
MLPs (Qwen3-MoE, Mixtral; Qwen2-MoE's gated shared expert); or GPT-2:
LayerNorm, tanh GeLU, learned positions) with bidirectional attention; position ``i``'s logits
predict token ``i+1`` when ``config.shift`` (the AR shift kept in training). ``diffusion_generate``
decodes with megalign's own decoding rules (``decoding.py`` beside this file, a copy of
megalign/diffusion/decoding.py), its options and defaults, its key/value caches and block-causal
decoding for block-diffusion students, so the same options and seed give megalign-generate's
tokens.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .decoding import Logits, SamplerConfig, Window, for_block_diffusion, prepare, sample


class MegalignDiffusionConfig(PretrainedConfig):
    model_type = "megalign_diffusion"

    def __init__(self, arch: str = "llama", vocab_size: int = 32000, hidden_size: int = 64,
                 intermediate_size: int = 128, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, qk_norm: bool = False,
                 rope_scaling_factor: Optional[float] = None, num_experts: Optional[int] = None,
                 moe_topk: int = 2, moe_intermediate_size: Optional[int] = None,
                 moe_router_pre_softmax: bool = False,
                 moe_shared_intermediate_size: Optional[int] = None,
                 moe_shared_expert_gate: bool = False, max_position_embeddings: int = 128,
                 norm_epsilon: float = 1e-5,
                 rope_theta: float = 10000.0, qkv_bias: bool = False,
                 tie_word_embeddings: bool = True, mask_token_id: Optional[int] = None,
                 shift: bool = True, sample_vocab_size: Optional[int] = None,
                 document_attention: bool = True, diffusion_block_length: Optional[int] = None,
                 **kwargs):
        self.arch = arch
        self.vocab_size = vocab_size  # rows of the embedding (padded; the mask token included)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.qk_norm = qk_norm  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
        self.rope_scaling_factor = rope_scaling_factor  # Llama 3.x RoPE scaling; None = off
        # mixture of experts: num_experts SwiGLU experts per layer, moe_topk per token; None = dense
        self.num_experts = num_experts
        self.moe_topk = moe_topk
        self.moe_intermediate_size = moe_intermediate_size or intermediate_size
        # softmax over all experts, top k kept as they are; else the top k renormalised
        self.moe_router_pre_softmax = moe_router_pre_softmax
        # Qwen2-MoE: a shared SwiGLU expert every token passes through, sigmoid-gated or not
        self.moe_shared_intermediate_size = moe_shared_intermediate_size
        self.moe_shared_expert_gate = moe_shared_expert_gate
        self.max_position_embeddings = max_position_embeddings
        self.norm_epsilon = norm_epsilon
        self.rope_theta = rope_theta
        self.qkv_bias = qkv_bias
        self.mask_token_id = mask_token_id
        self.shift = shift
        self.sample_vocab_size = sample_vocab_size or vocab_size  # the tokenizer's real tokens
        self.document_attention = document_attention
        # trained by block diffusion with blocks of this size: decoded block-causally; None = off
        self.diffusion_block_length = diffusion_block_length
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class RMSNorm(nn.Module):
    """torch's RMSNorm, as megalign's local spec normalises (the same rounding in bfloat16)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Conv1D(nn.Module):
    """GPT-2's linear layer: the weight is stored [in, out]."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inputs, outputs))
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x):
        return x @ self.weight + self.bias  # (rounded, then biased: as Megatron-Core's linears)


def _llama3_frequencies(inverse: torch.Tensor, factor: float) -> torch.Tensor:
    """Llama 3.x RoPE scaling (low/high frequency factors 1 and 4, 8,192 original positions):
    wavelengths beyond 8,192 positions slowed by ``factor``, below 2,048 kept, blended between."""
    original, low, high = 8192, 1.0, 4.0
    wavelength = 2 * math.pi / inverse
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inverse / factor + smooth * inverse
    scaled = torch.where(wavelength > original / low, inverse / factor, inverse)
    medium = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(medium, blended, scaled)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with the bias added after the product is rounded, as Megatron-Core's linear
    layers add it (``nn.Linear`` fuses the two, which rounds differently in bfloat16)."""
    out = F.linear(x, layer.weight)
    return out if layer.bias is None else out + layer.bias


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _attend(q, k, v, blocked):
    """q [b, H, sq, d], k/v [b, G, sk, d] (G groups of H/G heads), blocked [b, 1, sq, sk] True =
    not attended. Scaled in the product and normalised in float32, as Megatron-Core's attention
    is, so bfloat16 rounds where megalign's model does."""
    b, heads, sq, d = q.shape
    repeat = heads // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    q, k, v = (t.reshape(b * heads, t.shape[2], d) for t in (q, k, v))
    scores = torch.baddbmm(q.new_empty(b * heads, sq, k.shape[1]), q, k.transpose(1, 2),
                           beta=0.0, alpha=1.0 / math.sqrt(d)).view(b, heads, sq, -1)
    probs = scores.float().masked_fill(blocked, float("-inf")).softmax(-1).to(v.dtype)
    context = torch.bmm(probs.view(b * heads, sq, -1), v).view(b, heads, sq, d)
    return context.transpose(1, 2).reshape(b, sq, heads * d)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x, scale: Optional[torch.Tensor] = None):
        """``scale`` [tokens]: a router's weights, applied before the down projection (where
        Megatron-Core's experts apply them, so bfloat16 rounds alike)."""
        hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hidden if scale is None else hidden * scale.unsqueeze(-1))


class MixtureOfExperts(nn.Module):
    """A softmax router (``gate``) sending each token to ``moe_topk`` SwiGLU experts, whose
    outputs are summed weighted by the router's probabilities (Qwen3-MoE, Mixtral), plus a
    shared expert's output scaled by a sigmoid gate (Qwen2-MoE)."""

    def __init__(self, config: MegalignDiffusionConfig):
        super().__init__()
        h, shared = config.hidden_size, config.moe_shared_intermediate_size
        self.topk, self.pre_softmax = config.moe_topk, config.moe_router_pre_softmax
        self.gate = nn.Linear(h, config.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(h, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        self.shared_expert = SwiGLU(h, shared) if shared else None
        self.shared_expert_gate = (nn.Linear(h, 1, bias=False) if config.moe_shared_expert_gate
                                   else None)

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.gate(tokens)  # in the model's dtype; softmax in float32, as Megatron-Core
        if self.pre_softmax:
            weights, chosen = logits.softmax(-1, dtype=torch.float32).type_as(logits).topk(
                self.topk, dim=-1)
        else:
            top, chosen = logits.topk(self.topk, dim=-1)
            weights = top.softmax(-1, dtype=torch.float32).type_as(logits)
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            rows, slot = (chosen == index).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows], weights[rows, slot]))
        out = out.view_as(x)
        if self.shared_expert is None:
            return out
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = shared * torch.sigmoid(self.shared_expert_gate(x))
        return out + shared  # routed, then shared: Megatron-Core's order


class LlamaBlock(nn.Module):
    def __init__(self, config: MegalignDiffusionConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.heads, self.groups, self.head_dim = (config.num_attention_heads,
                                                  config.num_key_value_heads, d)
        self.input_layernorm = RMSNorm(h, config.norm_epsilon)
        self.post_attention_layernorm = RMSNorm(h, config.norm_epsilon)
        self.self_attn = nn.Module()
        if config.qk_norm:
            self.self_attn.q_norm = RMSNorm(d, config.norm_epsilon)
            self.self_attn.k_norm = RMSNorm(d, config.norm_epsilon)
        self.self_attn.q_proj = nn.Linear(h, self.heads * d, bias=config.qkv_bias)
        self.self_attn.k_proj = nn.Linear(h, self.groups * d, bias=config.qkv_bias)
        self.self_attn.v_proj = nn.Linear(h, self.groups * d, bias=config.qkv_bias)
        self.self_attn.o_proj = nn.Linear(self.heads * d, h, bias=False)
        self.mlp = (MixtureOfExperts(config) if config.num_experts
                    else SwiGLU(h, config.intermediate_size))

    def forward(self, x, blocked, cos, sin, kept=None):
        b, s, _ = x.shape
        a = self.self_attn
        y = self.input_layernorm(x)
        q = _linear(a.q_proj, y).view(b, s, self.heads, self.head_dim)
        k = _linear(a.k_proj, y).view(b, s, self.groups, self.head_dim)
        if hasattr(a, "q_norm"):
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = _linear(a.v_proj, y).view(b, s, self.groups, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if kept is not None:
            k, v = kept(k, v)
        x = x + a.o_proj(_attend(q, k, v, blocked))
        y = self.post_attention_layernorm(x)
        return x + self.mlp(y)


class GPT2Block(nn.Module):
    def __init__(self, config: MegalignDiffusionConfig):
        super().__init__()
        h = config.hidden_size
        self.heads = config.num_attention_heads
        self.ln_1 = nn.LayerNorm(h, eps=config.norm_epsilon)
        self.ln_2 = nn.LayerNorm(h, eps=config.norm_epsilon)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(h, 3 * h)
        self.attn.c_proj = Conv1D(h, h)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(h, config.intermediate_size)
        self.mlp.c_proj = Conv1D(config.intermediate_size, h)

    def forward(self, x, blocked, cos=None, sin=None, kept=None):
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2)
                   for t in self.attn.c_attn(self.ln_1(x)).split(h, dim=-1))
        if kept is not None:
            k, v = kept(k, v)
        x = x + self.attn.c_proj(_attend(q, k, v, blocked))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class MegalignForDiffusionLM(PreTrainedModel):
    """The bidirectional student; ``forward`` gives [b, s, vocab] logits (``MaskedLMOutput``)."""

    config_class = MegalignDiffusionConfig
    base_model_prefix = "megalign"

    def __init__(self, config: MegalignDiffusionConfig):
        super().__init__(config)
        h, blocks = config.hidden_size, range(config.num_hidden_layers)
        if config.arch == "gpt2":
            self.transformer = nn.Module()
            self.transformer.wte = nn.Embedding(config.vocab_size, h)
            self.transformer.wpe = nn.Embedding(config.max_position_embeddings, h)
            self.transformer.h = nn.ModuleList(GPT2Block(config) for _ in blocks)
            self.transformer.ln_f = nn.LayerNorm(h, eps=config.norm_epsilon)
        else:
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(config.vocab_size, h)
            self.model.layers = nn.ModuleList(LlamaBlock(config) for _ in blocks)
            self.model.norm = RMSNorm(h, config.norm_epsilon)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def _embedding(self) -> nn.Embedding:
        return self.transformer.wte if self.config.arch == "gpt2" else self.model.embed_tokens

    def get_input_embeddings(self):
        return self._embedding()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                cache: Optional["KeyValueCache"] = None, **_unused) -> MaskedLMOutput:
        """``attention_mask`` [b, s] (1 = token, 0 = padding; padding is never attended) or a
        [b, 1, s, s] boolean mask (True = blocked, e.g. per-document); positions default to the
        token's index among the real tokens. ``cache``: keys and values kept by a refresh; when
        it has a window, ``input_ids`` are the window's tokens and the mask is [b, 1, window, s]."""
        blocked, valid = _blocked(input_ids, attention_mask)
        if cache is not None and cache.order is not None:
            blocked = blocked[..., cache.order]  # the keys come in the cache's slot order
        if position_ids is None:
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        layers = self.transformer.h if self.config.arch == "gpt2" else self.model.layers
        hooks = [functools.partial(cache.attend, index) if cache is not None else None
                 for index in range(len(layers))]
        if self.config.arch == "gpt2":
            t = self.transformer
            x = t.wte(input_ids) + t.wpe(position_ids)
            for block, kept in zip(t.h, hooks):
                x = block(x, blocked, kept=kept)
            x = t.ln_f(x)
        else:
            m, d = self.model, self.config.head_dim
            inverse = 1.0 / (self.config.rope_theta
                             ** (torch.arange(0, d, 2, dtype=torch.float32, device=x_device(m))
                                 / d))
            if self.config.rope_scaling_factor is not None:
                inverse = _llama3_frequencies(inverse, self.config.rope_scaling_factor)
            angles = position_ids.float().unsqueeze(-1) * inverse
            angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [b, 1, s, d]
            x = m.embed_tokens(input_ids)
            cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
            for block, kept in zip(m.layers, hooks):
                x = block(x, blocked, cos, sin, kept)
            x = m.norm(x)
        weight = (self.lm_head.weight if not self.config.tie_word_embeddings
                  else self._embedding().weight)
        return MaskedLMOutput(logits=F.linear(x, weight))

    @torch.no_grad()
    def diffusion_generate(self, input_ids: torch.Tensor,
                           attention_mask: Optional[torch.Tensor] = None,
                           max_new_tokens: int = 32, steps: Optional[int] = None,
                           block_length: Optional[int] = None, temperature: float = 0.0,
                           top_k: int = 0, top_p: float = 1.0, confidence: str = "prob",
                           unmasking: str = "confidence", seed: int = 0,
                           eos_token_id: Optional[int] = -1, threshold: Optional[float] = None,
                           cache: bool = False, dual_cache: bool = False, cache_refresh: int = 0,
                           suffix: bool = True) -> torch.Tensor:
        """Prompts (rows of ``input_ids``, padding marked 0 in ``attention_mask``) followed by
        ``max_new_tokens`` denoised tokens: [b, longest prompt + max_new_tokens], prompts
        left-padded with the pad token. Options and defaults are megalign-generate's: blocks of 8
        when they tile the answer, one token per step, greedy; ``eos_token_id`` (default: the
        config's; None: no stop) ends a sample once it is decoded with nothing masked before it.
        ``threshold``: commit every masked position of the block whose confidence reaches it, at
        least one per step (parallel decoding; ``steps`` is then unused). ``cache``: keep the keys
        and values of the positions before the block (recomputed when a block starts and every
        ``cache_refresh`` steps); ``dual_cache``: those after it too; ``suffix=False``: the input
        ends with the current block. A block-diffusion student always decodes its training
        blocks block-causally, without the suffix (its cache is then exact)."""
        eos = self.config.eos_token_id if eos_token_id == -1 else eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        options = SamplerConfig(
            gen_length=max_new_tokens, steps=steps, block_length=block_length,
            temperature=temperature, top_k=top_k, top_p=top_p, confidence=confidence,
            unmasking=unmasking, eos_id=eos, seed=seed, threshold=threshold,
            cache=cache or dual_cache, cache_refresh=cache_refresh, suffix=suffix,
            dual_cache=dual_cache, shift=self.config.shift)
        if self.config.diffusion_block_length:
            options = for_block_diffusion(options, self.config.diffusion_block_length)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, attention_mask)]
        mask_id = self.config.mask_token_id
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        generated = sample(self._logits_source(options), prompts, options, mask_id=mask_id,
                           pad_id=pad, vocab_size=self.config.sample_vocab_size)
        tokens = prepare(prompts, options, mask_id, pad)[0]
        tokens[:, tokens.shape[1] - max_new_tokens:] = torch.tensor(generated, dtype=torch.long)
        return tokens

    def _logits_source(self, options: SamplerConfig):
        """The decoding rules' logits source: the whole sequence each step, or with
        ``options.cache`` the window of positions the step needs against a ``KeyValueCache``."""
        device = self._embedding().weight.device
        held = {}

        def source(tokens: torch.Tensor, blocked: torch.Tensor, window: Window):
            tokens, blocked = tokens.to(device), blocked.to(device)
            positions = _positions(tokens, blocked, learned=self.config.arch == "gpt2")
            if not options.cache:
                return self(tokens, blocked, positions).logits
            if window.refresh or "cache" not in held:
                held["cache"] = KeyValueCache(
                    _slot_order(window.first, window.stop, tokens.shape[1], device)
                    if options.dual_cache else None)
                return self(tokens, blocked, positions, cache=held["cache"]).logits
            first = window.first
            stop = window.stop if options.dual_cache else tokens.shape[1]
            held["cache"].window = (first, stop)
            window_logits = self(tokens[:, first:stop], blocked[:, :, first:stop],
                                 positions[:, first:stop], cache=held["cache"]).logits
            return Logits(window_logits, first_position=first)

        return source


class KeyValueCache:
    """Each layer's keys and values of the whole sequence at the last refresh.

    Refreshing (``window`` None) keeps them; with a ``window`` (first, stop) the model runs the
    window's positions only, attending their fresh keys and values and the kept ones of every
    other position, which are not recomputed: an approximation for a bidirectional model (they
    were computed when the window held other tokens), exact for a block-causal one whose window
    ends the sequence. megalign-generate's ``--cache`` (window to the end) and ``--dual-cache``
    (the positions after the window kept too).

    ``order``: the positions in the order attention reads their keys (``_slot_order``); None:
    position order. Attention does not depend on it, but bfloat16 rounds its sums differently
    in another order."""

    def __init__(self, order: Optional[torch.Tensor] = None):
        self.layers: list = []
        self.window: Optional[tuple[int, int]] = None
        self.order = order

    def attend(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        if self.window is None:
            self.layers.append((keys, values))
        else:
            first, stop = self.window
            kept_keys, kept_values = self.layers[layer]
            keys = torch.cat([kept_keys[:, :, :first], keys, kept_keys[:, :, stop:]], dim=2)
            values = torch.cat([kept_values[:, :, :first], values, kept_values[:, :, stop:]],
                               dim=2)
        if self.order is None:
            return keys, values
        return keys[:, :, self.order], values[:, :, self.order]


def _positions(tokens: torch.Tensor, blocked: torch.Tensor, learned: bool) -> torch.Tensor:
    """The positions megalign's model gives a left-padded batch: learned positions count each
    row's real tokens from 0; rotary ones count slots, which changes no angle between two tokens
    (RoPE is relative) and keeps the rounding of megalign's bfloat16 model."""
    if not learned:
        return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return ((~blocked[:, 0, -1, :]).long().cumsum(-1) - 1).clamp(min=0)


def x_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _slot_order(first: int, stop: int, length: int, device) -> torch.Tensor:
    """The dual cache's key order in megalign's model: the positions before the window, those
    after it, then the window (megalign.model.inference.cache_layout)."""
    return torch.cat([torch.arange(first), torch.arange(stop, length),
                      torch.arange(first, stop)]).to(device)


def _blocked(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    """([b, 1, s, s] True = blocked, [b, s] real-token flags) from a 2-D or 4-D mask."""
    b, s = input_ids.shape
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool(), torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
    valid = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
    blocked = ~valid.unsqueeze(1) | ~valid.unsqueeze(2)
    blocked &= ~torch.eye(s, dtype=torch.bool, device=input_ids.device)
    return blocked.unsqueeze(1), valid
