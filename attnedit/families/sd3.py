"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`: joint [image, text] attention, CLIP + CLIP + T5)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import DiTFamily, InversionCondition, legacy_attention, mu_for


class FlowMatchFamily(DiTFamily):
    """DiTs sampled with diffusers' flow-matching Euler scheduler (inversion reverses it)."""

    def flow_schedule(self, steps: int, height: int, width: int):
        """A copy of the pipeline's scheduler set to the sigmas its own call would use."""
        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            f, p = self.vae_scale_factor, self.patch
            kwargs["mu"] = mu_for(self.pipe, (height // f // p) * (width // f // p), max_shift=1.16)
        sched.set_timesteps(steps, **kwargs)
        return sched


class StableDiffusion3(FlowMatchFamily):
    name = "sd3"
    order = 30
    label = "Stable Diffusion 3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    capabilities = frozenset({"dit", "step_callback", "text_maps", "clip_text", "inversion"})
    joint_order = "image_text"
    default_steps = 28
    default_guidance = 7.0
    tiny_call_kwargs: ClassVar[dict[str, Any]] = {"max_sequence_length": 32}

    def classify(self, module, single):
        return ("joint" if getattr(module, "added_kv_proj_dim", None) else "self"), "dit"

    def attention(self, proc, attn, hidden_states, **kw):
        return legacy_attention(proc, attn, hidden_states, ignore_mask=True, **kw)  # JointAttnProcessor2_0

    def text_segments(self, max_sequence_length=None):
        from ..tokens import TextSegment

        tok, pipe = self.pipe.tokenizer, self.pipe
        segs = [TextSegment(tok, 0, tok.model_max_length, True)]
        if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
            segs.append(TextSegment(self.pipe.tokenizer_3, tok.model_max_length, max_sequence_length or 256, False))
        return segs

    def encode_condition(self, prompts, n_per, *, height, width, image_grid, max_sequence_length,
                         guidance_scale=None, options=None):
        with torch.no_grad():
            emb, _, pooled, _ = type(self.pipe).encode_prompt(
                self.pipe, prompt=prompts, prompt_2=None, prompt_3=None, device=self.denoiser.device,
                num_images_per_prompt=n_per, do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length or 256)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def inversion_condition(self, prompt, guidance, height, width, negative_prompt="", max_sequence_length=None):
        cfg = self.uses_cfg(guidance)
        pe, ne, pp, npool = self.pipe.encode_prompt(
            prompt, None, None, device=self.denoiser.device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=negative_prompt if cfg else None, max_sequence_length=max_sequence_length or 256)
        extra = {"pooled_projections": torch.cat([npool, pp]) if cfg else pp}
        return InversionCondition(self, torch.cat([ne, pe]) if cfg else pe, extra, guidance, cfg)

    def inversion_forward(self, xin, t, context, extra):
        return self.denoiser(hidden_states=xin, timestep=t.expand(xin.shape[0]), encoder_hidden_states=context,
                             return_dict=False, **extra)[0]

    @classmethod
    def build_tiny(cls, seed: int = 0, **kw: Any):
        import diffusers as d

        from ..tiny import clip_text, clip_tokenizer, t5_text, t5_tokenizer, tiny_vae

        torch.manual_seed(seed)
        tr = d.SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
            pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
        )
        return d.StableDiffusion3Pipeline(
            transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(dit=True),
            text_encoder=clip_text(projection=True), tokenizer=clip_tokenizer(),
            text_encoder_2=clip_text(projection=True), tokenizer_2=clip_tokenizer(),
            text_encoder_3=t5_text(), tokenizer_3=t5_tokenizer(),
        )
