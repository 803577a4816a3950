"""Tokenizers as Megatron-Core's datasets see them.

Megatron-Core's ``GPTDataset`` only needs ``vocab_size``, ``eod``, ``pad`` and
``unique_identifiers`` from a tokenizer; megalign adds ``mask`` (the reserved mask-token id, or
``None`` when the vocabulary has none and a padded row is used instead) and ``encode``.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import sentencepiece as spm

SPECIAL_PIECES = {"pad": "<pad>", "unk": "<unk>", "eod": "</s>", "mask": "<mask>"}


class SentencePieceTokenizer:
    """A SentencePiece model file with eod/pad/mask pieces (see ``train_sentencepiece``)."""

    def __init__(self, model_file: str):
        if not os.path.isfile(model_file):
            raise FileNotFoundError(
                f"tokenizer model '{model_file}' does not exist; train one with "
                "tools/train_tokenizer.py or point data.tokenizer at a SentencePiece .model file"
            )
        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        if self.eod < 0:
            raise ValueError(f"tokenizer '{model_file}' defines no end-of-document (eos) piece")
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod
        mask = self._sp.piece_to_id(SPECIAL_PIECES["mask"])
        self.mask = None if mask == self._sp.unk_id() else mask
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("model_file", os.path.abspath(model_file))]
        )

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])


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


def build_tokenizer(model_file: str) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model_file)
