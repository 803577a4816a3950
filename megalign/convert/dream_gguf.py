"""megalign -> a GGUF file for llama.cpp's diffusion runner (``llama-diffusion-cli``):
``megalign-convert --from megalign --to gguf``. Dense students as llama.cpp's ``dream``
architecture (Qwen2's network); mixture-of-experts students with RMSNorm on queries and keys and
no shared expert as one of its two diffusion MoE architectures, by their router: ``rnd1``
(Radical Numerics' diffusion model converted from Qwen3-30B-A3B: Qwen3-MoE's network, the top-k
weights renormalised) or ``llada-moe`` (inclusionAI's LLaDA-MoE: the top-k weights of the softmax
over all experts kept as they are, heads x head size = hidden size, an output layer of its own).

Written with the ``gguf`` package: the architecture's hyperparameters, non-causal attention,
``diffusion.shift_logits`` (whether position i's logits predict token i + 1, as megalign trains
by default), the mask token id, the tensors under llama.cpp's names (``gguf``'s own table for the
architecture; each layer's experts stacked into one tensor per projection, as llama.cpp holds
them) and the SentencePiece vocabulary the student was trained with (pieces, scores and types as
the ``.model`` holds them; the padded rows unused, the mask row a control token). What the file
cannot hold is refused before anything is read or written: what Dream's format cannot
(``dream_refusal``) or llama.cpp's MoE architectures cannot (``moe_refusal``), Llama 3.x RoPE
scaling (no graph has a frequency table), and tokenizers other than SentencePiece: a BPE
tokenizer's GGUF names its pre-tokenizer from llama.cpp's own tables, so for those ``--to dream``
and llama.cpp's ``convert_hf_to_gguf.py`` make the file.
"""

# Imports inside functions are deliberate here: gguf and sentencepiece's model proto are read
# only when a file is written.

from __future__ import annotations

import os
from typing import Optional

from megalign.checkpoint import resolve
from megalign.config import Config
from megalign.convert.checkpoints import export_config, student_for_export
from megalign.convert.dream import MASK_TOKEN, dream_refusal, dream_state
from megalign.diffusion.objective import block_diffusion
from megalign.errors import ConversionError
from megalign.model.gpt import ffn_hidden_size

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # each expert's SwiGLU, Hugging Face's names


def moe_architecture(cfg: Config) -> str:
    """llama.cpp's diffusion architecture for this mixture-of-experts student's router:
    ``llada-moe`` when the top-k weights are not renormalised, else ``rnd1``."""
    return "llada-moe" if cfg.model.moe_router_pre_softmax else "rnd1"


def moe_refusal(cfg: Config) -> Optional[str]:
    """Why neither of llama.cpp's mixture-of-experts diffusion architectures (RND1, LLaDA-MoE:
    RMSNorm on queries and keys, attending non-causally) can hold this student, or None."""
    m, d = cfg.model, cfg.diffusion
    if not m.qk_norm:
        return ("a mixture of experts without RMSNorm on queries and keys (llama.cpp's "
                "mixture-of-experts diffusion architectures, RND1 and LLaDA-MoE, have it)")
    if m.qkv_bias:
        return "q/k/v biases (RND1 and LLaDA-MoE have none)"
    if m.moe_shared_expert_ffn_hidden_size:
        return "a shared expert (RND1 and LLaDA-MoE have none)"
    if (moe_architecture(cfg) == "llada-moe"
            and m.num_attention_heads * m.kv_channels != m.hidden_size):
        return (f"expert weights not renormalised over the top k (model.moe_router_pre_softmax="
                f"true) with {m.num_attention_heads} heads of {m.kv_channels} != hidden size "
                f"{m.hidden_size} (LLaDA-MoE, which does not renormalise, has heads x head size "
                "= hidden size; RND1, which allows other head sizes, renormalises)")
    if block_diffusion(d, m.seq_length):
        return (f"block diffusion (blocks of {d.block_length}): llama.cpp's diffusion graphs "
                "attend the whole sequence, not block-causally")
    return None


def gguf_refusal(cfg: Config) -> Optional[str]:
    """Why megalign cannot write this student as a GGUF file llama.cpp's diffusion runner reads,
    or None."""
    if cfg.model.num_experts:
        why = moe_refusal(cfg)
        if why:
            return (f"llama.cpp's mixture-of-experts diffusion architectures cannot hold {why}; "
                    "export it with --to hf")
    else:
        why = dream_refusal(cfg)
        if why:
            return f"Dream's format cannot hold {why}; export it with --to hf instead"
    if cfg.model.rope_scaling_factor is not None:
        return ("llama.cpp's Dream, RND1 and LLaDA-MoE architectures have no Llama 3.x RoPE "
                "scaling (model.rope_scaling_factor)")
    source = cfg.data.tokenizer
    if not source or not source.endswith(".model"):
        return ("megalign writes the GGUF vocabulary of SentencePiece tokenizers (data.tokenizer: "
                f"{source or 'none recorded'}); for others export with --to dream and run "
                "llama.cpp's convert_hf_to_gguf.py on the directory, which names their "
                "pre-tokenizer")
    return None


