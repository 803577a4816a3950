"""megalign-generate: sample from a trained diffusion student (and, with --ar, its AR teacher).

    megalign-generate --checkpoint RUN/checkpoints --prompt "In the beginning" [--gen-length 32]
    torchrun --nproc-per-node 2 -m megalign.generate --checkpoint ... --prompt-file prompts.txt \\
        parallel.pipeline_model_parallel_size=2

Decoding defaults to what diffusion LMs are decoded with in practice: semi-autoregressive blocks
of 8 tokens, one token committed per step (``--steps`` = ``--gen-length``), greedy.
The checkpoint (a root with ``latest`` or an ``iter_`` directory) records its config, tokenizer
included; it is resharded into the layout this command is launched with (one process: TP=1,
PP=1; under torchrun any TP/PP, via trailing ``parallel.*=N`` overrides). Prompts come from
``--prompt`` (repeatable) or ``--prompt-file`` (one per line, or JSONL with a "prompt" key); all
are decoded as one batch. Output: one JSON line per prompt on stdout, or ``--output FILE``.
``--ar`` also decodes each prompt with the AR model the run started from (greedy, or sampled
with ``--temperature``), for a side-by-side comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if line.lstrip().startswith("{"):
                    try:
                        line = json.loads(line)["prompt"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{args.prompt_file}:{number}: expected {{\"prompt\": ...}}") from None
                prompts.append(line)
    if not prompts:
        raise ValueError("give --prompt TEXT or --prompt-file FILE")
    return prompts


def load_config_from_checkpoint(path: str, overrides: list[str]):
    from megalign.checkpoint import CheckpointError, read_meta
    from megalign.config import config_from_dict, parse_override, set_dotted

    meta = read_meta(path)
    tree = meta.get("config")
    if tree is None:
        raise CheckpointError(f"checkpoint '{path}' records no config")
    tree.setdefault("parallel", {}).update(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, sequence_parallel=False)
    tree["model"]["document_attention"] = True  # explicit masks keep batch padding out
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return config_from_dict(tree), meta


@dataclass
class Opened:
    """A checkpoint's config and tokenizer, before any process group or weights exist."""

    path: str
    cfg: object
    meta: dict
    tokenizer: object
    vocab: int  # padded vocabulary rows of the model
    mask_id: int


def open_checkpoint(checkpoint: str, overrides: list[str]) -> Opened:
    """Resolve ``checkpoint`` and read what inference needs; fails early without a mask token."""
    from megalign.checkpoint import resolve
    from megalign.config import ConfigError, mask_token_id, padded_vocab_size
    from megalign.data.tokenizer import build_tokenizer

    path = resolve(checkpoint)
    cfg, meta = load_config_from_checkpoint(path, overrides)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    vocab = padded_vocab_size(cfg, tokenizer.vocab_size, tokenizer.mask)
    mask = mask_token_id(cfg, tokenizer.vocab_size, tokenizer.mask)
    if mask >= vocab:
        raise ConfigError(f"the model has no mask token (id {mask} >= vocabulary {vocab})")
    return Opened(path, cfg, meta, tokenizer, vocab, mask)


def load_student(opened: Opened) -> list:
    """The bidirectional student's chunks, resharded into the launch layout (``parallel.*`` of the
    config; one process: TP=1, PP=1); starts the process groups unless they exist."""
    from megatron.core import parallel_state

    from megalign import distributed
    from megalign.checkpoint import load_checkpoint
    from megalign.model.gpt import build_chunks

    cfg = opened.cfg
    if not parallel_state.model_parallel_is_initialized():
        distributed.initialize(distributed.launch_env(), cfg.parallel.tensor_model_parallel_size,
                               cfg.parallel.pipeline_model_parallel_size, cfg.seed)
    chunks = build_chunks(cfg, opened.vocab, causal=False, params_dtype=torch.float32)
    load_checkpoint(opened.path, chunks)
    return chunks


def load_ar_model(cfg, meta: dict, path: str, vocab: int) -> list:
    """The causal AR model a run started from (``meta['ar_checkpoint']``), for --ar."""
    from megalign.checkpoint import CheckpointError, load_checkpoint
    from megalign.model.gpt import build_chunks

    teacher = meta.get("ar_checkpoint")
    if not teacher:
        raise CheckpointError(f"checkpoint '{path}' records no AR checkpoint for --ar")
    cfg.model.document_attention = False
    causal = build_chunks(cfg, vocab, causal=True, params_dtype=torch.float32)
    load_checkpoint(teacher, causal)
    return causal


