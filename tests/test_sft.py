"""Diffusion SFT data: megalign-preprocess --sft writes tokens and a loss-mask stream document for
document; training reads them sample for sample; only response tokens are noised and supervised
(the layouts and the plain PyTorch reference are in test_equivalence.py)."""

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders

from megalign.config import Config, DiffusionConfig
from megalign.data.preprocess import preprocess
from megalign.data.sft import loss_mask_prefix
from megalign.data.tokenizer import build_tokenizer
from megalign.data.vocabulary import Vocabulary
from megalign.diffusion.objective import MaskedDiffusion, make_batch
from megalign.errors import ConfigError, DataError

from conftest import REPO, TOKENIZER, chat_tokenizer, run_env

# SmolLM2's layout with spaces for newlines (the tiny tokenizer has no newline)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens, masks = IndexedDataset(prefix), IndexedDataset(loss_mask_prefix(prefix))
    return ([tokens[i].tolist() for i in range(len(tokens))],
            [masks[i].tolist() for i in range(len(masks))])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.unit
def test_prompt_response_pairs(tmp_path):
    tok = build_tokenizer(str(TOKENIZER))
    records = [{"q": "Who created the heaven?", "a": "God created the heaven and the earth."},
               {"q": "And the earth?", "a": "Without form, and void."}]
    prefix = preprocess([_write(tmp_path / "in.jsonl", records)], str(TOKENIZER),
                        str(tmp_path / "out"), sft="q:a")
    assert prefix.endswith("out_sft_document")
    documents, masks = _read(prefix)
    for record, ids, mask in zip(records, documents, masks):
        prompt, response = tok.encode(record["q"]), tok.encode(record["a"])
        assert ids == prompt + response + [tok.eod]  # the response ends the document: it stops
        assert mask == [0] * len(prompt) + [1] * (len(response) + 1)


@pytest.mark.unit
def test_chat_messages_supervise_every_assistant_turn(tmp_path):
    _, directory = chat_tokenizer(tmp_path, CHAT_TEMPLATE)
    tok = build_tokenizer(str(directory))
    messages = [{"role": "user", "content": "In the beginning"},
                {"role": "assistant", "content": "God created the heaven"},
                {"role": "user", "content": "and"},
                {"role": "assistant", "content": "the earth"}]
    prefix = preprocess([_write(tmp_path / "in.jsonl", [{"messages": messages}])], str(directory),
                        str(tmp_path / "out"), sft="messages")
    [ids], [mask] = _read(prefix)
    pieces = Tokenizer.from_file(str(directory / "tokenizer.json"))

    def text(keep):  # the byte-level pieces, special tokens included; whitespace normalised
        # (this tokenizer prefixes each separately tokenized piece with a space)
        return " ".join(decoders.ByteLevel().decode(
            [pieces.id_to_token(i) for i, m in zip(ids, mask) if keep(m)]).split()) + " "

    assert text(lambda m: m) == "God created the heaven<|im_end|> the earth<|im_end|> "
    assert text(lambda m: not m) == ("<|im_start|> user In the beginning<|im_end|> <|im_start|> "
                                     "assistant <|im_start|> user and<|im_end|> <|im_start|> "
                                     "assistant <|endoftext|> ")
    assert ids[-1] == tok.eod and mask[-1] == 0  # the separator between conversations


@pytest.mark.unit
@pytest.mark.parametrize("records, options, message", [
    ([{"q": "x"}], "q:a", "in.jsonl:1: key 'a' is missing, empty or not a string"),
    ([{"messages": "hi"}], "messages", "in.jsonl:1: key 'messages' is not a list of messages"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
     "messages", "in.jsonl:1: a SentencePiece tokenizer has no chat template"),
    ([{"messages": [{"role": "user", "content": "x"}]}], "messages",
     "in.jsonl:1: the conversation has no assistant turn to supervise"),
    ([{"q": "x", "a": "y"}], "q:", "--sft 'q:': give PROMPT_KEY:RESPONSE_KEY"),
])
def test_bad_instruction_data_names_the_line(tmp_path, records, options, message):
    with pytest.raises(DataError, match=message):
        preprocess([_write(tmp_path / "in.jsonl", records)], str(TOKENIZER), str(tmp_path / "out"),
                   sft=options)
    assert not list(tmp_path.glob("out*"))  # nothing left behind


def test_the_command_refuses_partitions_in_one_line(tmp_path):
    source = _write(tmp_path / "in.jsonl", [{"q": "x", "a": "y"}])
    result = subprocess.run([sys.executable, "-m", "megalign.cli.preprocess", "--input", source,
                             "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "o"),
                             "--sft", "q:a", "--partitions", "2"], cwd=REPO, env=run_env(),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "megalign-preprocess: error: --sft writes one pass: use --workers instead of --partitions"]


@pytest.mark.unit
def test_training_samples_carry_their_documents_loss_mask(sft_prefix, corpus_prefix, tmp_path):
    from megalign.data.dataset import build_datasets, micro_batches

    tok = build_tokenizer(str(TOKENIZER))
    train, _, _ = build_datasets([sft_prefix], tok, 128, "98,2,0", 1, [64, 0, 0], str(tmp_path),
                                 True, loss_mask=True)
    for batch in [b for _, b in zip(range(8), micro_batches(train, 0, 4, 0, 1))]:
        tokens, response = batch["tokens"], batch["response"]
        # every document ends its response with an EOD; the next one starts with its prompt
        assert response[tokens == tok.eod].all()
        assert not response[:, 1:][tokens[:, :-1] == tok.eod].any()
        assert 0.2 < response.float().mean() < 0.8
    with pytest.raises(ConfigError, match="data.sft=true but .*_loss_mask.idx' does not exist"):
        build_datasets([corpus_prefix], tok, 128, "98,2,0", 1, [64, 0, 0], str(tmp_path), True,
                       loss_mask=True)


@pytest.mark.unit
def test_prompt_tokens_are_never_noised_and_masked_responses_always_supervised():
    vocab = Vocabulary(size=40, padded=64, mask=3, eod=2, pad=0)
    cfg = Config(seed=5, diffusion=DiffusionConfig(eps=0.4))  # t >= 0.4: many tokens masked
    tokens = torch.arange(10, 43).unsqueeze(0).repeat(64, 1)
    tokens[:, 20] = 2
    response = torch.zeros(64, 33, dtype=torch.bool)
    response[:, 8:21] = response[:, 27:] = True
    batch = make_batch(tokens, torch.arange(32).expand(64, 32), torch.arange(64),
                       MaskedDiffusion.of(cfg), vocab,
                       response=response)
    masked = batch.input_tokens == vocab.mask
    assert not masked[~response[:, :32]].any()
    assert masked.any()
    # position i is supervised exactly when token i+1 is a masked response token (the shift)
    target_masked = torch.zeros(64, 32, dtype=torch.bool)
    target_masked[:, :31] = masked[:, 1:]
    assert torch.equal(batch.supervised[:, :31], target_masked[:, :31] & (tokens[:, :31] != 2))
    assert not batch.supervised[:, :7].any()  # targets 1..7 are prompt tokens
