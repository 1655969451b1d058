"""The one attention processor attnedit installs on every attention module.

It reproduces the stock processors (`AttnProcessor2_0`, `JointAttnProcessor2_0`,
`FluxAttnProcessor`) step for step: project, normalise, RoPE, attend, project out. Between
"project" and "attend" it hands BSHD q/k/v to the controls active at this layer and step.

Attention that needs no attnedit feature (no control active here, or the active ones ask for no
mask, resampling, window, capture or replacement) is computed exactly as the stock processor
computes it: through diffusers' `dispatch_attention_fn` where the stock processor dispatches
there (FLUX's; a user's `set_attention_backend("flash" | "sage" | ...)` holds), SDPA where it calls
SDPA (`AttnProcessor2_0`, `JointAttnProcessor2_0`). Only `attnedit.kernels.use("triton")` sends
plain attention to attnedit's own kernel. Everything else goes to `attnedit.kernels.attention`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        temb: torch.Tensor | None = None,
    ):
        if self.controller.family.name == "flux":
            return self._flux(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self._legacy(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    # ------------------------------------------------------------------ legacy `Attention` family
    def _legacy(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        family = self.controller.family.name
        joint = encoder_hidden_states is not None and getattr(attn, "added_kv_proj_dim", None) is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None or joint else encoder_hidden_states.shape
        )
        if attention_mask is not None and family == "sd3":
            attention_mask = None  # JointAttnProcessor2_0 ignores masks
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None or joint:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        q = query.view(batch_size, -1, attn.heads, head_dim)
        k = key.view(batch_size, -1, attn.heads, head_dim)
        v = value.view(batch_size, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        n_img = q.shape[1]
        if joint:
            eq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            ek = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            ev = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q = torch.cat([q, eq], dim=1)
            k = torch.cat([k, ek], dim=1)
            v = torch.cat([v, ev], dim=1)
            image, text = slice(0, n_img), slice(n_img, k.shape[1])
        elif encoder_hidden_states is not None:
            image, text = slice(0, n_img), slice(0, k.shape[1])
        else:
            image, text = slice(0, n_img), None

        out = self._attend(attn, hidden_states, encoder_hidden_states, q, k, v, attention_mask, image, text)
        out = out.reshape(batch_size, -1, attn.heads * head_dim).to(q.dtype)

        if joint:
            out, text_out = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if joint:
            return out, text_out
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    # ------------------------------------------------------------ `AttentionModuleMixin` (FLUX)
    def _flux(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = query.unflatten(-1, (-1, attn.head_dim))
        k = key.unflatten(-1, (-1, attn.head_dim))
        v = value.unflatten(-1, (-1, attn.head_dim))
        q = attn.norm_q(q)
        k = attn.norm_k(k)
        double = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if double:
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            q = torch.cat([eq, q], dim=1)
            k = torch.cat([ek, k], dim=1)
            v = torch.cat([ev, v], dim=1)
            n_txt = encoder_hidden_states.shape[1]
        else:
            n_txt = self.controller.text_len
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        text, image = slice(0, n_txt), slice(n_txt, q.shape[1])
        out = self._attend(attn, hidden_states, encoder_hidden_states, q, k, v, attention_mask, image, text)
        out = out.flatten(2, 3).to(q.dtype)
        if double:
            text_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            out = attn.to_out[0](out.contiguous())
            out = attn.to_out[1](out)
            text_out = attn.to_add_out(text_out.contiguous())
            return out, text_out
        return out

    # ----------------------------------------------------------------------------- the controls
    def _attend(self, attn, hidden_states, encoder_hidden_states, q, k, v, mask, image, text):
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
