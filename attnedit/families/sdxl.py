"""Stable Diffusion XL (`StableDiffusionXLPipeline`: a UNet with two CLIP text encoders and added time ids)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..selectors import Select
from .base import InversionCondition
from .sd import StableDiffusion

#: MasaCtrl on SDXL: the spec's documented start layer 44 (of 70), written by module name
MASACTRL_LAYERS = ("up_blocks.0.attentions.1.*", "up_blocks.0.attentions.2.*", "up_blocks.1.*")


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    order = 20
    label = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    default_steps = 50
    default_guidance = 5.0
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "masactrl": {"layers": Select(kind="self", name=MASACTRL_LAYERS)},
        # the official driver's transformer index >= 36 on the full 70-block UNet (whole decoder on smaller ones)
        "reposition": {"layers": Select(kind="self", block="up"), "full_unet": (69, Select(kind="self", min_index=36))},
        # official: 18 -> 5, loss and masks on blocks 1-6 of the first decoder attention at the map level
        "bounded": {"step_size": (18.0, 5.0), "first_attention_blocks": (1, 6)},
    }

    def text_encoders(self) -> list[tuple[Any, Any]]:
        return [(self.pipe.tokenizer, self.pipe.text_encoder), (self.pipe.tokenizer_2, self.pipe.text_encoder_2)]

    def time_ids(self, height: int, width: int, dtype: torch.dtype, pooled: torch.Tensor, rows: int) -> torch.Tensor:
        """SDXL's added time ids for a (height, width) image with no crop, as the pipeline builds them."""
        proj = int(pooled.shape[-1]) if self.pipe.text_encoder_2 is None else \
            self.pipe.text_encoder_2.config.projection_dim
        ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                          text_encoder_projection_dim=proj)
        return ids.to(self.denoiser.device).repeat(rows, 1)

    def trainable_condition(self, prompts: list[str], height: int, width: int) -> dict[str, Any]:
        """As `StableDiffusion.trainable_condition`, SDXL's way: the penultimate hidden states of both
        encoders side by side, the second's pooled projection and the time ids of an uncropped image."""
        hidden, pooled = [], None
        for tok, enc in self.text_encoders():
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(self.denoiser.device), output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        emb = torch.cat(hidden, dim=-1)
        ids = self.time_ids(height, width, emb.dtype, pooled, emb.shape[0])
        return {"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}

    def encode_condition(self, prompts, n_per, *, height, width, image_grid, max_sequence_length,
                         guidance_scale=None, options=None):
        with torch.no_grad():
            emb, _, pooled, _ = type(self.pipe).encode_prompt(
                self.pipe, prompt=prompts, device=self.denoiser.device, num_images_per_prompt=n_per,
                do_classifier_free_guidance=False)
        f = self.vae_scale_factor
        h, w = height or image_grid[0] * f, width or image_grid[1] * f
        ids = self.time_ids(h, w, emb.dtype, pooled, emb.shape[0])
        return {"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}

    def inversion_condition(self, prompt, guidance, height, width, negative_prompt="", max_sequence_length=None):
        cfg = self.uses_cfg(guidance)
        pe, ne, pp, npool = self.pipe.encode_prompt(prompt, device=self.denoiser.device, num_images_per_prompt=1,
                                                    do_classifier_free_guidance=cfg,
                                                    negative_prompt=negative_prompt if cfg else None)
        pooled = torch.cat([npool, pp]) if cfg else pp
        extra = {"added_cond_kwargs": {"text_embeds": pooled,
                                       "time_ids": self.time_ids(height, width, pe.dtype, pp, pooled.shape[0])}}
        return InversionCondition(self, torch.cat([ne, pe]) if cfg else pe, extra, guidance, cfg)

    @classmethod
    def build_tiny(cls, seed: int = 0, **kw: Any):
        import diffusers as d

        from ..tiny import clip_text, clip_tokenizer, tiny_vae

        torch.manual_seed(seed)
        unet = d.UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8, sample_size=8,
        )
        sched = d.EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading")
        return d.StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(),
            text_encoder_2=clip_text(projection=True), tokenizer_2=clip_tokenizer(), unet=unet,
            scheduler=sched, add_watermarker=False,
        )

    @classmethod
    def load_options(cls) -> dict[str, Any]:
        return {}
