"""The family adapter: what attnedit needs to know about one kind of diffusers pipeline, in one class.

On the model of k-diffusion's model wrappers (one small class per model kind that owns how to call
it), a `Family` subclass per family (`attnedit/families/<family>.py`) owns:
- what it is: pipeline classes, where the denoiser lives, UNet or DiT, its capabilities, defaults;
- its layers: which attention modules exist and what each is (`build_registry`);
- its attention call: the stock processor reproduced step by step, with attnedit's controls between
  "project" and "attend" (`attention`);
- how to read one denoiser forward (latent size, image grid, text length) and rebuild its input;
- its text: how prompts are encoded and which text positions are which words (`text_segments`);
- its latents: shape, packing, initial noise, image encoding, the denoiser call `denoise(z, t, cond)`;
- its defaults for the methods that depend on the architecture (`method_defaults`).

Nothing outside `attnedit/families/` compares family names: callers ask the adapter.
An adapter instance is bound to one pipeline (`family_of(pipe)`); the class attributes work without one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:
    from ..layers import LayerRegistry
    from ..tokens import TextSegment

#: what a family can offer the controls (a control declares what it `requires`)
CAPABILITIES = {
    "unet": "a UNet denoiser: attention per resolution level",
    "dit": "a diffusion transformer: one image-token grid per layer",
    "step_callback": "a step callback (callback_on_step_end) to update the latents between steps",
    "text_maps": "cross-attention maps of the prompt's words",
    "spatial_self_attention": "self-attention among the image tokens alone (no joint text tokens)",
    "clip_text": "a CLIP text encoder (start and end tokens around the prompt)",
    "inversion": "inversion of real images (DDIM for UNets, Euler for flow models)",
    "clear_distillation": "CLEAR's distillation fine-tuning (FLUX-architecture double/single-stream DiTs)",
}


@dataclass(frozen=True)
class ForwardInfo:
    """What one denoiser forward says about its tokens: latent size, image-token grid, text length."""

    latent_hw: tuple[int, int] | None
    image_grid: tuple[int, int] | None
    text_len: int = 0


class Family:
    """Base class of the family adapters (see the module docstring)."""

    name: ClassVar[str] = ""  # a concrete family sets it; the package registers every class that does
    label: ClassVar[str] = ""
    order: ClassVar[int] = 100  # position in tables and the conformance matrix (older families first)
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    denoiser_attr: ClassVar[str] = "transformer"  # the pipeline's attribute holding the denoiser
    arch: ClassVar[str] = "dit"  # "unet" | "dit"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    timestep_scale: ClassVar[float] = 1000.0  # t_hat = timestep / timestep_scale, in [0, 1]
    latent_factor: ClassVar[int] = 8  # pixels per latent pixel (the VAE scale factor of real checkpoints)
    joint_order: ClassVar[str | None] = None  # "image_text" | "text_image" | None
    cfg_in_batch: ClassVar[bool] = True  # CFG as [uncond, cond] rows of one batch (FLUX: separate passes)
    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float] = 7.5
    #: arguments of the call every run passes (e.g. PixArt: no resolution binning)
    call_defaults: ClassVar[dict[str, Any]] = {}
    #: call arguments that change how prompts are encoded (the run keeps the call's values for `encode_condition`)
    text_options: ClassVar[tuple[str, ...]] = ()
    #: keys of `encode_condition` that hold one row per prompt (the others, e.g. FLUX's position ids, are shared)
    row_keys: ClassVar[tuple[str, ...]] = ("encoder_hidden_states",)
    #: defaults of methods whose published settings depend on the architecture, by control name
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, pipe: Any, denoiser: torch.nn.Module | None = None) -> None:
        self.pipe = pipe
        self._denoiser = denoiser  # a denoiser outside the pipeline (a student being trained, a bare UNet)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.pipe).__name__})"

    # --- identity ----------------------------------------------------------------------------
    @classmethod
    def has(cls, capability: str) -> bool:
        if capability not in CAPABILITIES:
            raise KeyError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        return capability in cls.capabilities

    @classmethod
    def method_default(cls, control: str, key: str, default: Any = None) -> Any:
        """This family's published default of `control`'s option `key` (`default` where it has none)."""
        return cls.method_defaults.get(control, {}).get(key, default)

    @property
    def denoiser(self) -> torch.nn.Module:
        if self._denoiser is not None:
            return self._denoiser
        return getattr(self.pipe, self.denoiser_attr)

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", None) or self.latent_factor)

    @property
    def patch(self) -> int:
        """Latent pixels per image-token side."""
        return int(getattr(self.denoiser.config, "patch_size", 1) or 1)

    @property
    def pixel_stride(self) -> int:
        """Image sides must be multiples of this (latent factor x patch size)."""
        return self.vae_scale_factor * self.patch

    @property
    def true_cfg(self) -> bool:
        """Whether `guidance` is applied as true CFG in separate passes (no guidance embedding)."""
        return False

    def guidance_arguments(self, guidance: float, negative_prompt: Any = None) -> tuple[dict[str, Any], Any]:
        """The call arguments that make the pipeline guide at `guidance`, and the negative prompt to pass."""
        return {"guidance_scale": guidance}, negative_prompt

    def uses_cfg(self, guidance: float) -> bool:
        """Whether a call at `guidance` batches CFG rows (the rule every path needs)."""
        return self.cfg_in_batch and guidance > 1.0

    def native_size(self) -> tuple[int, int]:
        """The denoiser's native image size in pixels (config sample_size x VAE factor)."""
        size = getattr(self.denoiser.config, "sample_size", None)
        if size is None:
            return (1024, 1024)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return (size * self.vae_scale_factor, size * self.vae_scale_factor)

    def native_latent_side(self) -> int:
        """The native side of the latent (or token grid times patch) the methods' defaults refer to."""
        return self.native_size()[0] // self.vae_scale_factor

    # --- layers ------------------------------------------------------------------------------
    def build_registry(self, denoiser: torch.nn.Module) -> LayerRegistry:
        raise NotImplementedError

    def level_modules(self, registry: LayerRegistry) -> list[str]:
        """Modules whose input grid the controller records per forward (UNet levels; none for DiTs)."""
        return []

    def registry_patch(self) -> int:
        """Latent pixels per token side as the layer registry computes grids (FLUX: the 2x2 packing)."""
        return self.patch

    def grid_of_forward(self, info: ForwardInfo, layer: Any, level_grids: dict[str, tuple[int, int]]
                        ) -> tuple[int, int] | None:
        """The token grid of `layer` in a forward (DiTs: one grid for every layer)."""
        return info.image_grid

    # --- one forward -------------------------------------------------------------------------
    def read_forward(self, sample: torch.Tensor, kwargs: dict[str, Any], ehs: torch.Tensor | None,
                     previous: ForwardInfo | None) -> ForwardInfo:
        """Latent size, image grid and text length of a denoiser forward (before any processor runs)."""
        patch = self.registry_patch()
        hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        return ForwardInfo(hw, (hw[0] // patch, hw[1] // patch), int(ehs.shape[1]) if ehs is not None else 0)

    def schedule_value(self, t: float) -> float:
        """The value `scheduler.timesteps` holds for a forward called with timestep `t`."""
        return t

    def model_input(self, latents: torch.Tensor, sample: torch.Tensor, t: Any) -> torch.Tensor:
        """What the pipeline's loop feeds the denoiser from `latents` (CFG rows repeated; UNets also scale).

        The step-0 update of latent guidance rebuilds the first forward's input with this.
        """
        reps, rest = divmod(int(sample.shape[0]), int(latents.shape[0]))
        if rest or tuple(sample.shape[1:]) != tuple(latents.shape[1:]):
            raise RuntimeError(
                f"the denoiser's first input {tuple(sample.shape)} is not the pipeline's latents "
                f"{tuple(latents.shape)} repeated; attnedit cannot apply the step-0 update here"
            )
        x = latents.repeat(reps, *[1] * (latents.dim() - 1)) if reps > 1 else latents
        return self.scale_input(x, t).to(sample.dtype)

    def scale_input(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """The scheduler's input scaling (identity for flow models), leaving its step counter alone."""
        return x

    def cfg_rows(self, pipe_cfg: bool | None, guidance_scale: Any) -> bool | None:
        """Whether a stock call's forwards hold [uncond, cond] rows: the pipeline's own flag when it has one."""
        if not self.cfg_in_batch:
            return False
        return pipe_cfg

    # --- attention ---------------------------------------------------------------------------
    def processor_class(self, module: torch.nn.Module) -> type:
        """The attnedit processor class for `module`: one whose `__call__` takes the arguments its forward passes."""
        from ..processor import AttnEditProcessor

        return AttnEditProcessor

    def check_call(self, params: dict[str, Any]) -> None:
        """Refuse up front a pipeline call the controls cannot follow (raise ValueError); `params`: its arguments."""

    def attention(self, proc: Any, attn: torch.nn.Module, hidden_states: torch.Tensor, **kw: Any) -> Any:
        """One attention call, exactly as the stock processor makes it, with `proc.attend` for the middle."""
        raise NotImplementedError

    # --- text --------------------------------------------------------------------------------
    def text_segments(self, max_sequence_length: int | None = None) -> list[TextSegment]:
        """How the text sequence the denoiser attends to is made, tokenizer by tokenizer."""
        raise NotImplementedError

    def text_encoders(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs whose token embeddings new concept tokens extend (AttenCraft)."""
        raise ValueError(f"learned concept tokens are not available for {self.label}")

    def trainable_condition(self, prompts: list[str], height: int, width: int) -> dict[str, Any]:
        """Denoiser kwargs of `prompts` with gradients through the text encoders (learning new tokens)."""
        raise ValueError(f"learned concept tokens are not available for {self.label}")

    def encode_condition(self, prompts: list[str], n_per: int, *, height: int | None, width: int | None,
                         image_grid: tuple[int, int] | None, max_sequence_length: int | None,
                         guidance_scale: float | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Cond-branch denoiser kwargs of `prompts`, as the pipeline computes them (no CFG).

        `options`: the call's own values of the arguments named in `text_options`.
        """
        raise ValueError(f"latent guidance is not available for {self.label}")

    def denoise(self, z: torch.Tensor, t: Any, cond: dict[str, Any]) -> Any:
        """Call the denoiser on latents `z` at timestep `t` as the pipeline's loop does (cond rows)."""
        raise NotImplementedError

    # --- latents and images --------------------------------------------------------------------
    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (n, self.denoiser.config.in_channels, height // f, width // f)

    def initial_latents(self, n: int, height: int, width: int, generators: list[torch.Generator]) -> torch.Tensor:
        """Per-image seeded initial noise in the layout the pipeline expects (unscaled: the pipeline scales)."""
        shape = self.latent_shape(1, height, width)[1:]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        return noise.to(self.denoiser.device, self.denoiser.dtype)

    @torch.no_grad()
    def encode_image(self, image: Any) -> torch.Tensor:
        """VAE posterior mean of an RGB PIL image, scaled and shifted like the pipeline's latents."""
        import numpy as np

        vae = self.pipe.vae
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        lat = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        lat = (lat - shift) * vae.config.scaling_factor
        return self.pack(lat.to(self.denoiser.device, self.denoiser.dtype))

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents in the layout the denoiser takes (FLUX packs 2x2 patches)."""
        return latents

    # --- inversion ---------------------------------------------------------------------------
    def inversion_guidance(self, guidance: float) -> float:
        """The guidance an edit's inversion runs at: 1 (no CFG) unless guidance is an input embedding."""
        return 1.0

    def flow_schedule(self, steps: int, height: int, width: int) -> Any:
        raise ValueError(f"{self.label} is not sampled with a flow-matching scheduler")

    def inversion_condition(self, prompt: str, guidance: float, height: int, width: int,
                            negative_prompt: str = "", max_sequence_length: int | None = None) -> InversionCondition:
        raise ValueError(f"inversion is not available for {self.label} pipelines; supported: "
                         "Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX")

    @classmethod
    def load_options(cls) -> dict[str, Any]:
        """Extra `from_pretrained` arguments every load of this family passes."""
        return {}

    # --- tiny pipelines ----------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, seed: int = 0, **kw: Any) -> Any:
        """A tiny random-weight pipeline of this family, built offline (tests, cost measurements)."""
        raise NotImplementedError(f"no tiny pipeline for {cls.label}")

    #: extra call arguments the tiny pipeline needs (short text sequences)
    tiny_call_kwargs: ClassVar[dict[str, Any]] = {}


@dataclass
class InversionCondition:
    """The denoiser conditioned on one prompt for inversion (CFG rows when `guidance > 1` and batched)."""

    family: Family
    context: torch.Tensor
    extra: dict[str, Any]
    guidance: float
    cfg: bool

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xin = torch.cat([x, x]) if self.cfg else x
        out = self.family.inversion_forward(xin, t, self.context, self.extra)
        if self.cfg:
            u, c = out.chunk(2)
            out = u + self.guidance * (c - u)
        return out


# ------------------------------------------------------------------------------------ shared parts
_UNET_RE = re.compile(
    r"^(?P<block>down_blocks|mid_block|up_blocks)(?:\.(?P<bi>\d+))?\.attentions\.(?P<ai>\d+)"
    r"\.transformer_blocks\.(?P<ti>\d+)\.(?P<attn>attn\d)$"
)
_DIT_RE = re.compile(r"^(?P<stack>transformer_blocks|single_transformer_blocks)\.(?P<ti>\d+)\.(?P<attn>attn\d?)$")


def attention_module_names(denoiser: torch.nn.Module) -> list[str]:
    return [key[: -len(".processor")] for key in denoiser.attn_processors]


class UNetFamily(Family):
    """Stable-Diffusion-style UNets: attention per resolution level, named by diffusers' block names."""

    denoiser_attr = "unet"
    arch = "unet"

    def build_registry(self, denoiser: torch.nn.Module) -> LayerRegistry:
        from ..layers import LayerInfo, LayerRegistry

        modules = dict(denoiser.named_modules())
        reg = LayerRegistry(family=self.name, patch=1)
        n_down = len(getattr(denoiser, "down_blocks", []))
        n_up = len(getattr(denoiser, "up_blocks", []))
        entries = []
        for name in attention_module_names(denoiser):
            m = _UNET_RE.match(name)
            if m is None:
                continue  # e.g. attention inside a VAE-like block: not a text-to-image layer
            block = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[m["block"]]
            bi = int(m["bi"]) if m["bi"] is not None else 0
            level = bi if block == "down" else (n_down - 1 if block == "mid" else n_up - 1 - bi)
            order = {"down": 0, "mid": 1, "up": 2}[block]
            entries.append((order, bi, int(m["ai"]), int(m["ti"]), m["attn"], name, block, level))
        tb_keys = sorted({e[:4] for e in entries})  # execution index: (block order, block, attention, tb)
        tb_index = {k: i for i, k in enumerate(tb_keys)}
        for order, bi, ai, ti, attn_name, name, block, level in entries:
            module = modules[name]
            kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
            reg.layers[name] = LayerInfo(name=name, kind=kind, block=block, block_index=bi, attention_index=ai,
                                         transformer_index=ti, index=tb_index[(order, bi, ai, ti)], level=level,
                                         attn_name=attn_name)
            reg.modules[name] = module
        return _checked(reg, denoiser, self.name)

    def read_forward(self, sample, kwargs, ehs, previous):
        hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        return ForwardInfo(hw, hw, 0)

    def level_modules(self, registry):
        return sorted({n.split(".transformer_blocks.")[0] for n in registry.layers})

    def grid_of_forward(self, info, layer, level_grids):
        """The grid each level's `Transformer2DModel` received (recorded by a hook), else the ceil rule."""
        parent = layer.name.split(".transformer_blocks.")[0]
        if parent in level_grids:
            return level_grids[parent]
        return layer.grid(info.latent_hw) if info.latent_hw is not None else None

    def scale_input(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        scheduler = self.pipe.scheduler
        saved = getattr(scheduler, "_step_index", None)
        x = scheduler.scale_model_input(x, t)
        if hasattr(scheduler, "_step_index"):
            scheduler._step_index = saved  # scale_model_input may initialise the scheduler's step counter
        return x

    def denoise(self, z: torch.Tensor, t: Any, cond: dict[str, Any]) -> Any:
        return self.denoiser(self.scale_input(z, t), t, return_dict=False, **cond)

    def inversion_forward(self, xin, t, context, extra):
        return self.denoiser(xin, t, encoder_hidden_states=context, return_dict=False, **extra)[0]

    def attention(self, proc, attn, hidden_states, **kw):
        return legacy_attention(proc, attn, hidden_states, **kw)


class DiTFamily(Family):
    """Diffusion transformers whose attention modules are `transformer_blocks.N.attn*` (and FLUX's single stack)."""

    denoiser_attr = "transformer"
    arch = "dit"

    def classify(self, module: torch.nn.Module, single: bool) -> tuple[str, str]:
        """(kind, block) of one attention module."""
        kind = "cross" if getattr(module, "is_cross_attention", False) else "self"
        return kind, "dit"

    def build_registry(self, denoiser: torch.nn.Module) -> LayerRegistry:
        from ..layers import LayerInfo, LayerRegistry

        modules = dict(denoiser.named_modules())
        reg = LayerRegistry(family=self.name, patch=self.registry_patch())
        n_double = len(getattr(denoiser, "transformer_blocks", []))
        for name in attention_module_names(denoiser):
            m = _DIT_RE.match(name)
            if m is None:
                continue
            module = modules[name]
            ti = int(m["ti"])
            single = m["stack"] == "single_transformer_blocks"
            kind, block = self.classify(module, single)
            reg.layers[name] = LayerInfo(name=name, kind=kind, block=block, block_index=0, attention_index=0,
                                         transformer_index=ti, index=ti + (n_double if single else 0), level=0,
                                         attn_name=m["attn"])
            reg.modules[name] = module
        return _checked(reg, denoiser, self.name)

    def denoise(self, z: torch.Tensor, t: Any, cond: dict[str, Any]) -> Any:
        ts = t.expand(z.shape[0]).to(z.device) if isinstance(t, torch.Tensor) else torch.full((z.shape[0],), t)
        return self.denoiser(hidden_states=z, timestep=ts, return_dict=False, **cond)


def _checked(reg: LayerRegistry, denoiser: torch.nn.Module, family: str) -> LayerRegistry:
    if not reg.layers:
        raise ValueError(f"no attention layers recognised in {type(denoiser).__name__} for family {family!r}")
    return reg


def legacy_attention(proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     ignore_mask: bool = False, **_: Any):
    """diffusers' `AttnProcessor2_0` / `JointAttnProcessor2_0` step by step (SD, SDXL, SD3, PixArt).

    `ignore_mask`: the stock processor ignores attention masks (SD3's JointAttnProcessor2_0).
    """
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
    if ignore_mask:
        attention_mask = None
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
        q, k, v = torch.cat([q, eq], dim=1), torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)
        image, text = slice(0, n_img), slice(n_img, k.shape[1])
    elif encoder_hidden_states is not None:
        image, text = slice(0, n_img), slice(0, k.shape[1])
    else:
        image, text = slice(0, n_img), None

    out = proc.attend(attn, hidden_states, encoder_hidden_states, q, k, v, attention_mask, image, text)
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


def mu_for(pipe: Any, seq_len: int, max_shift: float = 1.15) -> float | None:
    """The dynamic-shifting `mu` the pipeline's module computes for `seq_len` image tokens (None if none).

    `max_shift`: the pipeline's fallback when its scheduler config has none (SD3: 1.16, FLUX: 1.15).
    """
    import inspect

    calc = getattr(inspect.getmodule(type(pipe).__mro__[0]), "calculate_shift", None)
    if calc is None:
        for base in type(pipe).__mro__:
            calc = getattr(inspect.getmodule(base), "calculate_shift", None)
            if calc is not None:
                break
    if calc is None:
        return None
    cfg = pipe.scheduler.config
    return calc(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5), cfg.get("max_shift", max_shift))


__all__ = ["CAPABILITIES", "DiTFamily", "Family", "ForwardInfo", "InversionCondition", "UNetFamily",
           "attention_module_names", "legacy_attention", "mu_for"]
