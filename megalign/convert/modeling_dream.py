"""A megalign student in Dream's format: Dream's class (``DreamModel``) and generation arguments
over megalign's network (``modeling_megalign.py``) and decoding rules (``decoding.py``).

megalign-convert (``--to dream``) copies this file, ``configuration_dream.py`` and those two next
to the weights, so the directory is used as Dream's users use Dream::

    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    out = model.diffusion_generate(input_ids, attention_mask=mask, max_new_tokens=64, steps=64,
                                   temperature=0.0, alg="entropy", return_dict_in_generate=True)
    out.sequences

Dream's arguments are translated to megalign's decoding rules: ``alg`` picks the confidence
(``maskgit_plus``: the token's probability, ``topk_margin``: the top-1 minus top-2 probability,
``entropy``: the negative entropy; the most confident positions are committed) or ``origin``
(each masked position committed with probability 1 / steps left); ``top_p`` / ``top_k`` None
mean off; ``max_length`` counts the prompt. Decoding is megalign-generate's (blocks of 8 when
they tile the answer unless ``block_length`` says otherwise; a sample stops at the end-of-text
token), and megalign's own options (``block_length``, ``threshold``, ``cache``, ``dual_cache``,
``seed`` ...) are taken too. What megalign's rules have no form for is refused: ``alg_temp`` > 0
(sampling positions by confidence), ``output_history``, another mask or padding token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.modeling_outputs import ModelOutput

from .configuration_dream import DreamConfig
from .modeling_megalign import MegalignForDiffusionLM

# Dream's ``alg`` -> megalign's (confidence, unmasking)
ALGORITHMS = {"origin": ("prob", "origin"), "maskgit_plus": ("prob", "confidence"),
              "topk_margin": ("margin", "confidence"), "entropy": ("entropy", "confidence")}
# what a Dream generation config contributes when one is given
GENERATION_FIELDS = ("max_new_tokens", "steps", "temperature", "top_p", "top_k", "alg",
                     "alg_temp")


@dataclass
class DreamModelOutput(ModelOutput):
    sequences: Optional[torch.LongTensor] = None
    history: Optional[tuple] = None


class DreamModel(MegalignForDiffusionLM):
    """The bidirectional student; ``forward`` gives [b, s, vocab] logits, position i's predicting
    token i + 1 (Dream shifts them right by one when it decodes; so does megalign)."""

    config_class = DreamConfig
    base_model_prefix = "model"

    @torch.no_grad()
    def diffusion_generate(self, inputs: Optional[torch.Tensor] = None, generation_config=None,
                           **kwargs):
        """Prompts (rows of ``inputs``, padding marked 0 in ``attention_mask``) followed by the
        generated tokens, as Dream returns them (``return_dict_in_generate``: in an output's
        ``sequences``); Dream's arguments as the module docstring says, megalign's by name."""
        options = {name: getattr(generation_config, name) for name in GENERATION_FIELDS
                   if getattr(generation_config, name, None) is not None}
        options.update(kwargs)
        input_ids = options.pop("input_ids", inputs)
        attention_mask = options.pop("attention_mask", None)
        return_dict = options.pop("return_dict_in_generate", False)
        if options.pop("output_history", False):
            raise ValueError("output_history: megalign's decoding keeps no history of the steps")
        for name in ("mask_token_id", "pad_token_id"):
            value = options.pop(name, None)
            if value is not None and value != getattr(self.config, name):
                raise ValueError(f"{name}={value}: this model's is {getattr(self.config, name)} "
                                 "(config.json)")
        options.pop("bos_token_id", None)  # Dream's decoding does not use it either
        options.pop("eps", None)  # the floor of Dream's time grid; megalign's has none
        alg_temp = options.pop("alg_temp", None)
        if alg_temp:
            raise ValueError(f"alg_temp={alg_temp}: megalign commits the most confident "
                             "positions; use alg_temp=None")
        alg = options.pop("alg", None)
        if alg is not None:
            if alg not in ALGORITHMS:
                raise ValueError(f"alg='{alg}' is not one of {sorted(ALGORITHMS)}")
            options["confidence"], options["unmasking"] = ALGORITHMS[alg]
        for name, off in (("top_p", 1.0), ("top_k", 0), ("temperature", 0.0)):
            if name in options and options[name] is None:
                options[name] = off
        max_length = options.pop("max_length", None)
        if options.get("max_new_tokens") is None:
            if max_length is None:
                raise ValueError("give max_new_tokens (or max_length, which counts the prompt)")
            options["max_new_tokens"] = max_length - input_ids.shape[1]
        copies = options.pop("num_return_sequences", 1) or 1
        if copies > 1:
            input_ids = input_ids.repeat_interleave(copies, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(copies, dim=0)
        sequences = super().diffusion_generate(input_ids, attention_mask=attention_mask,
                                               **options)
        return DreamModelOutput(sequences=sequences) if return_dict else sequences
