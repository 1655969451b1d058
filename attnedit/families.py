"""The five supported model families and what differs between them.

Everything family-specific (which pipeline class, where the denoiser lives, how its timestep is
scaled, how text sequences are laid out, which call arguments the pipeline accepts) lives here so
the processor and the controls stay family-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokens import TextSegment


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    pipeline_classes: tuple[str, ...]
    denoiser: str  # attribute of the pipeline
    arch: str  # "unet" | "dit"
    timestep_scale: float  # t_hat = timestep / timestep_scale, in [0, 1]
    latent_factor: int  # pixels per latent pixel (the VAE scale factor of real checkpoints)
    patch: int  # latent pixels per image token side
    joint_order: str | None  # "image_text" (SD3), "text_image" (FLUX) or None
    supports_step_callback: bool
    supports_cross_attention_kwargs: bool
    default_steps: int
    default_guidance: float


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("sd", "Stable Diffusion 1.x / 2.x", ("StableDiffusionPipeline",), "unet", "unet",
               1000.0, 8, 1, None, True, True, 50, 7.5),
        Family("sdxl", "Stable Diffusion XL", ("StableDiffusionXLPipeline",), "unet", "unet",
               1000.0, 8, 1, None, True, True, 50, 5.0),
        Family("sd3", "Stable Diffusion 3", ("StableDiffusion3Pipeline",), "transformer", "dit",
               1000.0, 8, 2, "image_text", True, True, 28, 7.0),
        Family("flux", "FLUX.1", ("FluxPipeline",), "transformer", "dit",
               1.0, 8, 2, "text_image", True, True, 28, 3.5),
        Family("pixart", "PixArt-α / PixArt-Σ", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), "transformer",
               "dit", 1000.0, 8, 2, None, False, False, 20, 4.5),
    )
}

_BY_CLASS = {cls: fam for fam in FAMILIES.values() for cls in fam.pipeline_classes}


def supported_table() -> str:
    return ", ".join(f"{f.label} ({'/'.join(f.pipeline_classes)})" for f in FAMILIES.values())


def family_from_class(class_name: str) -> Family:
    """The family of a diffusers pipeline class name, or a clear error listing the supported ones."""
    fam = _BY_CLASS.get(class_name)
    if fam is None:
        raise ValueError(
            f"attnedit does not support pipelines of class {class_name!r}; supported families: "
            f"{supported_table()}"
        )
    return fam


def family_of(pipe) -> Family:
    return family_from_class(type(pipe).__name__)


def text_segments(pipe, family: Family, max_sequence_length: int | None = None) -> list[TextSegment]:
    """How the text sequence the denoiser attends to is made, segment by segment."""
    if family.name in ("sd", "sdxl"):
        tok = pipe.tokenizer if pipe.tokenizer is not None else pipe.tokenizer_2
        return [TextSegment(tok, 0, tok.model_max_length, True)]
    if family.name == "sd3":
        tok = pipe.tokenizer
        clip_len = tok.model_max_length
        segs = [TextSegment(tok, 0, clip_len, True)]
        if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
            segs.append(TextSegment(pipe.tokenizer_3, clip_len, max_sequence_length or 256, False))
        return segs
    if family.name == "flux":
        return [TextSegment(pipe.tokenizer_2, 0, max_sequence_length or 512, False)]
    # pixart
    return [TextSegment(pipe.tokenizer, 0, max_sequence_length or 120, False)]
