"""Logits of a GGUF file computed by llama.cpp (through llama-cpp-python's bindings to its C API),
attending non-causally as llama.cpp's diffusion runner does: every position of each row of
--tokens, saved to --out as a [rows, positions, vocabulary] tensor. ``--texts`` (a JSON list):
also llama.cpp's tokenization of each text, without special tokens, to --out.tokens.json.
megalign cannot be imported here."""

import argparse
import json
import sys

sys.modules["megalign"] = None  # any import of megalign fails

import llama_cpp as llama  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--gguf", required=True)
parser.add_argument("--tokens", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--texts")
args = parser.parse_args()

tokens = torch.load(args.tokens)
rows, length = tokens.shape
llama.llama_backend_init()
model = llama.llama_model_load_from_file(args.gguf.encode(), llama.llama_model_default_params())
assert model, f"llama.cpp could not load {args.gguf}"
vocabulary = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
params = llama.llama_context_default_params()
params.n_ctx = params.n_batch = params.n_ubatch = length  # one ubatch: attention sees every key
params.n_threads = params.n_threads_batch = 1
params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED  # fp32 keys and values
context = llama.llama_init_from_model(model, params)
llama.llama_set_causal_attn(context, False)
logits = torch.empty(rows, length, vocabulary)
for row in range(rows):
    memory = llama.llama_get_memory(context)
    if memory:
        llama.llama_memory_clear(memory, True)
    batch = llama.llama_batch_init(length, 0, 1)
    for position, token in enumerate(tokens[row].tolist()):
        batch.token[position], batch.pos[position] = token, position
        batch.n_seq_id[position], batch.seq_id[position][0] = 1, 0
        batch.logits[position] = True
    batch.n_tokens = length
    assert llama.llama_decode(context, batch) == 0
    for position in range(length):
        row_logits = llama.llama_get_logits_ith(context, position)
        logits[row, position] = torch.from_numpy(
            np.ctypeslib.as_array(row_logits, shape=(vocabulary,)).copy())
    llama.llama_batch_free(batch)
torch.save(logits, args.out)
if args.texts:
    vocab = llama.llama_model_get_vocab(model)
    encoded = []
    with open(args.texts, encoding="utf-8") as handle:
        for text in json.load(handle):
            data = text.encode("utf-8")
            room = (llama.llama_token * (len(data) + 8))()
            count = llama.llama_tokenize(vocab, data, len(data), room, len(room), False, False)
            assert count >= 0, text
            encoded.append(list(room[:count]))
    with open(args.out + ".tokens.json", "w", encoding="utf-8") as handle:
        json.dump(encoded, handle)
llama.llama_free(context)
llama.llama_model_free(model)
