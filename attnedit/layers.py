"""Layer registry: every attention module of a denoiser, known by its module name.

Published methods count attention calls in execution order; attnedit instead derives everything
from the dotted module names diffusers gives (`down_blocks.2.attentions.0.transformer_blocks.0.attn2`),
so layer identity never depends on call order, CFG batching or extra guidance passes. Each family's
adapter (`attnedit/families/`) reads its own module names into `LayerInfo`s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LayerInfo:
    """What a control needs to know about one attention module.

    - `kind`: "self" (image tokens attend image tokens), "cross" (image queries, text keys) or
      "joint" (one attention over image and text tokens: SD3, FLUX).
    - `block`: "down" | "mid" | "up" for UNets, "double" | "single" for FLUX, "dit" otherwise.
    - `level`: UNet down-sampling level of the layer's grid (0 = latent size, k = latent / 2^k);
      0 for DiTs (their image grid is the patched latent).
    - `index`: execution-order transformer-block index derived from names (the "t" of the
      published code; attn1 and attn2 of one block share it), usable as a translation aid.
    """

    name: str
    kind: str
    block: str
    block_index: int
    attention_index: int
    transformer_index: int
    index: int
    level: int
    attn_name: str
    stream: str = "image"

    def grid(self, latent_hw: tuple[int, int], patch: int = 1) -> tuple[int, int]:
        """Token grid (H, W) of this layer for a latent of size `latent_hw` (ceil rule)."""
        h, w = latent_hw
        if self.block in ("down", "mid", "up"):
            f = 2**self.level
            return (math.ceil(h / f), math.ceil(w / f))
        return (h // patch, w // patch)


@dataclass
class LayerRegistry:
    """All attention layers of one denoiser, by name, plus the module each name points to."""

    family: str
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    patch: int = 1

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerInfo:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no attention layer named {name!r}; e.g. {', '.join(list(self.layers)[:4])}") from None

    def select(self, selector) -> list[LayerInfo]:
        """The layers a `Select` (or callable) picks, in execution order."""
        return [info for info in self.ordered() if selector(info)]

    def ordered(self) -> list[LayerInfo]:
        """Layers in execution order (down -> mid -> up; double -> single), attn1 before attn2."""
        return sorted(self.layers.values(), key=lambda i: (i.index, i.attn_name))

    @property
    def per_level(self) -> bool:
        """Whether the layers sit on resolution levels (a UNet) rather than one token grid (a DiT)."""
        return any(i.block in ("down", "mid", "up") for i in self.layers.values())

    def levels(self) -> list[int]:
        return sorted({i.level for i in self.layers.values()})
