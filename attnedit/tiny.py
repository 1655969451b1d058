"""Tiny random-weight pipelines of every supported family, built offline from configs.

They exercise every code path in well under a second on a CPU (tests, the no-download default
model). Their images are noise-like: random weights prove the code runs, nothing more.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")


def clip_tokenizer(max_length: int = 77):
    """A byte-level CLIP tokenizer in memory: every character is a token, no merges, no <unk>."""
    from transformers import CLIPTokenizer

    chars = byte_level_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="<|endoftext|>")


def byte_level_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def t5_tokenizer(max_length: int = 512):
    """A character-level T5 (Unigram) tokenizer in memory."""
    from transformers import T5Tokenizer

    printable = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -2.0) for c in printable] + [("▁" + c, -1.5) for c in printable]
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=max_length)


def _clip_text(projection: bool = False, hidden: int = 32, vocab: int = 1000):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab,
        projection_dim=32,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5_text():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=320, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    return T5EncoderModel(cfg)


def _vae(dit: bool = False):
    from diffusers import AutoencoderKL

    kw = dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=64,
    )
    if dit:
        kw.update(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return AutoencoderKL(**kw)


def build_tiny(family: str, seed: int = 0, levels: int = 2):
    """A tiny pipeline of `family` ("sd", "sdxl", "sd3", "flux", "pixart") with random weights.

    `levels=3` gives the SD UNet a third resolution level (three cross-attention grids).
    """
    import diffusers as d

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    if family == "sd":
        chans = (16, 32) if levels == 2 else (16, 32, 32)
        down = ("CrossAttnDownBlock2D",) * len(chans)
        up = ("CrossAttnUpBlock2D",) * len(chans)
        unet = d.UNet2DConditionModel(
            block_out_channels=chans, layers_per_block=1, down_block_types=down, up_block_types=up,
            cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8, sample_size=8,
        )
        sched = d.DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1,
        )
        pipe = d.StableDiffusionPipeline(
            vae=_vae(), text_encoder=_clip_text(), tokenizer=clip_tokenizer(), unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    elif family == "sdxl":
        unet = d.UNet2DConditionModel(
            block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8, sample_size=8,
        )
        sched = d.EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading")
        pipe = d.StableDiffusionXLPipeline(
            vae=_vae(), text_encoder=_clip_text(), tokenizer=clip_tokenizer(),
            text_encoder_2=_clip_text(projection=True), tokenizer_2=clip_tokenizer(), unet=unet,
            scheduler=sched, add_watermarker=False,
        )
    elif family == "sd3":
        tr = d.SD3Transformer2DModel(
            sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
            pooled_projection_dim=64, out_channels=4, pos_embed_max_size=32,
        )
        pipe = d.StableDiffusion3Pipeline(
            transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(dit=True),
            text_encoder=_clip_text(projection=True), tokenizer=clip_tokenizer(),
            text_encoder_2=_clip_text(projection=True), tokenizer_2=clip_tokenizer(),
            text_encoder_3=_t5_text(), tokenizer_3=t5_tokenizer(),
        )
    elif family == "flux":
        tr = d.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        )
        pipe = d.FluxPipeline(
            transformer=tr, scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=_vae(dit=True),
            text_encoder=_clip_text(), tokenizer=clip_tokenizer(),
            text_encoder_2=_t5_text(), tokenizer_2=t5_tokenizer(),
        )
    else:
        tr = d.PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, cross_attention_dim=24, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6,
        )
        pipe = d.PixArtAlphaPipeline(
            tokenizer=t5_tokenizer(), text_encoder=_t5_text(), vae=_vae(), transformer=tr,
            scheduler=d.DDIMScheduler(),
        )
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(family: str) -> dict:
    """Extra pipeline arguments the tiny pipelines need."""
    if family in ("sd3", "pixart"):
        kw = {"max_sequence_length": 32}
        if family == "pixart":
            kw.update(use_resolution_binning=False, clean_caption=False)
        return kw
    if family == "flux":
        return {"max_sequence_length": 48}
    return {}
