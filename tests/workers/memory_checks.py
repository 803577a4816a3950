"""The memory plan against built models (run under torchrun, any TP x PP x CP layout): per model
chunk, the planned parameter table against the chunk's named parameters, and the planned activation
bytes per layer against the storages autograd saves in a real forward pass (attributed to the
layer whose forward first saved them). One JSON report per rank in --out (a directory).

``--variants`` is a JSON list of override lists, each checked on its own model.
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megalign import distributed
from megalign.data.vocabulary import Vocabulary
from megalign.model import memory
from megalign.model.attention import attention_mask
from megalign.model.context_parallel import on_rank
from megalign.model.gpt import ModelBuild, build_chunks, global_parameter_name

from common import arguments, config_and_tokenizer


def saved_bytes_per_layer(chunk, cfg, vocab: int, dtype) -> list[int]:
    """Bytes of the storages autograd saves in one forward of ``chunk``, per layer."""
    m, p = cfg.model, cfg.parallel
    cp, rank = p.context_parallel_size, parallel_state.get_context_parallel_rank()
    batch, positions = cfg.data.micro_batch_size, m.seq_length // cp  # this rank's positions
    parameters = {param.untyped_storage().data_ptr() for param in chunk.parameters()}
    seen, current = {}, [None]
    layers = list(chunk.decoder.layers)
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, args, i=index: current.__setitem__(0, i))
        layer.register_forward_hook(lambda module, args, out: current.__setitem__(0, None))

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in parameters and key not in seen:
            seen[key] = (current[0], storage.nbytes())
        return tensor

    torch.manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, positions))
    position_ids = torch.arange(positions).expand(batch, positions)
    mask = on_rank(attention_mask(torch.zeros(batch, m.seq_length, dtype=torch.long),
                                  causal=False), 2, cp, rank)  # this rank's rows
    if not chunk.pre_process:
        sp = p.tensor_model_parallel_size if p.sequence_parallel else 1
        chunk.set_input_tensor(torch.randn(positions // sp, batch, m.hidden_size, dtype=dtype,
                                           requires_grad=True))
    chunk.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunk(tokens, position_ids, mask)
    return [sum(size for layer, size in seen.values() if layer == i) for i in range(len(layers))]


def main():
    args = arguments("variants")
    base, tok = config_and_tokenizer(args)
    p = base.parallel
    distributed.initialize(distributed.launch_env(), p.tensor_model_parallel_size,
                           p.pipeline_model_parallel_size, base.seed,
                           p.virtual_pipeline_model_parallel_size,
                           context_parallel=p.context_parallel_size)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    reports = []
    for overrides in json.loads(args.variants):
        cfg, _ = config_and_tokenizer(args, extra=overrides, tokenizer=False)
        vocab = Vocabulary.of(cfg, tok).padded
        dtype = torch.float32 if cfg.precision == "fp32" else torch.bfloat16
        element = 4 if dtype == torch.float32 else 2
        chunks = build_chunks(ModelBuild.of(cfg, causal=False, params_dtype=dtype), vocab)
        for index, chunk in enumerate(chunks):
            built = {global_parameter_name(name, chunk): param.numel()
                     for name, param in chunk.named_parameters()}
            planned = dict(memory.chunk_parameters(cfg, vocab, stage, index))
            measured = saved_bytes_per_layer(chunk, cfg, vocab, dtype)
            reports.append({
                "variant": overrides, "stage": stage, "chunk": index,
                "parameters_differ": sorted(set(built.items()) ^ set(planned.items())),
                "measured_layer_bytes": measured,
                "planned_layer_bytes": memory.layer_activation_bytes(
                    cfg, cfg.model.seq_length, cfg.data.micro_batch_size, element)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(reports))
    distributed.shutdown()


if __name__ == "__main__":
    main()
