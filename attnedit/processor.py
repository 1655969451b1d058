"""The one attention processor attnedit installs on every attention module.

Each model family's adapter (`attnedit/families/`) reproduces its stock processor
(`AttnProcessor2_0`, `JointAttnProcessor2_0`, `FluxAttnProcessor`, ...) step for step: project,
normalise, RoPE, attend, project out. For "attend" it calls `AttnEditProcessor.attend`, which hands
BSHD q/k/v to the controls active at this layer and step.

Attention that needs no attnedit feature (no control active here, or the active ones ask for no
mask, resampling, window, capture or replacement) is computed exactly as the stock processor
computes it: through diffusers' `dispatch_attention_fn` where the stock processor dispatches
there (FLUX's; a user's `set_attention_backend("flash" | "sage" | ...)` holds), SDPA where it calls
SDPA (`AttnProcessor2_0`, `JointAttnProcessor2_0`). Only `attnedit.kernels.use("triton")` sends
plain attention to attnedit's own kernel. Everything else goes to `attnedit.kernels.attention`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from . import kernels
from .layers import LayerInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    from .controller import Controller
    from .controls import CallContext, Control


class AttnEditProcessor:
    """Processor bound to one layer (by name) and to the controller of the current run."""

    # diffusers' set_attention_backend / context parallel only touch processors with these
    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer: LayerInfo, controller: Controller, original: object | None = None) -> None:
        self.layer = layer
        self.controller = controller
        #: the stock processor dispatched through diffusers' attention backends (else it called SDPA)
        self.stock_dispatch = hasattr(original, "_attention_backend")
        if self.stock_dispatch:
            self._attention_backend = getattr(original, "_attention_backend", None)
            self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        temb: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
    ):
        """The stock processor's computation, as the model family's adapter reproduces it (`Family.attention`).

        The parameters are the union of the stock processors' (diffusers passes a processor only
        the keyword arguments its signature names).
        """
        return self.controller.family.attention(
            self, attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
            image_rotary_emb=image_rotary_emb, temb=temb, encoder_hidden_states_mask=encoder_hidden_states_mask,
        )

    def text_len(self) -> int:
        """Text tokens at the front of a single-stream layer's sequence (read from the forward's inputs)."""
        return self.controller.text_len

    # ----------------------------------------------------------------------------- the controls
    def attend(self, attn, hidden_states, encoder_hidden_states, q, k, v, mask, image, text) -> torch.Tensor:
        """Attention of BSHD q/k/v with the controls active at this layer and step (`image`/`text`: token slices)."""
        controller = self.controller
        active = controller.active_controls(self.layer)
        if not active:
            return self.plain(q, k, v, mask)
        ctx = controller.context(self.layer, attn, hidden_states, encoder_hidden_states, image, text, q.shape[1])
        return run_controls(active, ctx, q, k, v, mask, self.plain)

    def plain(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention with no attnedit feature, computed the way the stock processor computes it."""
        if kernels.current() == "triton":
            return kernels.attention(q, k, v, mask=mask)
        if self.stock_dispatch:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            return dispatch_attention_fn(q, k, v, attn_mask=mask, backend=self._attention_backend,
                                         parallel_config=self._parallel_config)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)


class SelfOnlyAttnEditProcessor(AttnEditProcessor):
    """For attention modules whose forward passes `(hidden_states, attention_mask, image_rotary_emb)`
    positionally, with no text stream (FLUX.2's parallel single-stream blocks)."""

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None):
        return self.controller.family.attention(self, attn, hidden_states, attention_mask=attention_mask,
                                                image_rotary_emb=image_rotary_emb)


def run_controls(
    active: list[Control],
    ctx: CallContext,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    plain: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """The controls' hooks around one attention call, in the fixed order of `attnedit.controls`.

    `plain(q, k, v, mask)` computes attention that needs no attnedit feature (the processor passes
    the stock computation; parity checks and tests may call this with `plain=None`, then
    `attnedit.kernels.attention` computes it).
    """
    for c in active:
        if c.overrides("qkv"):
            q, k, v = c.qkv(ctx, q, k, v)
    regions = downsample = window = None
    captures: list[tuple[Control, torch.Tensor]] = []
    attender = None
    for c in active:
        if c.overrides("regions"):
            r = c.regions(ctx)
            if r is not None:
                regions = r if regions is None else combine_regions(regions, r)
        if c.overrides("downsample"):
            downsample = c.downsample(ctx) or downsample
        if c.overrides("window"):
            window = c.window(ctx) or window
        if c.overrides("capture"):
            keys = c.capture(ctx)
            if keys is not None:
                captures.append((c, keys))
        if c.overrides("attend"):
            attender = c
    out = None
    if attender is not None:
        out = attender.attend(ctx, q, k, v, mask)
    if out is None and regions is None and downsample is None and window is None and not captures:
        out = plain(q, k, v, mask) if plain is not None else kernels.attention(q, k, v, mask=mask)
    if out is None:
        capture_keys = None
        if captures:
            capture_keys = torch.unique(torch.cat([keys for _, keys in captures]).to(q.device))
        res = kernels.attention(
            q, k, v, mask=mask, regions=regions, downsample=downsample, window=window, capture=capture_keys
        )
        out, probs = (res if capture_keys is not None else (res, None))
        if probs is not None:
            for c, keys in captures:
                where = torch.searchsorted(capture_keys, keys.to(q.device))
                c.observe(ctx, probs[..., where])
    for c in active:
        if c.overrides("output"):
            out = c.output(ctx, out)
    return out


def combine_regions(a: kernels.RegionMask, b: kernels.RegionMask) -> kernels.RegionMask:
    """Two region masks at once: a pair is allowed iff both allow it (labels multiplied out)."""
    ra, rb = a.num_regions, b.num_regions
    qa, qb = a.q_labels.long(), b.q_labels.long()
    ka, kb = a.k_labels.long(), b.k_labels.long()
    ta = a.allowed if a.allowed.dim() == 3 else a.allowed.unsqueeze(0)
    tb = b.allowed if b.allowed.dim() == 3 else b.allowed.unsqueeze(0)
    bsz = max(ta.shape[0], tb.shape[0])
    table = ta.expand(bsz, -1, -1)[:, :, None, :, None] & tb.expand(bsz, -1, -1)[:, None, :, None, :]
    table = table.reshape(bsz, ra * rb, ra * rb)
    return kernels.RegionMask(qa * rb + qb, ka * rb + kb, table if bsz > 1 else table[0])
