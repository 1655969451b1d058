"""Grounding losses for the testbed UNet: a noun's cross-attention on its object, the start token elsewhere.

Why: issue 21 measured that a small UNet trained only to denoise (with a frozen, contrastively pretrained
causal text encoder) keeps nearly flat cross-attention: a shape noun's map is only 1.1-1.2x denser on its
object than off it, and the caption-free padding, not the start token, soaks up the mass. Stable Diffusion
gets sharp noun maps and a start-token sink from scale we cannot afford on two CPU cores. The testbed
world knows every object's mask, so (as TokenCompose, Wang et al. CVPR 2024, does with segmentation
masks on SD) the UNet is trained with two extra terms on its cross-attention probabilities:

- token grounding: for every shape-noun token, ``(1 - share of its map inside its objects' masks)^2``;
- start-token sink: on background positions, ``(1 - probability of the start token)^2``.

Only nouns are grounded (colour words and the rest stay free), so attribute binding and object neglect
are still the UNet's own: the methods have something left to fix. `targets` maps a caption to its nouns'
masks; `GroundingProbe` is plain attention that keeps its probabilities for the loss (training only: the
bare UNet trains outside any pipeline, so attnedit's controller is not involved).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .world import COLOURS, PLURALS, SHAPES, Scene, shape_mask

_SHAPE_OF = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}


def object_masks(scene: Scene, size: int = 64, grid: int = 16) -> np.ndarray:
    """Coverage ``float32 (objects, grid, grid)`` of each object of `scene` (pixel masks box-averaged)."""
    out = np.zeros((len(scene.objects), grid, grid), np.float32)
    f = size // grid
    for i, o in enumerate(scene.objects):
        m = shape_mask(o.shape, tuple(v * size for v in o.box), size)  # type: ignore[arg-type]
        out[i] = m.reshape(grid, f, grid, f).mean((1, 3))
    return out


def noun_objects(words: list[str], scene: Scene) -> list[tuple[int, list[int]]]:
    """(word index, indices of the scene objects it names) for every shape noun of a caption's words.

    A noun names the objects of its shape, narrowed to its colour when the caption gives one (before
    the noun, or after it as "that is/are COLOUR"); "a circle" in a scene with two circles names both.
    """
    found: list[tuple[int, list[int]]] = []
    for i, w in enumerate(words):
        shape = _SHAPE_OF.get(w)
        if shape is None:
            continue
        colour = None
        if i > 0 and words[i - 1] in COLOURS:
            colour = words[i - 1]
        elif i + 3 < len(words) and words[i + 1] == "that" and words[i + 3] in COLOURS:
            colour = words[i + 3]
        objs = [k for k, o in enumerate(scene.objects) if o.shape == shape and colour in (None, o.colour)]
        if objs:
            found.append((i, objs))
    return found


def targets(captions: list[str], scenes: list[Scene], masks: list[np.ndarray], length: int,
            grid: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token target masks ``(b, length, grid, grid)`` (zero for tokens not grounded) and the
    background ``(b, grid, grid)`` (1 - union of all objects).

    Token positions follow the testbed tokenizer: the start token at 0, then one token per word (commas
    are tokens too), so word ``j`` sits at position ``j + 1``; words past the length are cut like the
    tokenizer cuts them. An empty caption (classifier-free dropout) grounds no token.
    """
    tok = torch.zeros(len(captions), length, grid, grid)
    bg = torch.zeros(len(captions), grid, grid)
    for b, (cap, scene, m) in enumerate(zip(captions, scenes, masks)):
        mt = torch.from_numpy(m)
        bg[b] = 1.0 - mt.sum(0).clamp(max=1.0) if len(m) else 1.0
        words = cap.replace(",", " , ").split()
        for j, objs in noun_objects(words, scene):
            if j + 1 < length - 1:  # the last position holds the end token when the caption is cut
                tok[b, j + 1] = mt[objs].sum(0).clamp(max=1.0)
    return tok, bg


class GroundingProbe:
    """Cross-attention as diffusers' `AttnProcessor` computes it, keeping the probabilities (with grad)."""

    def __init__(self) -> None:
        self.maps: list[torch.Tensor] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        b, n, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (b * heads, n, tokens)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        out = attn.to_out[1](attn.to_out[0](out))
        self.maps.append(probs.view(b, attn.heads, n, -1).mean(1))
        return out


def install(unet) -> GroundingProbe:
    """Put one probe on every cross-attention (`attn2`) of `unet`; self-attention keeps its processor."""
    probe = GroundingProbe()
    procs = {name: (probe if name.endswith("attn2.processor") else proc)
             for name, proc in unet.attn_processors.items()}
    unet.set_attn_processor(procs)
    return probe


def losses(maps: list[torch.Tensor], tok: torch.Tensor, bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean token-grounding and start-sink losses over the captured layers (each on its own grid)."""
    grounded = tok.flatten(2).sum(-1) > 0  # (b, length)
    token_l, sink_l = [], []
    for p in maps:  # (b, n, tokens)
        side = round(p.shape[1] ** 0.5)
        t = F.adaptive_avg_pool2d(tok, side).flatten(2).transpose(1, 2)  # (b, n, length)
        g = F.adaptive_avg_pool2d(bg[:, None], side).flatten(1)  # (b, n)
        if grounded.any():
            inside = (p * t).sum(1) / p.sum(1).clamp_min(1e-8)  # (b, tokens): share of each map on its mask
            token_l.append(((1 - inside) ** 2)[grounded].mean())
        sink_l.append(((1 - p[..., 0]) ** 2 * g).sum() / g.sum().clamp_min(1e-8))
    zero = torch.zeros(())
    return (torch.stack(token_l).mean() if token_l else zero), torch.stack(sink_l).mean()
