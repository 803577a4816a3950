"""The token ids and sizes that masking, the loss, sampling and scoring all need, as one object.

Why: the mask token, the end-of-document and padding ids and the two vocabulary sizes (the
tokenizer's tokens, which are sampled and scored; the model's padded rows, the mask row among
them) come from the config and the tokenizer together, and were passed around loose.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalign.config import Config, mask_token_id, padded_vocab_size


@dataclass(frozen=True)
class Vocabulary:
    size: int  # the tokenizer's tokens: what is sampled and scored
    padded: int  # rows of the model's embedding and output layer (the mask token's included)
    mask: int
    eod: int  # ends a packed document: attention and supervision stop at it
    pad: int

    @classmethod
    def of(cls, cfg: Config, tokenizer) -> "Vocabulary":
        return cls(size=tokenizer.vocab_size,
                   padded=padded_vocab_size(cfg.model, tokenizer.vocab_size, tokenizer.mask),
                   mask=mask_token_id(cfg, tokenizer.vocab_size, tokenizer.mask),
                   eod=tokenizer.eod, pad=tokenizer.pad)
