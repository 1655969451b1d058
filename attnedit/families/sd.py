"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`, a `UNet2DConditionModel` with CLIP text)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..selectors import Select
from .base import InversionCondition, UNetFamily


class StableDiffusion(UNetFamily):
    name = "sd"
    order = 10
    label = "Stable Diffusion 1.x / 2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    capabilities = frozenset({"unet", "step_callback", "text_maps", "spatial_self_attention", "clip_text",
                              "inversion"})
    default_steps = 50
    default_guidance = 7.5
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        # the two finest decoder levels = the official start layer 10 of SD 1.x
        "masactrl": {"layers": Select(kind="self", block="up", level=(0, 1))},
        "reposition": {"layers": Select(kind="self", block="up")},
        # official step sizes (start, end) of Bounded Attention; its loss layers: decoder + mid at the map level
        "bounded": {"step_size": (8.0, 2.0), "mid_block": True},
    }

    def text_segments(self, max_sequence_length: int | None = None):
        from ..tokens import TextSegment

        tok = self.pipe.tokenizer if self.pipe.tokenizer is not None else self.pipe.tokenizer_2
        return [TextSegment(tok, 0, tok.model_max_length, True)]

    def text_encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs whose features the UNet reads (SDXL: two, concatenated)."""
        return [(self.pipe.tokenizer, self.pipe.text_encoder)]

    def trainable_condition(self, prompts: list[str], height: int, width: int) -> dict[str, Any]:
        """UNet kwargs of `prompts` built with gradients through the text encoders (training new token
        embeddings, AttenCraft): the last hidden states, as `encode_prompt` gives them without clip_skip."""
        tok, enc = self.text_encoders()[0]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return {"encoder_hidden_states": enc(ids.to(self.denoiser.device))[0]}

    def encode_condition(self, prompts, n_per, *, height, width, image_grid, max_sequence_length,
                         guidance_scale=None, options=None):
        with torch.no_grad():
            emb, _ = type(self.pipe).encode_prompt(self.pipe, prompts, self.denoiser.device, n_per, False)
        return {"encoder_hidden_states": emb}

    def inversion_condition(self, prompt, guidance, height, width, negative_prompt="", max_sequence_length=None):
        cfg = self.uses_cfg(guidance)
        pe, ne = self.pipe.encode_prompt(prompt, self.denoiser.device, 1, cfg, negative_prompt if cfg else None)
        return InversionCondition(self, torch.cat([ne, pe]) if cfg else pe, {}, guidance, cfg)

    @classmethod
    def build_tiny(cls, seed: int = 0, levels: int = 2, **kw: Any):
        import diffusers as d

        from ..tiny import clip_text, clip_tokenizer, tiny_vae

        torch.manual_seed(seed)
        chans = (16, 32) if levels == 2 else (16, 32, 32)
        unet = d.UNet2DConditionModel(
            block_out_channels=chans, layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * len(chans),
            up_block_types=("CrossAttnUpBlock2D",) * len(chans), cross_attention_dim=32, attention_head_dim=2,
            norm_num_groups=8, sample_size=8,
        )
        sched = d.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1)
        return d.StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(), unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    @classmethod
    def load_options(cls) -> dict[str, Any]:
        return {"safety_checker": None, "requires_safety_checker": False}