def megalign_to_gguf(source: str, output: str) -> str:
    """The megalign checkpoint ``source`` as the GGUF file ``output``; returns its path. Written
    to a temporary sibling renamed once complete."""
    path = resolve(source)
    if not output.endswith(".gguf"):
        raise ConversionError(f"--output '{output}': name a .gguf file")
    cfg, meta, tokenizer = export_config(path)
    why = gguf_refusal(cfg)
    if why:
        raise ConversionError(f"checkpoint '{path}': {why}")
    hf_state = student_for_export(path, cfg, meta, tokenizer)
    state = moe_state(cfg, hf_state) if cfg.model.num_experts else dream_state(cfg, hf_state)
    temp = f"{output}.tmp-{os.getpid()}"
    try:
        _write(cfg, state, tokenizer, temp)
        os.replace(temp, output)
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return output


def moe_state(cfg: Config, hf_state: dict) -> dict:
    """The student's tensors under Hugging Face names, each layer's experts stacked into one
    [experts, out, in] tensor per projection (``mlp.experts.gate_proj``, ...), as llama.cpp holds
    them; a tied embedding is written once for RND1 (which reads it as the output layer) and
    twice for LLaDA-MoE (which requires an output layer)."""
    import torch

    m, state = cfg.model, dict(hf_state)
    if m.tie_embeddings and moe_architecture(cfg) == "rnd1":
        state.pop("lm_head.weight", None)
    elif m.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for layer in range(m.num_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        for projection in PROJECTIONS:
            state[f"{prefix}{projection}.weight"] = torch.stack([
                state.pop(f"{prefix}{e}.{projection}.weight") for e in range(m.num_experts)])
    return state


def sentencepiece_vocabulary(cfg: Config) -> tuple[list[bytes], list[float], list[int]]:
    """(tokens, scores, types) of every row of the padded vocabulary: the ``.model``'s pieces,
    then the mask row (a control token, when past the pieces) and unused padding rows."""
    import gguf
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    with open(cfg.data.tokenizer, "rb") as handle:
        proto.ParseFromString(handle.read())
    tokens = [piece.piece.encode("utf-8") for piece in proto.pieces]
    scores = [piece.score for piece in proto.pieces]
    types = [int(piece.type) for piece in proto.pieces]  # SentencePiece's numbering is GGUF's
    for row in range(len(tokens), cfg.model.padded_vocab_size):
        mask = row == cfg.diffusion.mask_token_id
        tokens.append(MASK_TOKEN.encode() if mask else f"[PAD{row}]".encode())
        scores.append(0.0)
        types.append(int(gguf.TokenType.CONTROL if mask else gguf.TokenType.UNUSED))
    return tokens, scores, types


def _write(cfg: Config, state: dict, tokenizer, path: str) -> None:
    import gguf

    m = cfg.model
    arch = (gguf.MODEL_ARCH.DREAM if not m.num_experts else
            gguf.MODEL_ARCH.LLADA_MOE if moe_architecture(cfg) == "llada-moe" else
            gguf.MODEL_ARCH.RND1)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name("megalign diffusion student")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(m.max_position_embeddings or m.seq_length)
    writer.add_embedding_length(m.hidden_size)
    writer.add_block_count(m.num_layers)
    writer.add_feed_forward_length(ffn_hidden_size(m))
    writer.add_head_count(m.num_attention_heads)
    writer.add_head_count_kv(m.query_groups)
    writer.add_key_length(m.kv_channels)
    writer.add_value_length(m.kv_channels)
    if m.num_experts:
        writer.add_expert_count(m.num_experts)
        writer.add_expert_used_count(m.moe_topk)
        writer.add_expert_feed_forward_length(m.moe_ffn_hidden_size or ffn_hidden_size(m))
    writer.add_rope_freq_base(float(m.rotary_base))
    writer.add_layer_norm_rms_eps(m.norm_epsilon)
    writer.add_causal_attention(False)
    writer.add_diffusion_shift_logits(cfg.diffusion.shift)
    tokens, scores, types = sentencepiece_vocabulary(cfg)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_eos_token_id(tokenizer.eod)
    writer.add_pad_token_id(tokenizer.pad)
    writer.add_mask_token_id(cfg.diffusion.mask_token_id)
    writer.add_add_bos_token(False)  # megalign encodes as SentencePiece does: no BOS, no EOS
    writer.add_add_eos_token(False)
    names = gguf.get_tensor_name_map(arch, m.num_layers)
    for name, tensor in sorted(state.items()):
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"tensor {name} has no name in llama.cpp's "
                                  f"{gguf.MODEL_ARCH_NAMES[arch]} architecture")
        writer.add_tensor(gguf_name, tensor.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
