"""Qwen-Image (`QwenImagePipeline`: joint [text, image] attention in double-stream blocks, packed
latents, a chat-templated Qwen2.5-VL text encoder, true CFG).

What differs from FLUX.1 (`flux.py`, whose packing, timestep and denoiser call it shares):
- the processor (`QwenDoubleStreamAttnProcessor2_0`) applies complex RoPE per stream
  (`apply_rotary_emb_qwen`) and masks padded text tokens with `encoder_hidden_states_mask`;
- the image grid comes from the `img_shapes` argument (no image ids);
- the prompt is read inside a chat template whose first `prompt_template_encode_start_idx` tokens
  (the system prefix) the pipeline drops, and sequences are as long as the longest prompt;
- `guidance` is true CFG (`true_cfg_scale`, against "" when no negative prompt is given).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Family, ForwardInfo
from .flux import Flux


class QwenImage(Flux):
    name = "qwenimage"
    order = 70
    label = "Qwen-Image"
    pipeline_classes = ("QwenImagePipeline",)
    capabilities = frozenset({"dit", "step_callback", "text_maps"})
    default_steps = 50
    default_guidance = 4.0
    # the byte-level tiny tokenizer spells the system prefix out byte by byte: its prompts start near token 110
    tiny_call_kwargs: ClassVar[dict[str, Any]] = {"max_sequence_length": 256}
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {"todo": {"native_latent": 128}}

    @property
    def true_cfg(self) -> bool:
        return True

    def guidance_arguments(self, guidance, negative_prompt=None):
        args: dict[str, Any] = {"true_cfg_scale": guidance}
        if getattr(self.denoiser.config, "guidance_embeds", False):
            args["guidance_scale"] = guidance  # a guidance-distilled checkpoint takes it as an input
        if guidance > 1.0 and negative_prompt is None:
            negative_prompt = ""  # the pipeline runs CFG only when a negative prompt is given
        return args, negative_prompt

    def native_size(self):
        side = int(getattr(self.pipe, "default_sample_size", 128) or 128)
        return (side * self.vae_scale_factor, side * self.vae_scale_factor)

    def classify(self, module, single):
        return "joint", "dit"

    def read_forward(self, sample, kwargs, ehs, previous):
        grid = previous.image_grid if previous is not None else None
        shapes = kwargs.get("img_shapes")
        if shapes:
            first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
            grid = (int(first[1]), int(first[2]))
        hw = (grid[0] * 2, grid[1] * 2) if grid else None
        return ForwardInfo(hw, grid, int(ehs.shape[1]) if ehs is not None else 0)

    # --- attention ---------------------------------------------------------------------------
    def attention(self, proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                  image_rotary_emb=None, encoder_hidden_states_mask=None, **_: Any):
        """`QwenDoubleStreamAttnProcessor2_0` step by step (text first in the joint sequence)."""
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("the Qwen-Image attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("the Qwen-Image attention takes encoder_hidden_states_mask, not attention_mask")
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        n_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (-1, head_dim))

        iq, ik, iv = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        tq = heads(attn.add_q_proj(encoder_hidden_states))
        tk = heads(attn.add_k_proj(encoder_hidden_states))
        tv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            iq = attn.norm_q(iq)
        if attn.norm_k is not None:
            ik = attn.norm_k(ik)
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            iq = apply_rotary_emb_qwen(iq, img_freqs, use_real=False)
            ik = apply_rotary_emb_qwen(ik, img_freqs, use_real=False)
            tq = apply_rotary_emb_qwen(tq, txt_freqs, use_real=False)
            tk = apply_rotary_emb_qwen(tk, txt_freqs, use_real=False)
        q, k, v = torch.cat([tq, iq], dim=1), torch.cat([tk, ik], dim=1), torch.cat([tv, iv], dim=1)
        out = proc.attend(attn, hidden_states, encoder_hidden_states, q, k, v, mask, slice(n_txt, q.shape[1]),
                          slice(0, n_txt))
        out = out.flatten(2, 3).to(q.dtype)
        text_out, image_out = out[:, :n_txt], out[:, n_txt:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.contiguous())

    # --- text --------------------------------------------------------------------------------
    def render_prompt(self, prompt: str) -> tuple[str, int]:
        """The templated text the tokenizer encodes and where the prompt starts in it."""
        template = self.pipe.prompt_template_encode
        start = template.index("{}")
        return template[:start] + prompt + template[start + 2:], start

    def text_segments(self, max_sequence_length=None):
        from ..tokens import TextSegment

        drop = int(self.pipe.prompt_template_encode_start_idx)
        return [TextSegment(self.pipe.tokenizer, 0, max_sequence_length or 1024, False, render=self.render_prompt,
                            drop=drop)]

    def encode_condition(self, prompts, n_per, *, height, width, image_grid, max_sequence_length,
                         guidance_scale=None, options=None):
        device = self.denoiser.device
        with torch.no_grad():
            emb, mask = type(self.pipe).encode_prompt(self.pipe, prompt=prompts, device=device,
                                                      num_images_per_prompt=n_per,
                                                      max_sequence_length=max_sequence_length or 1024)
        gh, gw = self.packed_grid(height, width) if height and width else image_grid
        cond = {"encoder_hidden_states": emb, "encoder_hidden_states_mask": mask,
                "img_shapes": [[(1, gh, gw)]] * emb.shape[0]}
        if getattr(self.denoiser.config, "guidance_embeds", False):
            scale = guidance_scale if guidance_scale is not None else self.default_guidance
            cond["guidance"] = torch.full((emb.shape[0],), float(scale), device=device, dtype=torch.float32)
        return cond

    # inversion is not offered (no "inversion" capability): its VAE is a video VAE with its own normalisation
    inversion_condition = Family.inversion_condition
    flow_schedule = Family.flow_schedule

    # --- tiny pipeline ---------------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, seed: int = 0, **kw: Any):
        import diffusers as d
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        from ..tiny import qwen_tokenizer

        torch.manual_seed(seed)
        tr = d.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        )
        vae = d.AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
        )
        config = Qwen2_5_VLConfig(
            text_config={"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                         "num_key_value_heads": 2, "vocab_size": 300, "bos_token_id": 257, "eos_token_id": 258,
                         "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
            vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                           "out_hidden_size": 16},
            hidden_size=16, vocab_size=300, vision_start_token_id=297, vision_end_token_id=298, vision_token_id=299,
            image_token_id=296, video_token_id=295,
        )
        text = Qwen2_5_VLForConditionalGeneration(config)
        return d.QwenImagePipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text,
                                   tokenizer=qwen_tokenizer(), transformer=tr)
