"""FLUX.1 (`FluxPipeline`: joint [text, image] attention in double- and single-stream blocks, packed latents).

FLUX passes sigmas in (0, 1] as the timestep, packs the latent's 2x2 patches into tokens (their grid comes
from `img_ids`), runs true CFG (when the model has no guidance embedding) as a separate uncond pass under
`cache_context("uncond")`, and its processor dispatches through diffusers' attention backends.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from .base import ForwardInfo, InversionCondition, mu_for
from .sd3 import FlowMatchFamily


class Flux(FlowMatchFamily):
    name = "flux"
    order = 40
    label = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    capabilities = frozenset({"dit", "step_callback", "text_maps", "inversion", "clear_distillation"})
    timestep_scale = 1.0
    joint_order = "text_image"
    cfg_in_batch = False
    default_steps = 28
    default_guidance = 3.5
    tiny_call_kwargs: ClassVar[dict[str, Any]] = {"max_sequence_length": 48}
    row_keys: ClassVar[tuple[str, ...]] = ("encoder_hidden_states", "pooled_projections", "guidance")
    # ToDo's native latent side: FLUX's 1024 px / 8 (its config has no sample_size)
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {"todo": {"native_latent": 128}}

    @property
    def patch(self) -> int:
        return 2  # 2x2 packing of the latent

    @property
    def true_cfg(self) -> bool:
        return not getattr(self.denoiser.config, "guidance_embeds", True)

    def guidance_arguments(self, guidance, negative_prompt=None):
        """True CFG (no guidance embedding) runs a separate pass against an empty prompt unless one is given."""
        args: dict[str, Any] = {"guidance_scale": guidance}
        if self.true_cfg and guidance > 1.0:
            args["true_cfg_scale"] = guidance
            if negative_prompt is None:
                negative_prompt = ""
        return args, negative_prompt

    def native_size(self):
        return (1024, 1024)

    def classify(self, module, single):
        return "joint", ("single" if single else "double")

    def read_forward(self, sample, kwargs, ehs, previous):
        grid = previous.image_grid if previous is not None else None
        img_ids = kwargs.get("img_ids")
        if img_ids is not None:
            ids = img_ids[0] if img_ids.dim() == 3 else img_ids
            grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        hw = (grid[0] * 2, grid[1] * 2) if grid else None
        return ForwardInfo(hw, grid, int(ehs.shape[1]) if ehs is not None else 0)

    def schedule_value(self, t: float) -> float:
        return t * 1000.0

    def attention(self, proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                  image_rotary_emb=None, **_: Any):
        """`FluxAttnProcessor` step by step."""
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        v = value.unflatten(-1, (-1, attn.head_dim))
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
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
            n_txt = encoder_hidden_states.shape[1]
        else:
            n_txt = proc.text_len()
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        text, image = slice(0, n_txt), slice(n_txt, q.shape[1])
        out = proc.attend(attn, hidden_states, encoder_hidden_states, q, k, v, attention_mask, image, text)
        out = out.flatten(2, 3).to(q.dtype)
        if double:
            text_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(text_out.contiguous())
        return out

    def text_segments(self, max_sequence_length=None):
        from ..tokens import TextSegment

        return [TextSegment(self.pipe.tokenizer_2, 0, max_sequence_length or 512, False)]

    def packed_grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor
        return (height // (f * 2), width // (f * 2))

    def latent_shape(self, n, height, width):
        ch = self.denoiser.config.in_channels // 4
        gh, gw = self.packed_grid(height, width)
        return (n, gh * gw, ch * 4)

    def initial_latents(self, n, height, width, generators):
        ch = self.denoiser.config.in_channels // 4
        gh, gw = self.packed_grid(height, width)
        noise = torch.stack([torch.randn((ch, 2 * gh, 2 * gw), generator=g) for g in generators])
        return self.pack(noise).to(self.denoiser.device, self.denoiser.dtype)

    def pack(self, latents):
        b, c, h, w = latents.shape
        packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return packed.reshape(b, (h // 2) * (w // 2), c * 4)

    def guidance_embedding(self, rows: int, scale: float | None) -> torch.Tensor | None:
        if not getattr(self.denoiser.config, "guidance_embeds", False):
            return None
        scale = scale if scale is not None else (getattr(self.pipe, "_guidance_scale", None) or self.default_guidance)
        return torch.full((rows,), float(scale), device=self.denoiser.device, dtype=torch.float32)

    def encode_condition(self, prompts, n_per, *, height, width, image_grid, max_sequence_length,
                         guidance_scale=None, options=None):
        device = self.denoiser.device
        with torch.no_grad():
            emb, pooled, text_ids = type(self.pipe).encode_prompt(
                self.pipe, prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=n_per,
                max_sequence_length=max_sequence_length or 512)
        grid = self.packed_grid(height, width) if height and width else image_grid
        img_ids = type(self.pipe)._prepare_latent_image_ids(emb.shape[0], grid[0], grid[1], device, emb.dtype)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled, "txt_ids": text_ids, "img_ids": img_ids,
                "guidance": self.guidance_embedding(emb.shape[0], guidance_scale)}

    def denoise(self, z, t, cond):
        ts = t.expand(z.shape[0]).to(z.device) if isinstance(t, torch.Tensor) else torch.full((z.shape[0],), t)
        return self.denoiser(hidden_states=z, timestep=ts.to(z.dtype) / 1000, return_dict=False, **cond)

    def inversion_condition(self, prompt, guidance, height, width, negative_prompt="", max_sequence_length=None):
        device = self.denoiser.device
        pe, pp, text_ids = self.pipe.encode_prompt(prompt, None, device=device, num_images_per_prompt=1,
                                                   max_sequence_length=max_sequence_length or 512)
        gh, gw = self.packed_grid(height, width)
        img_ids = self.pipe._prepare_latent_image_ids(1, gh, gw, device, pe.dtype)
        extra = {"pooled_projections": pp, "txt_ids": text_ids, "img_ids": img_ids}
        emb = self.guidance_embedding(1, guidance)
        if emb is not None:
            extra["guidance"] = emb
        return InversionCondition(self, pe, extra, guidance, False)

    def inversion_forward(self, xin, t, context, extra):
        return self.denoiser(hidden_states=xin, timestep=(t / 1000).expand(xin.shape[0]).to(xin.dtype),
                             encoder_hidden_states=context, return_dict=False, **extra)[0]

    def inversion_guidance(self, guidance: float) -> float:
        """FLUX's guidance is an input embedding (no CFG): invert with the value sampling will use."""
        return guidance

    def flow_schedule(self, steps, height, width):
        sched = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        gh, gw = self.packed_grid(height, width)
        sigmas = None if getattr(sched.config, "use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = mu_for(self.pipe, gh * gw)
        kwargs = {"mu": mu} if sigmas is None else {"sigmas": sigmas, "mu": mu}
        sched.set_timesteps(num_inference_steps=None if sigmas is not None else steps, **kwargs)
        return sched

    @classmethod
    def build_tiny(cls, seed: int = 0, **kw: Any):
        import diffusers as d

        from ..tiny import clip_text, clip_tokenizer, t5_text, t5_tokenizer, tiny_vae

        torch.manual_seed(seed)
        tr = d.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        )
        return d.FluxPipeline(
            transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(dit=True),
            text_encoder=clip_text(), tokenizer=clip_tokenizer(), text_encoder_2=t5_text(), tokenizer_2=t5_tokenizer(),
        )
