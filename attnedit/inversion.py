"""Real-image inversion and editing: DDIM inversion (UNets), Euler inversion (flow-matching DiTs).

`invert` maps an image to the initial noise that regenerates it, recording every intermediate
latent. `edit` then denoises a source and target(s) from that noise with a control (MasaCtrl by
default) while the source branch is pinned to the recorded inversion trajectory after every step
(the MasaCtrl maintainers' advice for reproducing the paper, TencentARC/MasaCtrl issues #32, #35),
so the source reconstructs the input and the target reads its keys/values.

Choices (the MasaCtrl paper's real-image setting and the maintainers' advice):
- Inversion runs with guidance 1 by default: with the paper's empty prompt, CFG 7.5 gives the
  same result at twice the cost (uncond = cond).
- UNet inversion and the edit both use a DDIM scheduler built from the pipeline's scheduler
  config (swapped in for the edit and put back afterwards), so the trajectories match exactly.
  epsilon and v-prediction models are supported; others raise.
- DiTs (SD3, FLUX): the exact reverse of the flow-matching Euler sampler on the pipeline's own
  sigma schedule, with the velocity evaluated at the latent being inverted.
- Input images: not RGB -> converted (with a warning); a size that is not a multiple of the
  model's stride -> resized to the nearest multiple (`fit="resize"`, default) or padded at the
  right/bottom by edge replication (`fit="pad"`), with a warning saying which.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import validate
from .controls import Control
from .layout import BatchLayout

_FITS = ("resize", "pad")


@dataclass
class Inversion:
    """What `invert` returns (unpacks as `latent, latents = inversion`).

    - `latent`: the inverted noise, in the pipeline's latent format (packed for FLUX).
    - `latents`: every latent of the trajectory, clean first: `latents[0]` is the encoded image,
      `latents[j]` the latent after j inversion steps, `latents[-1] is latent`.
    - `timesteps`: the sampling schedule (descending) the trajectory belongs to; denoising step i
      from `latents[-1 - i]` lands on `latents[-2 - i]`.
    """

    latent: torch.Tensor
    latents: list[torch.Tensor]
    timesteps: torch.Tensor
    prompt: str
    steps: int
    height: int
    width: int
    image: Image.Image
    notes: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter((self.latent, self.latents))


# ----------------------------------------------------------------------------------- images
def prepare_image(image: Any, stride: int, fit: str = "resize") -> tuple[Image.Image, list[str]]:
    """Load/convert `image` to an RGB PIL image whose sides are multiples of `stride`."""
    if fit not in _FITS:
        raise ValueError(f"fit must be one of {', '.join(_FITS)}, got {fit!r}")
    notes: list[str] = []
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise validate.InputError("image", str(path), "an existing image file", note="no such file")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as err:
            raise validate.InputError("image", str(path), "an image file PIL can read (PNG, JPEG, WebP, ...)",
                                      note=type(err).__name__) from None
    elif isinstance(image, np.ndarray):
        validate.finite_tensor("image", image)
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    elif isinstance(image, torch.Tensor):
        validate.finite_tensor("image", image)
        t = image.detach().float().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)
        if float(t.min()) < 0:
            t = (t + 1) / 2
        image = Image.fromarray((t.clamp(0, 1).numpy() * 255).round().astype(np.uint8).squeeze())
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"image must be a PIL image, a file path, a numpy array or a tensor, got {type(image).__name__}"
        )
    if image.mode != "RGB":
        notes.append(f"image mode {image.mode} converted to RGB")
        image = image.convert("RGB")
    w, h = image.size
    if w % stride or h % stride:
        if fit == "resize":
            nw, nh = max(stride, round(w / stride) * stride), max(stride, round(h / stride) * stride)
            image = image.resize((nw, nh), Image.Resampling.BICUBIC)
            notes.append(f"image resized from {w}x{h} to {nw}x{nh} (W x H): sides must be multiples of {stride}")
        else:
            nw, nh = math.ceil(w / stride) * stride, math.ceil(h / stride) * stride
            arr = np.asarray(image)
            arr = np.pad(arr, ((0, nh - h), (0, nw - w), (0, 0)), mode="edge")
            image = Image.fromarray(arr)
            notes.append(f"image padded from {w}x{h} to {nw}x{nh} (W x H, edge pixels repeated at the right/bottom): "
                         f"sides must be multiples of {stride}")
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return image, notes


def encode_image(edit_pipe, image: Image.Image) -> torch.Tensor:
    """VAE posterior mean of `image`, scaled (and shifted, packed) like the pipeline's latents."""
    return edit_pipe.family.encode_image(image)


