"""A megalign masked diffusion LM for Hugging Face transformers, with its sampler.

megalign-convert (``--from megalign --to hf``) copies this file next to the weights, so the
directory loads with transformers alone::

    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    ids = model.diffusion_generate(tokenizer("In the beginning", return_tensors="pt").input_ids,
                                   max_new_tokens=32)

It needs only torch and transformers and never imports megalign. The network is the AR model's
(Llama family: RMSNorm, SwiGLU, RoPE with optional Llama 3 scaling, grouped-query attention,
optional QKV bias, optional RMSNorm on queries and keys (Qwen3), dense or mixture-of-experts
MLPs (Qwen3-MoE, Mixtral); or GPT-2:
LayerNorm, tanh GeLU, learned positions) with bidirectional attention; position ``i``'s logits
predict token ``i+1`` when ``config.shift`` (the AR shift kept in training). ``diffusion_generate``
follows megalign's sampler (megalign/diffusion/sampler.py) rule for rule, so the same options and
seed give the same tokens as ``megalign-generate`` for an unpadded prompt.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

CONFIDENCES = ("prob", "margin", "entropy")
RULES = ("confidence", "origin", "p2")


class MegalignDiffusionConfig(PretrainedConfig):
    model_type = "megalign_diffusion"

    def __init__(self, arch: str = "llama", vocab_size: int = 32000, hidden_size: int = 64,
                 intermediate_size: int = 128, num_hidden_layers: int = 2,
                 num_attention_heads: int = 4, num_key_value_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, qk_norm: bool = False,
                 rope_scaling_factor: Optional[float] = None, num_experts: Optional[int] = None,
                 moe_topk: int = 2, moe_intermediate_size: Optional[int] = None,
                 moe_router_pre_softmax: bool = False, max_position_embeddings: int = 128,
                 norm_epsilon: float = 1e-5,
                 rope_theta: float = 10000.0, qkv_bias: bool = False,
                 tie_word_embeddings: bool = True, mask_token_id: Optional[int] = None,
                 shift: bool = True, sample_vocab_size: Optional[int] = None,
                 document_attention: bool = True, **kwargs):
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
        self.max_position_embeddings = max_position_embeddings
        self.norm_epsilon = norm_epsilon
        self.rope_theta = rope_theta
        self.qkv_bias = qkv_bias
        self.mask_token_id = mask_token_id
        self.shift = shift
        self.sample_vocab_size = sample_vocab_size or vocab_size  # the tokenizer's real tokens
        self.document_attention = document_attention
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return _rms_norm(x, self.weight, self.eps)


class Conv1D(nn.Module):
    """GPT-2's linear layer: the weight is stored [in, out]."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inputs, outputs))
        self.bias = nn.Parameter(torch.zeros(outputs))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], -1)


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


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _attend(q, k, v, blocked):
    """q [b, H, s, d], k/v [b, G, s, d] (G groups of H/G heads), blocked [b, 1, s, s] True = no."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    probs = scores.float().masked_fill(blocked, float("-inf")).softmax(-1).to(v.dtype)
    return (probs @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MixtureOfExperts(nn.Module):
    """A softmax router (``gate``) sending each token to ``moe_topk`` SwiGLU experts, whose
    outputs are summed weighted by the router's probabilities (Qwen3-MoE, Mixtral)."""

    def __init__(self, config: MegalignDiffusionConfig):
        super().__init__()
        self.topk, self.pre_softmax = config.moe_topk, config.moe_router_pre_softmax
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config.hidden_size, config.moe_intermediate_size)
                                     for _ in range(config.num_experts))

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.gate(tokens).float()
        if self.pre_softmax:
            weights, chosen = logits.softmax(-1).topk(self.topk, dim=-1)
        else:
            top, chosen = logits.topk(self.topk, dim=-1)
            weights = top.softmax(-1)
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            rows, slot = (chosen == index).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None].to(x.dtype))
        return out.view_as(x)


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

    def forward(self, x, blocked, cos, sin):
        b, s, _ = x.shape
        a = self.self_attn
        y = self.input_layernorm(x)
        q = a.q_proj(y).view(b, s, self.heads, self.head_dim)
        k = a.k_proj(y).view(b, s, self.groups, self.head_dim)
        if hasattr(a, "q_norm"):
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = a.v_proj(y).view(b, s, self.groups, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
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

    def forward(self, x, blocked, cos=None, sin=None):
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2)
                   for t in self.attn.c_attn(self.ln_1(x)).split(h, dim=-1))
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
                position_ids: Optional[torch.Tensor] = None, **_unused) -> MaskedLMOutput:
        """``attention_mask`` [b, s] (1 = token, 0 = padding; padding is never attended) or a
        [b, 1, s, s] boolean mask (True = blocked, e.g. per-document); positions default to the
        token's index among the real tokens."""
        blocked, valid = _blocked(input_ids, attention_mask)
        if position_ids is None:
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        if self.config.arch == "gpt2":
            t = self.transformer
            x = t.wte(input_ids) + t.wpe(position_ids)
            for block in t.h:
                x = block(x, blocked)
            x = t.ln_f(x)
        else:
            m, d = self.model, self.config.head_dim
            inverse = 1.0 / (self.config.rope_theta
                             ** (torch.arange(0, d, 2, dtype=torch.float32, device=x_device(m)) / d))
            if self.config.rope_scaling_factor is not None:
                inverse = _llama3_frequencies(inverse, self.config.rope_scaling_factor)
            angles = position_ids.float().unsqueeze(-1) * inverse
            angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [b, 1, s, d]
            cos, sin = angles.cos(), angles.sin()
            x = m.embed_tokens(input_ids)
            for block in m.layers:
                x = block(x, blocked, cos, sin)
            x = m.norm(x)
        weight = self.lm_head.weight if not self.config.tie_word_embeddings else self._embedding().weight
        return MaskedLMOutput(logits=F.linear(x, weight))

    @torch.no_grad()
    def diffusion_generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                           max_new_tokens: int = 32, steps: Optional[int] = None,
                           block_length: Optional[int] = None, temperature: float = 0.0,
                           top_k: int = 0, top_p: float = 1.0, confidence: str = "prob",
                           unmasking: str = "confidence", seed: int = 0,
                           eos_token_id: Optional[int] = -1,
                           threshold: Optional[float] = None) -> torch.Tensor:
        """Prompts (rows of ``input_ids``, padding marked 0 in ``attention_mask``) followed by
        ``max_new_tokens`` denoised tokens: [b, longest prompt + max_new_tokens], prompts
        left-padded with the pad token. Options and defaults are megalign-generate's: blocks of 8
        when they tile the answer, one token per step, greedy; ``eos_token_id`` (default: the
        config's; None: no stop) ends a sample once it is decoded with nothing masked before it.
        ``threshold``: commit every masked position of the block whose confidence reaches it, at
        least one per step (parallel decoding; ``steps`` is then unused)."""
        options = _Options(max_new_tokens, steps, block_length, temperature, top_k, top_p,
                           confidence, unmasking, seed, threshold)
        eos = self.config.eos_token_id if eos_token_id == -1 else eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts = [row[keep.bool()].tolist() for row, keep in zip(input_ids, attention_mask)]
        if self.config.shift and min(len(p) for p in prompts) == 0:
            raise ValueError("with the AR shift every prompt needs at least one token")
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        tokens, valid = _left_padded(prompts, max_new_tokens, self.config.mask_token_id, pad)
        device = self._embedding().weight.device
        tokens, valid = tokens.to(device), valid.to(device)
        blocked = ~valid.unsqueeze(1) | ~valid.unsqueeze(2)
        blocked &= ~torch.eye(tokens.shape[1], dtype=torch.bool, device=device)
        blocked = blocked.unsqueeze(1)
        positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        positions = positions - (~valid).sum(-1, keepdim=True)  # 0 at each prompt's first token
        positions = positions.clamp(min=0)
        start = tokens.shape[1] - max_new_tokens

        def logits_fn(current):
            return self(current, blocked, positions).logits

        _denoise(logits_fn, tokens, start, self.config, options, eos)
        return tokens.cpu()


