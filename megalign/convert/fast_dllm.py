"""megalign-convert --to fast-dllm-v2: why megalign's students are not written in Fast-dLLM v2's
format (``Fast_dLLM_QwenForCausalLM``, ``bd_size``), said before anything is written.

Fast-dLLM v2 holds block-diffusion Qwen2.5 students. Its network and training streams are those of
megalign's block diffusion under Qwen2's names, but its decoding is not: it aligns blocks to
absolute positions (the first generated block holds the prompt's tail) where megalign counts them
from the prompt's end, and it trains the token that opens a block from the noisy stream where
megalign trains (and decodes) it from the clean one. A file in its format would decode a megalign
student otherwise than it was trained whenever a prompt is not whole blocks, so the export is
refused with the difference named (docs/hugging-face.md compares the two and says what an export
would need).
"""

from __future__ import annotations

from megalign.checkpoint import resolve
from megalign.config import Config
from megalign.convert.checkpoints import export_config
from megalign.convert.dream import network_refusal
from megalign.diffusion.objective import block_diffusion
from megalign.errors import ConversionError

DECODING = ("block diffusion decoded as megalign trains it: megalign counts blocks from the "
            "prompt's end and trains the token opening a block from the clean stream, Fast-dLLM "
            "v2 aligns blocks to absolute positions and trains that token from the noisy stream")


def fast_dllm_v2_refusal(cfg: Config) -> str:
    """Why Fast-dLLM v2's format cannot hold this student (today, every student)."""
    if not block_diffusion(cfg.diffusion, cfg.model.seq_length):
        return ("a student trained without block diffusion (the format holds block-diffusion "
                "students: diffusion.block_length)")
    if not cfg.diffusion.shift:
        return "a student trained without the AR shift (diffusion.shift=false)"
    return network_refusal(cfg, "Fast-dLLM v2") or DECODING


def megalign_to_fast_dllm_v2(source: str, output: str) -> str:
    """Refused (ConversionError, nothing written), naming the reason."""
    path = resolve(source)
    cfg, _, _ = export_config(path)
    raise ConversionError(f"checkpoint '{path}': Fast-dLLM v2's format cannot hold "
                          f"{fast_dllm_v2_refusal(cfg)}; export it with --to hf, whose own code "
                          f"decodes it as it was trained (nothing written to '{output}'; "
                          "docs/hugging-face.md)")
