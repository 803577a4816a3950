"""Tokenizers as Megatron-Core's datasets and megalign see them.

Megatron-Core's ``GPTDataset`` only needs ``vocab_size``, ``eod``, ``pad`` and
``unique_identifiers``; megalign adds ``mask`` (the vocabulary's mask-token id, or ``None`` when it
has none and a padded row is used), ``encode`` and ``decode``. Three kinds are read:
a SentencePiece ``.model`` file, a Hugging Face ``tokenizer.json`` (``tokenizers``), and a Hugging
Face pretrained directory (``transformers``; remote code is never run).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import sentencepiece as spm

SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "eod": "</s>", "mask": "<mask>"}
# End-of-document tokens tried, in order, for a bare tokenizer.json.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
MASK_CANDIDATES = ("<mask>", "<|mask|>", "[MASK]")


class SentencePieceTokenizer:
    """A SentencePiece model file with eod/pad/mask pieces (see ``train_sentencepiece``)."""

    def __init__(self, model_file: str):
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"tokenizer '{model_file}' defines no end-of-document (eos) piece")
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod
        mask = self._sp.piece_to_id(SPECIAL_PIECES["mask"])
        self.mask = None if mask == self._sp.unk_id() else mask
        self.unique_identifiers = _identifiers(self, model_file)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` file or pretrained tokenizer directory."""

    def __init__(self, path: str, eod_token: Optional[str] = None):
        from tokenizers import Tokenizer

        if os.path.isdir(path):
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
            self._tok = hf.backend_tokenizer
            eod_token = eod_token or hf.eos_token
            pad_token = hf.pad_token
        else:
            self._tok = Tokenizer.from_file(path)
            pad_token = None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if eod_token is None:
            eod_token = next((t for t in EOD_CANDIDATES if t in vocab), None)
        if eod_token is None or eod_token not in vocab:
            raise ValueError(
                f"tokenizer '{path}' has no end-of-document token (looked for {EOD_CANDIDATES}); "
                "use a tokenizer directory whose config names eos_token"
            )
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = vocab[eod_token]
        self.pad = vocab[pad_token] if pad_token in vocab else self.eod
        self.mask = next((vocab[t] for t in MASK_CANDIDATES if t in vocab), None)
        self.unique_identifiers = _identifiers(self, path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size])


def _identifiers(tokenizer, path: str) -> OrderedDict:
    return OrderedDict([("class", type(tokenizer).__name__), ("path", os.path.abspath(path))])


def build_tokenizer(path: str):
    """SentencePiece ``.model``, HF ``tokenizer.json`` or HF directory, chosen by the path."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"tokenizer '{path}' does not exist; give a SentencePiece .model file, a Hugging Face "
            "tokenizer.json or a tokenizer directory (tools/train_tokenizer.py trains one)"
        )
    if os.path.isdir(path) or path.endswith(".json"):
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)


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
