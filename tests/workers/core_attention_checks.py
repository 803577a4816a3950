"""megalign's core attention against full attention in plain PyTorch (float64, random inputs), for
each mask kind, alone (CP1) and gathered over the context-parallel group (run under torchrun with
2 processes: TP1 x PP1 x CP2), and for the per-document kinds with the documents as THD. Writes,
per mask kind, the largest differences of the outputs and of the gradients of queries, keys and
values (this rank's positions), and whether megalign's layout of the ranks' positions is
Megatron-Core's (batch split and rotary embedding)."""

import argparse
import inspect
import json
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_batch_on_this_cp_rank

from megalign import distributed
from megalign.model.attention import attention_mask, packed_documents
from megalign.model.context_parallel import on_rank, rank_positions
from megalign.model.core_attention import ContextParallelAttention

HEADS, GROUPS, HEAD_DIM, BATCH, LENGTH = 4, 2, 8, 2, 16


def reference(q, k, v, blocked):
    """softmax(q k^T / sqrt(d), blocked -> -inf) v over [s, b, heads, d] inputs."""
    repeat = HEADS // GROUPS
    k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(LENGTH, BATCH, HEADS * HEAD_DIM)


def masks(generator):
    """Mask kind -> (the spec's mask type, [b, 1, s, s] blocked or None, the reference's mask
    where the spec's type implies it, the documents for THD or None)."""
    docs = torch.randint(0, 2, (BATCH, LENGTH), generator=generator).cumsum(1)
    blocks = torch.arange(LENGTH) // 4
    block_causal = (blocks.unsqueeze(1) < blocks.unsqueeze(0))[None, None].expand(BATCH, 1, -1, -1)
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).triu(1)[None, None]
    return {
        "bidirectional": (AttnMaskType.no_mask, None, None, None),
        "causal": (AttnMaskType.causal, None, causal, None),
        "documents": (AttnMaskType.arbitrary, attention_mask(docs, causal=False), None, docs),
        "documents_causal": (AttnMaskType.arbitrary, attention_mask(docs, causal=True), None,
                             docs),
        "block_causal": (AttnMaskType.arbitrary, block_causal.contiguous(), None, None),
    }


def packed_check(q, k, v, grad_out, expected, expected_grads, docs, causal: bool) -> dict:
    """The documents as THD (the samples one after the other, PackedSeqParams) on one rank."""
    def thd(x):  # [s, b, ...] -> [b·s, ...]
        return x.transpose(0, 1).reshape(BATCH * LENGTH, *x.shape[2:])

    parts = [thd(x).detach().clone().requires_grad_() for x in (q, k, v)]
    module = attention(1, AttnMaskType.causal if causal else AttnMaskType.no_mask)
    out = module(*parts, None, packed_seq_params=packed_documents(docs))
    out.backward(thd(grad_out))
    return {"out": largest(out, thd(expected))} | {
        f"grad_{name}": largest(part.grad, thd(grad))
        for name, part, grad in zip("qkv", parts, expected_grads)}


def attention(cp_size: int, mask_type) -> ContextParallelAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM,
                               num_attention_heads=HEADS, num_query_groups=GROUPS,
                               kv_channels=HEAD_DIM, context_parallel_size=cp_size,
                               params_dtype=torch.float64, attention_dropout=0.0,
                               use_cpu_initialization=True)
    return ContextParallelAttention(config, 1, mask_type, "self")


def largest(a, b) -> float:
    return float((a - b).abs().max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    distributed.initialize(distributed.launch_env(), 1, 1, seed=5, context_parallel=2)
    cp, rank = parallel_state.get_context_parallel_world_size(), \
        parallel_state.get_context_parallel_rank()
    generator = torch.Generator().manual_seed(11)  # the same inputs on every rank
    shape = (LENGTH, BATCH)
    q = torch.randn(*shape, HEADS, HEAD_DIM, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(*shape, GROUPS, HEAD_DIM, generator=generator, dtype=torch.float64)
            for _ in range(2))
    grad_out = torch.randn(*shape, HEADS * HEAD_DIM, generator=generator, dtype=torch.float64)
    mine = rank_positions(LENGTH, cp, rank)
    results = {}
    for kind, (mask_type, mask, reference_mask, docs) in masks(generator).items():
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        expected = reference(*inputs, mask if mask is not None else reference_mask)
        expected.backward(grad_out)
        expected_grads = [x.grad for x in inputs]
        checks = {}
        for label, size in (("alone", 1), ("cp2", cp)):
            parts = [on_rank(x, 0, size, rank).detach().clone().requires_grad_()
                     for x in (q, k, v)]
            rows = on_rank(mask, 2, size, rank) if mask is not None else None
            out = attention(size, mask_type)(*parts, rows)
            out.backward(on_rank(grad_out, 0, size, rank))
            held = mine if size > 1 else torch.arange(LENGTH)
            checks[label] = {"out": largest(out, expected[held])} | {
                f"grad_{name}": largest(part.grad, grad[held])
                for name, part, grad in zip("qkv", parts, expected_grads)}
        if docs is not None:
            checks["thd"] = packed_check(q, k, v, grad_out, expected, expected_grads, docs,
                                         causal=kind.endswith("causal"))
        results[kind] = checks
    # megalign's layout is Megatron-Core's: its batch split and its rotary embedding's
    positions = torch.arange(LENGTH).unsqueeze(0)
    hybrid = ({"is_hybrid_cp": False}  # a required argument from Megatron-Core 0.19
              if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters
              else {})
    split = get_batch_on_this_cp_rank({"tokens": positions.clone()}, **hybrid)["tokens"][0]
    rotary = get_pos_emb_on_this_cp_rank(torch.arange(LENGTH).view(LENGTH, 1, 1, 1), 0,
                                         parallel_state.get_context_parallel_group())
    results["layout"] = {"batch": torch.equal(split, mine),
                         "rotary": torch.equal(rotary.flatten(), mine)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(gathered, handle)
    distributed.shutdown()


if __name__ == "__main__":
    main()