# -------------------------------------------------------------------------------- schedules
def ddim_scheduler(edit_pipe):
    """A DDIM scheduler with the pipeline's noise schedule (the pipeline's own settings if it is DDIM).

    From another scheduler's config (SDXL ships Euler), DDIM's own defaults would clip x0 to
    [-1, 1] and set the final alpha to one; MasaCtrl's settings are used instead
    (`clip_sample=False`, `set_alpha_to_one=False`), which keep the inversion exact.
    """
    from diffusers import DDIMScheduler

    config = edit_pipe.pipe.scheduler.config
    if type(edit_pipe.pipe.scheduler).__name__ == "DDIMScheduler":
        return DDIMScheduler.from_config(config)
    return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=False)


@contextmanager
def sampling_scheduler(edit_pipe) -> Iterator[None]:
    """Within the block a UNet pipeline samples with the DDIM scheduler its inversions assume
    (built from its own scheduler config); the original scheduler object is put back after."""
    pipe = edit_pipe.pipe
    saved = pipe.scheduler
    if edit_pipe.family.arch == "unet":
        pipe.scheduler = ddim_scheduler(edit_pipe)
    try:
        yield
    finally:
        pipe.scheduler = saved


def _flow_schedule(edit_pipe, steps: int, height: int, width: int):
    """A copy of the pipeline's flow scheduler set to the sigmas its own call would use."""
    return edit_pipe.family.flow_schedule(steps, height, width)


def _condition(edit_pipe, prompt: str, guidance: float, height: int, width: int, negative_prompt: str = ""):
    """The denoiser conditioned on one prompt (CFG rows only where `guidance > 1` batches them)."""
    msl = edit_pipe.call_defaults().get("max_sequence_length")
    return edit_pipe.family.inversion_condition(prompt, guidance, height, width, negative_prompt=negative_prompt,
                                                max_sequence_length=msl)


# -------------------------------------------------------------------------------- inversion
def invert(
    edit_pipe,
    image: Any,
    prompt: str = "",
    steps: int | None = None,
    *,
    guidance: float = 1.0,
    fit: str = "resize",
    negative_prompt: str = "",
) -> Inversion:
    """Invert `image` into the initial noise of a `steps`-step generation with `prompt`.

    DDIM inversion for UNet models (x_{t} = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps(x_prev, t), with
    x0_hat from the previous level), the reverse Euler sampler for flow-matching DiTs. Returns an
    `Inversion` with the inverted latent and every intermediate latent.
    """
    validate.text("prompt", prompt, empty=True)
    steps = validate.steps(steps) if steps is not None else edit_pipe.default_steps()
    guidance = validate.guidance(guidance)
    validate.choice("fit", fit, _FITS)
    validate.text("negative_prompt", negative_prompt, empty=True)
    if not edit_pipe.family.has("inversion"):
        from .families import families_with

        raise ValueError(f"inversion is not available for {edit_pipe.family.label} pipelines; supported: "
                         f"{', '.join(f.label for f in families_with('inversion'))}")
    img, notes = prepare_image(image, edit_pipe.pixel_stride, fit)
    width, height = img.size
    x = encode_image(edit_pipe, img)
    model = _condition(edit_pipe, prompt, guidance, height, width, negative_prompt)
    trajectory = [x]
    with torch.no_grad():
        if edit_pipe.family.arch == "unet":
            sched = ddim_scheduler(edit_pipe)
            sched.set_timesteps(steps)
            ptype = sched.config.prediction_type
            if ptype not in ("epsilon", "v_prediction"):
                raise ValueError(f"DDIM inversion supports epsilon and v_prediction models, not {ptype!r}")
            alphas = sched.alphas_cumprod.to(torch.float64)
            ratio = sched.config.num_train_timesteps // sched.num_inference_steps
            for t in sched.timesteps.flip(0):
                ti = int(t)
                prev = ti - ratio
                a_prev = float(alphas[prev]) if prev >= 0 else float(sched.final_alpha_cumprod)
                a_t = float(alphas[ti])
                out = model(x, t.to(edit_pipe.device)).to(torch.float64)
                xd = x.to(torch.float64)
                if ptype == "epsilon":
                    # the sampler maps x_t to x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps; solve for x_t
                    x0 = (xd - math.sqrt(1 - a_prev) * out) / math.sqrt(a_prev)
                    x = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * out
                else:  # v-prediction: x_prev = A x_t + B v with the sampler's x0/eps from (x_t, v)
                    a = math.sqrt(a_prev * a_t) + math.sqrt((1 - a_prev) * (1 - a_t))
                    b = math.sqrt((1 - a_prev) * a_t) - math.sqrt(a_prev * (1 - a_t))
                    x = (xd - b * out) / a
                x = x.to(trajectory[0].dtype)
                trajectory.append(x)
            timesteps = sched.timesteps.clone()
        else:
            sched = _flow_schedule(edit_pipe, steps, height, width)
            sigmas = sched.sigmas.to(torch.float64)  # descending, last 0
            ts = sched.timesteps
            for i in range(len(ts) - 1, -1, -1):
                # forward: x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i, t_i); reverse it from x_{i+1}
                v = model(x, ts[i].to(edit_pipe.device)).to(torch.float64)
                x = (x.to(torch.float64) - (sigmas[i + 1] - sigmas[i]) * v).to(trajectory[0].dtype)
                trajectory.append(x)
            timesteps = ts.clone()
    return Inversion(latent=x, latents=trajectory, timesteps=timesteps.cpu(), prompt=prompt, steps=steps,
                     height=height, width=width, image=img, notes=notes)


