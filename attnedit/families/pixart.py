"""PixArt-α / PixArt-Σ (`PixArtAlphaPipeline`, `PixArtSigmaPipeline`: self- and cross-attention, T5 text).

PixArt's `__call__` has no step callback (so no latent guidance) and decides CFG in a local variable
(guidance_scale > 1), which the adapter repeats for stock calls.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import DiTFamily


class PixArt(DiTFamily):
    name = "pixart"
    order = 50
    label = "PixArt-α / PixArt-Σ"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    capabilities = frozenset({"dit", "text_maps", "spatial_self_attention"})
    default_steps = 20
    default_guidance = 4.5
    call_defaults: ClassVar[dict[str, Any]] = {"use_resolution_binning": False, "clean_caption": False}
    tiny_call_kwargs: ClassVar[dict[str, Any]] = {"max_sequence_length": 32, **call_defaults}

    def cfg_rows(self, pipe_cfg, guidance_scale):
        return guidance_scale is not None and float(guidance_scale) > 1.0

    def attention(self, proc, attn, hidden_states, **kw):
        from .base import legacy_attention

        return legacy_attention(proc, attn, hidden_states, **kw)

    def text_segments(self, max_sequence_length=None):
        from ..tokens import TextSegment

        return [TextSegment(self.pipe.tokenizer, 0, max_sequence_length or 120, False)]

    @classmethod
    def build_tiny(cls, seed: int = 0, **kw: Any):
        import diffusers as d

        from ..tiny import t5_text, t5_tokenizer, tiny_vae

        torch.manual_seed(seed)
        tr = d.PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, cross_attention_dim=24, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6,
        )
        return d.PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=t5_text(), vae=tiny_vae(), transformer=tr,
                                     scheduler=d.DDIMScheduler())
