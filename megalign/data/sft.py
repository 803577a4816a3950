"""Instruction data for diffusion SFT: each document with a loss-mask stream.

``megalign-preprocess --sft FORMAT`` writes the tokens of each example to
``<prefix>_sft_document.{bin,idx}`` and, document for document, a ``uint8`` stream to
``<prefix>_sft_document_loss_mask.{bin,idx}``: 1 on response tokens (supervised, and the only
ones training noises), 0 on the prompt (always clean). ``FORMAT`` is ``PROMPT_KEY:RESPONSE_KEY``
(two strings; the response ends with the end-of-document token, supervised, so the model learns
to stop) or ``MESSAGES_KEY`` (a chat list of ``{"role", "content"}`` rendered by the tokenizer's
chat template; every assistant turn is supervised, the document then ends with an unsupervised
end-of-document token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SFT_KEY = "sft"


def loss_mask_prefix(prefix: str) -> str:
    """The loss-mask stream beside the token dataset ``prefix``."""
    return f"{prefix}_loss_mask"


@dataclass(frozen=True)
class SFTFormat:
    prompt: Optional[str] = None  # prompt/response pairs
    response: Optional[str] = None
    messages: Optional[str] = None  # chat messages

    @classmethod
    def parse(cls, text: str) -> "SFTFormat":
        if ":" in text:
            prompt, _, response = text.partition(":")
            if not prompt or not response or prompt == response:
                raise ValueError(f"--sft '{text}': give PROMPT_KEY:RESPONSE_KEY (two JSON keys) "
                                 "or MESSAGES_KEY")
            return cls(prompt=prompt, response=response)
        return cls(messages=text)


def example_tokens(record: dict, fmt: SFTFormat, tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one JSON record; ``ValueError`` names what is wrong with it."""
    if fmt.messages is None:
        texts = [record.get(key) for key in (fmt.prompt, fmt.response)]
        for key, text in zip((fmt.prompt, fmt.response), texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"key '{key}' is missing, empty or not a string")
        prompt, response = tokenizer.encode_batch(texts)
        if not response:
            raise ValueError("the response tokenizes to nothing")
        response = response + [tokenizer.eod]
        return prompt + response, [0] * len(prompt) + [1] * len(response)
    messages = record.get(fmt.messages)
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages)):
        raise ValueError(f"key '{fmt.messages}' is not a list of messages with 'role' and 'content'")
    # the rendered text is cut where each assistant turn starts and ends, and each piece is
    # tokenized on its own, so the turns' tokens are exactly the supervised ones
    pieces, done = [], ""
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = tokenizer.chat_text(messages[:turn], add_generation_prompt=True)
        through = tokenizer.chat_text(messages[: turn + 1])
        if not before.startswith(done) or not through.startswith(before):
            raise ValueError("the chat template does not render a conversation as the prefix of "
                             "its continuation; its assistant turns cannot be located")
        pieces += [(before[len(done):], 0), (through[len(before):], 1)]
        done = through
    if not done:
        raise ValueError("the conversation has no assistant turn to supervise")
    pieces.append((tokenizer.chat_text(messages)[len(done):], 0))
    ids, mask = [], []
    for text, supervised in pieces:
        piece = tokenizer.encode(text) if text else []
        ids += piece
        mask += [supervised] * len(piece)
    return ids + [tokenizer.eod], mask + [0]