def x_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _blocked(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    """([b, 1, s, s] True = blocked, [b, s] real-token flags) from a 2-D or 4-D mask."""
    b, s = input_ids.shape
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.bool(), torch.ones(b, s, dtype=torch.bool, device=input_ids.device)
    valid = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
    blocked = ~valid.unsqueeze(1) | ~valid.unsqueeze(2)
    blocked &= ~torch.eye(s, dtype=torch.bool, device=input_ids.device)
    return blocked.unsqueeze(1), valid


class _Options:
    """megalign's SamplerConfig: defaults and checks."""

    def __init__(self, gen_length, steps, block_length, temperature, top_k, top_p, confidence,
                 unmasking, seed, threshold=None):
        self.gen_length = gen_length
        self.steps = gen_length if steps is None else steps
        self.block_length = block_length or (8 if gen_length % 8 == 0 else gen_length)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.confidence, self.unmasking, self.seed = confidence, unmasking, seed
        self.threshold = threshold
        if threshold is not None and unmasking != "confidence":
            raise ValueError(f"a confidence threshold does not combine with '{unmasking}'")
        if confidence not in CONFIDENCES:
            raise ValueError(f"confidence '{confidence}' is not one of {CONFIDENCES}")
        if unmasking not in RULES:
            raise ValueError(f"unmasking rule '{unmasking}' is not one of {RULES}")
        if gen_length < 1 or gen_length % self.block_length:
            raise ValueError(f"block length {self.block_length} must divide {gen_length} new tokens")
        blocks = gen_length // self.block_length
        if self.steps < blocks or self.steps % blocks:
            raise ValueError(f"steps ({self.steps}) must be a multiple of the {blocks} blocks")


def _left_padded(prompts, gen_length, mask_id, pad):
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest + gen_length), pad, dtype=torch.long)
    valid = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt) : longest] = torch.tensor(prompt, dtype=torch.long)
        valid[row, longest - len(prompt) :] = True
    tokens[:, longest:] = mask_id
    return tokens, valid