# ------------------------------------------------------------------------------------ editing
class FollowTrajectory(Control):
    """Pins the source rows' latents to a recorded inversion trajectory after every step."""

    name = "follow_trajectory"
    phases = ("denoise",)

    def __init__(self, inversion: Inversion, samples: Sequence[int]) -> None:
        self.inversion = inversion
        self.samples = list(samples)
        super().__init__()

    def options(self) -> dict[str, Any]:
        return {"samples": self.samples, "steps": self.inversion.steps}

    def on_step_end(self, run, step: int, timestep, tensors: dict[str, torch.Tensor]) -> dict:
        inv = self.inversion
        expected = float(inv.timesteps[step])
        got = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if abs(expected - got) > 1e-3 * max(1.0, abs(expected)):
            raise RuntimeError(f"step {step}: the sampler is at timestep {got}, the inversion recorded {expected}")
        latents = tensors["latents"].clone()
        target = inv.latents[-2 - step].to(latents.device, latents.dtype)
        latents[self.samples] = target
        return {"latents": latents}


def edit(
    edit_pipe,
    image: Any,
    source_prompt: str,
    target_prompt: str | Sequence[str],
    control: Control | None = None,
    *,
    controls: Sequence[Control] = (),
    steps: int | None = None,
    guidance: float | None = None,
    inversion: Inversion | None = None,
    inversion_prompt: str = "",
    follow_source: bool = True,
    fit: str = "resize",
    **kw: Any,
):
    """Edit a real image: invert it, then denoise `[source, target(s)]` from the inverted noise.

    `control` defaults to `MasaCtrl()`; `follow_source` pins the source branch to the inversion
    trajectory (on by default); pass a precomputed `inversion` to reuse it. Returns a `Result`
    with the source reconstruction first, then the edited target(s); `records["inversion"]`
    says what was done to the input image.
    """
    validate.text("source_prompt", source_prompt, empty=True)
    targets = validate.prompts(target_prompt, "target_prompt")
    for bad in ("seed", "latents", "layout", "num_images", "height", "width"):
        if bad in kw:
            raise validate.InputError(bad, kw[bad], "", message=f"edit() sets {bad} from the image and its "
                                      "inversion; do not pass it")
    edit_pipe.check_pipe_kwargs(kw, "edit", ["control", "controls", "steps", "guidance", "inversion",
                                             "inversion_prompt", "follow_source", "fit", "negative_prompt"])
    steps = validate.steps(steps) if steps is not None else edit_pipe.default_steps()
    if guidance is not None:
        guidance = validate.guidance(guidance)
    validate.text("inversion_prompt", inversion_prompt, empty=True)
    validate.flag("follow_source", follow_source)
    validate.choice("fit", fit, _FITS)
    if control is not None and not isinstance(control, Control):
        raise validate.InputError("control", control, "a Control instance (MasaCtrl() by default)")
    if control is None:
        from .methods.masactrl import MasaCtrl

        control = MasaCtrl()
    guidance = float(guidance) if guidance is not None else edit_pipe.recommended()["guidance"]
    if inversion is None:
        inv_guidance = edit_pipe.family.inversion_guidance(guidance)
        inversion = invert(edit_pipe, image, prompt=inversion_prompt, steps=steps, fit=fit, guidance=inv_guidance)
    elif inversion.steps != int(steps):
        raise ValueError(f"the inversion has {inversion.steps} steps but the edit asks for {steps}; they must match")
    n = 1 + len(targets)
    cfg = edit_pipe.family.uses_cfg(guidance)
    layout = BatchLayout.standard(n, cfg, groups=[0] * n, roles=["source"] + ["target"] * len(targets))
    latents = inversion.latent.expand(n, *inversion.latent.shape[1:]).clone()
    extra = [FollowTrajectory(inversion, [0])] if follow_source else []
    with sampling_scheduler(edit_pipe):
        result = edit_pipe.generate(
            [source_prompt, *targets], controls=[control, *controls, *extra], seed=0, steps=steps,
            guidance=guidance, height=inversion.height, width=inversion.width, layout=layout, latents=latents, **kw,
        )
    result.records["inversion"] = {"steps": inversion.steps, "prompt": inversion.prompt, "notes": inversion.notes,
                                   "size": [inversion.height, inversion.width], "follow_source": follow_source}
    result.params["edit"] = {"source_prompt": source_prompt, "targets": targets, "inversion_prompt": inversion.prompt}
    return result


__all__ = ["FollowTrajectory", "Inversion", "edit", "encode_image", "invert", "prepare_image", "sampling_scheduler"]