def ar_decode(chunks, prompt: list[int], length: int, vocab: int, temperature: float,
              seed: int) -> list[int]:
    """Left-to-right decoding with a causal model (the full sequence is recomputed each token)."""
    from megalign.model.inference import forward_logits

    generator = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    for _ in range(length):
        x = torch.tensor([tokens])
        logits = forward_logits(chunks, x, torch.arange(len(tokens)).unsqueeze(0), None)
        row = logits[0, -1, :vocab].cpu()
        if temperature > 0:
            tokens.append(int(torch.multinomial((row / temperature).softmax(-1), 1, generator=generator)))
        else:
            tokens.append(int(row.argmax()))
    return tokens[len(prompt):]


def build_parser() -> argparse.ArgumentParser:
    from megalign.diffusion.sampler import CONFIDENCES, DEFAULT_BLOCK_LENGTH, RULES, SamplerConfig

    parser = argparse.ArgumentParser(prog="megalign-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", action="append")
    parser.add_argument("--prompt-file")
    parser.add_argument("--output", help="write JSON lines here instead of stdout")
    parser.add_argument("--gen-length", type=int, default=SamplerConfig.gen_length)
    parser.add_argument("--steps", type=int,
                        help="denoising steps in all (default: --gen-length, one token per step)")
    parser.add_argument("--block-length", type=int,
                        help=f"semi-autoregressive block size (default: {DEFAULT_BLOCK_LENGTH} "
                             "when it divides --gen-length, else the whole length)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--confidence", choices=CONFIDENCES, default="prob")
    parser.add_argument("--unmasking", choices=RULES, default="confidence")
    parser.add_argument("--no-eos-stop", action="store_true", help="do not stop at the EOD token")
    parser.add_argument("--ar", action="store_true", help="also decode with the AR teacher")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.*=N")
    return parser


def sampler_config(args, eos_id) -> "SamplerConfig":
    """The sampler settings of parsed arguments (unset ones take the sampler's defaults)."""
    from megalign.diffusion.sampler import SamplerConfig

    return SamplerConfig(args.gen_length, args.steps, args.block_length, args.temperature,
                         args.top_k, args.top_p, args.confidence, args.unmasking,
                         None if args.no_eos_stop else eos_id, args.seed)


def main(argv=None) -> int:
    from megalign import distributed
    from megalign.checkpoint import CheckpointError
    from megalign.config import ConfigError
    from megalign.diffusion.sampler import sample
    from megalign.model.inference import sampler_logits

    args = build_parser().parse_args(argv)
    try:
        prompts = read_prompts(args)
        opened = open_checkpoint(args.checkpoint, args.overrides)
        cfg, tokenizer = opened.cfg, opened.tokenizer
        encoded = [tokenizer.encode(p) for p in prompts]
        longest = max(len(ids) for ids in encoded)
        if longest + args.gen_length > cfg.model.seq_length:
            raise ConfigError(
                f"the longest prompt ({longest} tokens) + --gen-length {args.gen_length} exceeds "
                f"the model's context of {cfg.model.seq_length} tokens"
            )
        sampler = sampler_config(args, tokenizer.eod)
        sampler.check()
        chunks = load_student(opened)
        outputs = sample(sampler_logits(chunks), encoded, opened.mask_id, tokenizer.pad,
                         tokenizer.vocab_size, cfg.diffusion.shift, sampler)
        records = [{"prompt": p, "completion": tokenizer.decode(until_eos(o, sampler.eos_id))}
                   for p, o in zip(prompts, outputs)]
        if args.ar:
            causal = load_ar_model(cfg, opened.meta, opened.path, opened.vocab)
            for record, ids in zip(records, encoded):
                ar = ar_decode(causal, ids, args.gen_length, tokenizer.vocab_size,
                               args.temperature, args.seed)
                record["ar_completion"] = tokenizer.decode(until_eos(ar, sampler.eos_id))
        if distributed.launch_env().rank == 0:
            lines = "".join(json.dumps(r) + "\n" for r in records)
            if args.output:
                with open(args.output, "w", encoding="utf-8") as handle:
                    handle.write(lines)
            else:
                sys.stdout.write(lines)
                sys.stdout.flush()
    except (CheckpointError, ValueError, OSError) as err:  # ValueError includes ConfigError
        print(f"megalign-generate: error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


def until_eos(ids: list[int], eos_id) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


if __name__ == "__main__":
    sys.exit(main())