def _filtered(x, options):
    x = x / options.temperature if options.temperature > 0 else x
    if not options.top_k and options.top_p >= 1.0:
        return x
    width = x.shape[-1]
    ids = torch.arange(width, device=x.device)
    values, local = x.topk(min(options.top_k, width) if options.top_k else width, dim=-1)
    candidates = ids[local]
    if options.top_k:
        kth = values.topk(min(options.top_k, values.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
        values = values.masked_fill(values < kth, float("-inf"))
    if options.top_p < 1.0:
        by_id = candidates.argsort(-1)
        values, candidates = values.gather(-1, by_id), candidates.gather(-1, by_id)
        order = values.argsort(dim=-1, descending=True, stable=True)
        probs = values.gather(-1, order).softmax(-1)
        keep = probs.cumsum(-1) - probs <= options.top_p
        kept = candidates.gather(-1, order)
        kept = torch.where(keep, kept, torch.full_like(kept, width))
        mask = torch.zeros(x.shape[0], width + 1, dtype=torch.bool, device=x.device)
        x = x.masked_fill(~mask.scatter_(-1, kept, True)[:, :width], float("-inf"))
    return x


def _predict(logits, current, options, generator, vocab):
    """Per position: the predicted token, its confidence and the current token's (for p2)."""
    n = current.numel()
    noise = (torch.empty(n, vocab).exponential_(1, generator=generator)
             if options.temperature > 0 else None)
    x = logits.float().reshape(n, -1)
    width = x.shape[-1]
    ids = torch.arange(width, device=x.device)
    x = _filtered(x.masked_fill(ids >= vocab, float("-inf")), options)
    weights = (x - x.max(-1).values.unsqueeze(-1)).exp()
    probs = weights / weights.sum(-1).unsqueeze(-1)
    if noise is not None:
        draws = torch.ones(n, width)
        draws[:, : min(width, vocab)] = noise[:, :width]
        tokens = (probs / draws.to(x.device)).argmax(-1)
    else:
        tokens = probs.argmax(-1)
    if options.confidence == "prob":
        confidence = kept = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        if options.unmasking == "p2":
            held = current.reshape(-1).to(x.device).clamp(max=vocab - 1)
            kept = probs.gather(-1, held.unsqueeze(-1)).squeeze(-1)
    elif options.confidence == "margin":
        top2 = probs.topk(min(2, width), dim=-1).values.topk(2, dim=-1).values
        confidence = kept = top2[:, 0] - top2[:, 1]
    else:
        confidence = kept = (probs * probs.clamp_min(1e-12).log()).sum(-1)
    shape = current.shape
    return (tokens.cpu().view(shape), confidence.float().cpu().view(shape),
            kept.float().cpu().view(shape))


def _denoise(logits_fn, tokens, start, config, options, eos):
    generator = torch.Generator().manual_seed(options.seed)
    block, length = options.block_length, options.gen_length
    steps_per_block = options.steps // (length // block)
    mask_id, vocab = config.mask_token_id, config.sample_vocab_size
    done = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for block_start in range(start, start + length, block):
        region = slice(block_start, block_start + block)
        step = 0
        while not done.all():
            if options.threshold is None and step == steps_per_block:
                break
            if options.threshold is not None and not (tokens[~done.to(tokens.device)][:, region]
                                                      == mask_id).any():
                break
            logits = logits_fn(tokens)
            rows = slice(block_start - 1, block_start + block - 1) if config.shift else region
            current = tokens[:, region].cpu()
            predicted, confidence, kept = _predict(logits[:, rows], current, options, generator,
                                                   vocab)
            masked = current == mask_id
            for row in range(tokens.shape[0]):
                if done[row]:
                    continue
                if options.threshold is not None:
                    current[row] = _commit_confident(current[row], masked[row], predicted[row],
                                                     confidence[row], options.threshold)
                else:
                    current[row] = _update(current[row], masked[row], predicted[row],
                                           confidence[row], kept[row], step, steps_per_block,
                                           options, mask_id, generator)
            step += 1
            tokens[:, region] = current.to(tokens.device)
            if eos is not None:
                done |= _finish_at_eos(tokens, start, mask_id, eos)


def _update(current, masked, predicted, confidence, kept, step, steps, options, mask_id,
            generator):
    left = steps - step
    if options.unmasking == "p2":
        candidate = torch.where(masked, predicted, current)
        score = torch.where(masked, confidence, kept)
        keep = -(-len(current) * (step + 1) // steps)
        order = score.argsort(descending=True)
        result = torch.full_like(current, mask_id)
        result[order[:keep]] = candidate[order[:keep]]
        return result
    positions = masked.nonzero().flatten()
    if positions.numel() == 0:
        return current
    if options.unmasking == "origin":
        chosen = positions[torch.rand(positions.numel(), generator=generator) < 1.0 / left]
        if left == 1:
            chosen = positions
    else:
        count = -(-positions.numel() // left)
        chosen = positions[confidence[positions].topk(count).indices]
    result = current.clone()
    result[chosen] = predicted[chosen]
    return result


def _commit_confident(current, masked, predicted, confidence, threshold):
    positions = masked.nonzero().flatten()
    if positions.numel() == 0:
        return current
    chosen = positions[confidence[positions] >= threshold]
    if chosen.numel() == 0:
        chosen = positions[confidence[positions].argmax()].reshape(1)
    result = current.clone()
    result[chosen] = predicted[chosen]
    return result


def _finish_at_eos(tokens, start, mask_id, eos):
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool)
    for row in range(tokens.shape[0]):
        generated = tokens[row, start:]
        found = (generated == eos).nonzero().flatten()
        if found.numel() and not (generated[: found[0]] == mask_id).any():
            generated[found[0]:] = eos
            finished[row] = True
    return finished
