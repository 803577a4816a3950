"""Tokenizers as Megatron-Core's datasets and megalign see them.

Megatron-Core's ``GPTDataset`` only needs ``vocab_size``, ``eod``, ``pad`` and
``unique_identifiers``; megalign adds ``eod_token`` (the text of ``eod``), ``mask`` (the
vocabulary's mask-token id, or ``None`` when it has none and a padded row is used), ``encode``,
``encode_batch`` and ``decode``. Three kinds are read: a SentencePiece ``.model`` file, a Hugging
Face ``tokenizer.json`` (``tokenizers``), and a Hugging Face pretrained directory
(``transformers``; remote code is never run).

The end-of-document token, the same rule for all three kinds: an explicit choice
(``megalign-preprocess --eod-token``, ``data.eod_token`` in training; a token's text or its id)
wins; else the first of ``EOD_CANDIDATES`` the vocabulary holds (dedicated end-of-text tokens
before ``</s>``-style ones, chat end-of-turn tokens last); else the tokenizer's own eos token.
Why: one model's tokenizer must separate documents the same way however it is passed, and chat
models name their end-of-turn token (``<|im_end|>``) as eos although pretraining documents end
with ``<|endoftext|>``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Optional, Union

import sentencepiece as spm

SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "eod": "</s>", "mask": "<mask>"}
# End-of-document tokens tried in order when none is given (see the module docstring).
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
MASK_CANDIDATES = ("<mask>", "<|mask|>", "[MASK]")


class TokenizerError(ValueError):
    """No usable end-of-document token; the message names the tokenizer and what to do."""


def choose_eod(
    path: str,
    explicit: Union[str, int, None],
    token_id: Callable[[str], Optional[int]],
    token_text: Callable[[int], str],
    vocab_size: int,
    eos_token: Optional[str],
) -> tuple[str, int]:
    """(text, id) of the end-of-document token by the module's rule; ``explicit`` is a token's
    text or its id (all digits: a token whose text is a number is chosen by its id)."""
    if explicit is not None and str(explicit).isascii() and str(explicit).isdigit():
        if int(explicit) >= vocab_size:
            raise TokenizerError(f"end-of-document id {explicit} is outside tokenizer '{path}' "
                             f"(ids 0..{vocab_size - 1}); give one of its tokens or ids")
        return token_text(int(explicit)), int(explicit)
    if explicit is not None:
        if token_id(str(explicit)) is None:
            raise TokenizerError(f"tokenizer '{path}' has no token '{explicit}' to end documents "
                             "with; give one of its tokens or ids")
        return str(explicit), token_id(str(explicit))
    for text in (*EOD_CANDIDATES, eos_token):
        if text and token_id(text) is not None:
            return text, token_id(text)
    raise TokenizerError(f"tokenizer '{path}' has no end-of-document token (looked for "
                     f"{', '.join(EOD_CANDIDATES)} and an eos token); name one with --eod-token "
                     "(data.eod_token in training)")


class SentencePieceTokenizer:
    """A SentencePiece model file with eod/pad/mask pieces (see ``train_sentencepiece``)."""

    def __init__(self, model_file: str, eod_token: Union[str, int, None] = None):
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        eos = self._sp.id_to_piece(self._sp.eos_id()) if self._sp.eos_id() >= 0 else None
        self.eod_token, self.eod = choose_eod(model_file, eod_token, self._piece_id,
                                              self._sp.id_to_piece, self.vocab_size, eos)
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod
        self.mask = self._piece_id(SPECIAL_PIECES["mask"])
        self.unique_identifiers = _identifiers(self, model_file)

    def _piece_id(self, piece: str) -> Optional[int]:
        piece_id = self._sp.piece_to_id(piece)
        return piece_id if self._sp.id_to_piece(piece_id) == piece else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """One thread: parallelism comes from megalign-preprocess's worker processes."""
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        raise ValueError("a SentencePiece tokenizer has no chat template; use --sft "
                         "PROMPT_KEY:RESPONSE_KEY")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` file or pretrained tokenizer directory."""

    def __init__(self, path: str, eod_token: Union[str, int, None] = None):
        from tokenizers import Tokenizer

        if os.path.isdir(path):
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            self._tok = hf.backend_tokenizer
            eos_token, pad_token = hf.eos_token, hf.pad_token
            self._chat = hf if getattr(hf, "chat_template", None) else None
        else:
            self._tok = Tokenizer.from_file(path)
            eos_token = pad_token = None
            self._chat = None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_token, self.eod = choose_eod(path, eod_token, vocab.get, self._tok.id_to_token,
                                              self.vocab_size, eos_token)
        self.pad = vocab[pad_token] if pad_token in vocab else self.eod
        self.mask = next((vocab[t] for t in MASK_CANDIDATES if t in vocab), None)
        self.unique_identifiers = _identifiers(self, path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Without offsets (``encode_batch_fast``) where ``tokenizers`` has it: faster, same ids."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size])

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """``messages`` rendered by the tokenizer's chat template."""
        if self._chat is None:
            raise ValueError("this tokenizer has no chat template (a Hugging Face tokenizer "
                             "directory with one is needed); use --sft PROMPT_KEY:RESPONSE_KEY")
        if not messages:
            return ""
        return self._chat.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)


def _identifiers(tokenizer, path: str) -> OrderedDict:
    return OrderedDict([("class", type(tokenizer).__name__), ("path", os.path.abspath(path))])


def build_tokenizer(path: str, eod_token: Union[str, int, None] = None):
    """SentencePiece ``.model``, HF ``tokenizer.json`` or HF directory, chosen by the path;
    ``eod_token`` overrides the end-of-document rule (see the module docstring)."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"tokenizer '{path}' does not exist; give a SentencePiece .model file, a Hugging Face "
            "tokenizer.json or a tokenizer directory (tools/train_tokenizer.py trains one)"
        )
    if os.path.isdir(path) or path.endswith(".json"):
        return HFTokenizer(path, eod_token)
    return SentencePieceTokenizer(path, eod_token)


def train_sentencepiece(
    input_files: list[str], model_prefix: str, vocab_size: int, model_type: str = "bpe"
) -> str:
    """Train a SentencePiece model with pad=0, unk=1, eod=2 and a ``<mask>`` piece at id 3."""
    spm.SentencePieceTrainer.train(
        input=",".join(input_files),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=2,
        user_defined_symbols=[SPECIAL_PIECES["mask"]],
        character_coverage=1.0,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model_prefix + ".model"
