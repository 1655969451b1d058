"""Layer registry: every attention module of a denoiser, known by its module name.

Published methods count attention calls in execution order; attnedit instead derives everything
from the dotted module names diffusers gives (`down_blocks.2.attentions.0.transformer_blocks.0.attn2`),
so layer identity never depends on call order, CFG batching or extra guidance passes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

_UNET_RE = re.compile(
    r"^(?P<block>down_blocks|mid_block|up_blocks)(?:\.(?P<bi>\d+))?\.attentions\.(?P<ai>\d+)"
    r"\.transformer_blocks\.(?P<ti>\d+)\.(?P<attn>attn\d)$"
)
_DIT_RE = re.compile(r"^(?P<stack>transformer_blocks|single_transformer_blocks)\.(?P<ti>\d+)\.(?P<attn>attn\d?)$")


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

    def levels(self) -> list[int]:
        return sorted({i.level for i in self.layers.values()})


def build_registry(denoiser: torch.nn.Module, family: str) -> LayerRegistry:
    """Walk `denoiser.attn_processors` keys and describe each attention module."""
    names = [key[: -len(".processor")] for key in denoiser.attn_processors]
    modules = dict(denoiser.named_modules())
    reg = LayerRegistry(family=family, patch=_patch_size(denoiser, family))
    if family in ("sd", "sdxl"):
        n_down = len(getattr(denoiser, "down_blocks", []))
        n_up = len(getattr(denoiser, "up_blocks", []))
        entries = []
        for name in names:
            m = _UNET_RE.match(name)
            if m is None:
                continue  # e.g. attention inside a VAE-like block: not a text-to-image layer
            block = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[m["block"]]
            bi = int(m["bi"]) if m["bi"] is not None else 0
            level = bi if block == "down" else (n_down - 1 if block == "mid" else n_up - 1 - bi)
            order = {"down": 0, "mid": 1, "up": 2}[block]
            entries.append((order, bi, int(m["ai"]), int(m["ti"]), m["attn"], name, block, level))
        # execution index: sort transformer blocks by (block order, block idx, attention idx, tb idx)
        tb_keys = sorted({e[:4] for e in entries})
        tb_index = {k: i for i, k in enumerate(tb_keys)}
        for order, bi, ai, ti, attn_name, name, block, level in entries:
            module = modules[name]
            kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
            reg.layers[name] = LayerInfo(
                name=name,
                kind=kind,
                block=block,
                block_index=bi,
                attention_index=ai,
                transformer_index=ti,
                index=tb_index[(order, bi, ai, ti)],
                level=level,
                attn_name=attn_name,
            )
            reg.modules[name] = module
    else:
        n_double = len(getattr(denoiser, "transformer_blocks", []))
        for name in names:
            m = _DIT_RE.match(name)
            if m is None:
                continue
            module = modules[name]
            ti = int(m["ti"])
            single = m["stack"] == "single_transformer_blocks"
            if family == "flux":
                kind, block = "joint", ("single" if single else "double")
                index = ti + (n_double if single else 0)
            elif family == "sd3":
                kind = "joint" if getattr(module, "added_kv_proj_dim", None) else "self"
                block, index = "dit", ti
            else:  # pixart
                kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
                block, index = "dit", ti
            reg.layers[name] = LayerInfo(
                name=name,
                kind=kind,
                block=block,
                block_index=0,
                attention_index=0,
                transformer_index=ti,
                index=index,
                level=0,
                attn_name=m["attn"],
            )
            reg.modules[name] = module
    if not reg.layers:
        raise ValueError(f"no attention layers recognised in {type(denoiser).__name__} for family {family!r}")
    return reg


def _patch_size(denoiser: torch.nn.Module, family: str) -> int:
    if family == "flux":
        return 2  # 2x2 packing of the latent
    if family in ("sd3", "pixart"):
        return int(getattr(denoiser.config, "patch_size", 1))
    return 1
