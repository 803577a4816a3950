"""``modeling_megalign``'s sibling ``decoding`` inside the package: the library's decoding rules.

An export ships ``megalign/diffusion/decoding.py`` itself under this name beside its copy of
``modeling_megalign.py``; here, where the exporter imports the modeling file to build the model,
the same relative import resolves to the library module.
"""

from megalign.diffusion.decoding import (
                                         Logits,
                                         SamplerConfig,
                                         Window,
                                         for_block_diffusion,
                                         prepare,
                                         sample,
)

__all__ = ["Logits", "SamplerConfig", "Window", "for_block_diffusion", "prepare", "sample"]
