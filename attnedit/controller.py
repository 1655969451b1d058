"""The controller: installs attnedit on a pipeline, tracks steps and batch roles, runs controls.

One controller per installation. It owns:
- the universal processor on every attention module (originals saved, restored by `remove`),
- a pre-forward hook on the denoiser that reads the timestep, latent size, FLUX image ids and
  text length before any processor runs (steps are known by timestep, never by counting calls),
- pre-forward hooks on UNet `Transformer2DModel`s that record each level's exact token grid,
- the `BatchLayout` of the current forward and the `Run` (prompts, token indices, step count).
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .controls import PHASES, CallContext, Control
from .families import Family, family_of, text_segments
from .layers import LayerInfo, LayerRegistry, build_registry
from .layout import BatchLayout
from .processor import AttnEditProcessor
from .tokens import TokenIndex, index_prompt

_EXCLUSIVE_HOOKS = ("attend", "downsample", "window")


@dataclass
class Run:
    """What is known about the generation in progress (shared by all controls)."""

    pipe: Any
    family: Family
    registry: LayerRegistry
    prompts: list[str] = field(default_factory=list)
    tokens: list[TokenIndex] = field(default_factory=list)
    num_images_per_prompt: int = 1
    num_steps: int | None = None
    height: int | None = None
    width: int | None = None
    cfg: bool | None = None
    layout: BatchLayout | None = None
    max_sequence_length: int | None = None
    data: dict[str, Any] = field(default_factory=dict)  # shared scratch space between controls

    def tokens_of_sample(self, sample: int) -> TokenIndex:
        """Token index of the prompt that image `sample` of the batch was generated from."""
        if not self.tokens:
            raise ValueError("this control needs the prompt: run through EditPipeline or a pipeline call")
        return self.tokens[min(sample // max(self.num_images_per_prompt, 1), len(self.tokens) - 1)]

    def index_prompts(self, prompts: list[str]) -> None:
        segs = text_segments(self.pipe, self.family, self.max_sequence_length)
        self.prompts = list(prompts)
        self.tokens = [index_prompt(p, segs) for p in self.prompts]


class Controller:
    """Holds the controls of one installation and everything they read at run time."""

    def __init__(self, pipe: Any, controls: list[Control], denoiser: torch.nn.Module | None = None) -> None:
        for c in controls:
            if not isinstance(c, Control):
                raise TypeError(f"attnedit controls must be Control instances, got {type(c).__name__}")
        self.pipe = pipe
        self.family: Family = family_of(pipe)
        self.denoiser: torch.nn.Module = denoiser if denoiser is not None else getattr(pipe, self.family.denoiser)
        self.registry = _registry(self.denoiser, self.family.name)
        self.controls = list(controls)
        self.run = Run(pipe=pipe, family=self.family, registry=self.registry)
        # per-forward state
        self.step = 0
        self.timestep: float | None = None
        self.t = 1.0
        self.phase = "denoise"
        self.layout: BatchLayout | None = None
        self.layout_override: BatchLayout | None = None
        self.latent_hw: tuple[int, int] | None = None
        self.image_grid: tuple[int, int] | None = None
        self.text_len = 0
        self._grids: dict[str, tuple[int, int]] = {}
        self._active_cache: dict[str, list[Control]] | None = None
        self._active_key: tuple | None = None
        self._forced_step: int | None = None
        self._pending_prompts: dict[str, Any] | None = None
        self._saw_forward = False
        # installation state
        self._installed = False
        self._saved_processors: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._encode_wrapped = False
        self._cache_wrapped = False
        self._pass_name: str | None = None
        self._check_conflicts()

    # ----------------------------------------------------------------------------- install/remove
    def install(self) -> Controller:
        if self._installed:
            return self
        if getattr(self.pipe, "_attnedit_controller", None) is not None:
            raise RuntimeError("attnedit is already applied to this pipeline; call attnedit.remove(pipe) first")
        self._saved_processors = dict(self.denoiser.attn_processors)
        procs = {}
        for key, original in self._saved_processors.items():
            name = key[: -len(".processor")]
            info = self.registry.layers.get(name)
            procs[key] = AttnEditProcessor(info, self) if info is not None else original
        try:
            self.denoiser.set_attn_processor(procs)
            self._handles.append(self.denoiser.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            if self.family.arch == "unet":
                for parent in {n.split(".transformer_blocks.")[0] for n in self.registry.layers}:
                    module = self.denoiser.get_submodule(parent)
                    self._handles.append(module.register_forward_pre_hook(self._grid_hook(parent)))
            if hasattr(self.denoiser, "cache_context") and "cache_context" not in vars(self.denoiser):
                # FLUX runs true-CFG's uncond pass as a separate forward under cache_context("uncond")
                self.denoiser.cache_context = self._wrap_cache_context(self.denoiser.cache_context)
                self._cache_wrapped = True
            if hasattr(self.pipe, "encode_prompt") and "encode_prompt" not in vars(self.pipe):
                self.pipe.encode_prompt = self._wrap_encode(self.pipe.encode_prompt)
                self._encode_wrapped = True
        except Exception:
            self.remove()
            raise
        self.pipe._attnedit_controller = self
        self._installed = True
        for c in self.controls:
            c.reset()
        return self

    def remove(self) -> None:
        """Put back exactly the processors and methods the pipeline had."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._saved_processors:
            self.denoiser.set_attn_processor(dict(self._saved_processors))
            self._saved_processors = {}
        if self._encode_wrapped:
            del self.pipe.encode_prompt
            self._encode_wrapped = False
        if self._cache_wrapped:
            del self.denoiser.__dict__["cache_context"]
            self._cache_wrapped = False
        if getattr(self.pipe, "_attnedit_controller", None) is self:
            del self.pipe._attnedit_controller
        self._installed = False

    def __enter__(self) -> Controller:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    # ------------------------------------------------------------------------------ run lifecycle
    def begin_run(
        self,
        prompts: list[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        num_steps: int | None = None,
        height: int | None = None,
        width: int | None = None,
        cfg: bool | None = None,
        layout: BatchLayout | None = None,
        max_sequence_length: int | None = None,
    ) -> Run:
        """Start a run explicitly (EditPipeline does this; stock calls are detected by the hooks)."""
        self.run = Run(
            pipe=self.pipe,
            family=self.family,
            registry=self.registry,
            num_images_per_prompt=num_images_per_prompt,
            num_steps=num_steps,
            height=height,
            width=width,
            cfg=cfg,
            layout=layout,
            max_sequence_length=max_sequence_length,
        )
        if prompts is not None:
            self.run.index_prompts(prompts)
        self.timestep = None
        self.step = 0
        self._saw_forward = False
        self._active_cache = None
        self._check_conflicts(num_steps)
        for c in self.controls:
            c.reset()
            c.bind(self.run)
        return self.run

    def _check_conflicts(self, num_steps: int | None = None) -> None:
        """Refuse two controls that both replace the same part of one layer's attention."""
        for hook in _EXCLUSIVE_HOOKS:
            owners = [c for c in self.controls if c.overrides(hook)]
            for i, a in enumerate(owners):
                for b in owners[i + 1 :]:
                    shared = [x for x in self.registry if a.layers(x) and b.layers(x)]
                    if shared and _windows_overlap(a, b, num_steps):
                        raise ValueError(
                            f"controls {a.name!r} and {b.name!r} both set the attention {hook} on "
                            f"{len(shared)} layer(s) (e.g. {shared[0].name}) in overlapping steps; "
                            "give them disjoint `layers=` or `steps=`"
                        )

    # ---------------------------------------------------------------------------- hooks
    def _wrap_encode(self, original):
        sig = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            try:
                bound = sig.bind_partial(*args, **kwargs)
                params = bound.arguments
            except TypeError:
                params = kwargs
            prompt = params.get("prompt")
            if self._pending_prompts is None or self._saw_forward:
                if prompt is not None:
                    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                    self._pending_prompts = {
                        "prompts": prompts,
                        "num_images_per_prompt": int(params.get("num_images_per_prompt") or 1),
                        "max_sequence_length": params.get("max_sequence_length"),
                    }
                    self._saw_forward = False
                    if not getattr(self.pipe, "_attnedit_explicit_run", False):
                        self._start_stock_run()
            return original(*args, **kwargs)

        return encode_prompt

    def _wrap_cache_context(self, original):
        @contextmanager
        def cache_context(name: str, **kwargs):
            previous, self._pass_name = self._pass_name, name
            try:
                with original(name, **kwargs):
                    yield
            finally:
                self._pass_name = previous

        return cache_context

    def _start_stock_run(self) -> None:
        info = self._pending_prompts or {}
        self.begin_run(
            info.get("prompts"),
            num_images_per_prompt=info.get("num_images_per_prompt", 1),
            max_sequence_length=info.get("max_sequence_length"),
        )

    def _grid_hook(self, parent: str):
        def hook(module, args):
            hs = args[0] if args else None
            if hs is not None and hs.dim() == 4:
                self._grids[parent] = (int(hs.shape[-2]), int(hs.shape[-1]))

        return hook

    def _pre_forward(self, module, args, kwargs):
        self._saw_forward = True
        sample = kwargs.get("sample", kwargs.get("hidden_states"))
        if sample is None and args:
            sample = args[0]
        t = kwargs.get("timestep")
        if t is None and len(args) > 1:
            t = args[1]
        if t is None:
            raise RuntimeError("attnedit could not read the timestep passed to the denoiser")
        t_val = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None and len(args) > 2 and isinstance(args[2], torch.Tensor):
            ehs = args[2]
        fam = self.family.name
        if fam in ("sd", "sdxl"):
            self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
            self.image_grid = self.latent_hw
        elif fam == "flux":
            img_ids = kwargs.get("img_ids")
            if img_ids is not None:
                ids = img_ids[0] if img_ids.dim() == 3 else img_ids
                self.image_grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
            self.latent_hw = (self.image_grid[0] * 2, self.image_grid[1] * 2) if self.image_grid else None
            self.text_len = int(ehs.shape[1]) if ehs is not None else 0
        else:
            p = self.registry.patch
            self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
            self.image_grid = (self.latent_hw[0] // p, self.latent_hw[1] // p)
            self.text_len = int(ehs.shape[1]) if ehs is not None else 0
        if self.timestep is None and self._forced_step is None:
            self._check_processors()
        self._track_step(t_val)
        self._set_layout(int(sample.shape[0]))
        return None

    def _check_processors(self) -> None:
        """Refuse to run when something replaced attnedit's processors after `apply`."""
        for key, proc in self.denoiser.attn_processors.items():
            name = key[: -len(".processor")]
            if name in self.registry.layers and not (
                isinstance(proc, AttnEditProcessor) and proc.controller is self
            ):
                raise RuntimeError(
                    f"the attention processor of {name} was replaced by {type(proc).__name__} after "
                    "attnedit.apply (enable_attention_slicing, set_default_attn_processor, load_ip_adapter and "
                    "enable_xformers_memory_efficient_attention do this); call attnedit.remove(pipe) and apply again"
                )

    def _track_step(self, t_val: float) -> None:
        """Step index = position of the timestep in the schedule (by value, not by call count)."""
        self.t = min(max(t_val / self.family.timestep_scale, 0.0), 1.0)
        if self._forced_step is not None:
            new_step = self._forced_step
            new_run = False
        elif self.timestep is not None and math.isclose(t_val, self.timestep, rel_tol=0, abs_tol=1e-6):
            return  # another pass at the same step (CFG split, guidance, true CFG)
        else:
            sched_idx = self._schedule_index(t_val)
            if sched_idx is not None:
                new_run = self.timestep is None or sched_idx <= self.step
                new_step = sched_idx
            else:
                new_run = self.timestep is None or t_val > self.timestep
                new_step = 0 if new_run else self.step + 1
            if new_run and self.timestep is not None and self.phase == "denoise":
                # a second generation through the same installation (stock pipeline calls)
                self._start_stock_run()
        self.timestep = t_val
        self.step = new_step
        if self.run.num_steps is None:
            sched = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
            if sched is not None and len(sched):
                self.run.num_steps = len(sched)
        self._active_cache = None
        if self.phase == "denoise":
            for c in self.controls:
                c.begin_step(self.run, self.step)

    def _schedule_index(self, t_val: float) -> int | None:
        sched = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if sched is None or not len(sched):
            return None
        target = t_val * (1000.0 / self.family.timestep_scale) if self.family.name == "flux" else t_val
        diffs = (sched.float().cpu() - target).abs()
        i = int(diffs.argmin())
        return i if float(diffs[i]) <= 1e-3 * max(1.0, abs(target)) else None

    def _set_layout(self, batch: int) -> None:
        layout = self.layout_override or self.run.layout
        if layout is None:
            cfg = self.run.cfg
            if cfg is None:
                cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and self.family.name != "flux"
            if cfg and batch % 2:
                cfg = False
            only = "uncond" if self._pass_name == "uncond" else None
            layout = BatchLayout.standard(batch // 2 if cfg else batch, cfg, cfg_only=only)
        if layout.size != batch:
            raise ValueError(
                f"the batch layout describes {layout.size} rows but the denoiser received {batch}; "
                "check the number of prompts/targets against the layout"
            )
        self.layout = layout

    # ------------------------------------------------------------------------------- for controls
    @contextmanager
    def pass_phase(self, phase: str, layout: BatchLayout | None = None, step: int | None = None) -> Iterator[None]:
        """Run forwards as another phase (guidance, inversion), optionally with a fixed layout/step.

        The step fields (timestep, step, t) come back as they were: forwards of another phase never
        count as the denoising forward of the current timestep.
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
        saved = (self.phase, self.layout_override, self._forced_step,
                 self.timestep, self.step, self.t, self._saw_forward)
        self.phase, self.layout_override, self._active_cache = phase, layout, None
        if step is not None:
            self._forced_step = step
        try:
            yield
        finally:
            (self.phase, self.layout_override, self._forced_step,
             self.timestep, self.step, self.t, self._saw_forward) = saved
            self._active_cache = None

    def active_controls(self, layer: LayerInfo) -> list[Control]:
        key = (self.step, self.phase, self.run.num_steps)
        if self._active_cache is None or self._active_key != key:
            live = [c for c in self.controls if c.active(self.step, self.run.num_steps, self.phase)]
            self._active_cache = {}
            self._active_key = key
            self._live = live
        cached = self._active_cache.get(layer.name)
        if cached is None:
            cached = [c for c in self._live if c.selects(layer)]
            self._active_cache[layer.name] = cached
        return cached

    def grid_of(self, layer: LayerInfo) -> tuple[int, int]:
        """The token grid (H, W) of `layer` in the current forward."""
        if self.family.arch == "unet":
            parent = layer.name.split(".transformer_blocks.")[0]
            if parent in self._grids:
                return self._grids[parent]
            if self.latent_hw is None:
                raise RuntimeError("grid requested before the denoiser ran")
            return layer.grid(self.latent_hw)
        if self.image_grid is None:
            raise RuntimeError("grid requested before the denoiser ran")
        return self.image_grid

    def context(self, layer, attn, hidden_states, encoder_hidden_states, image, text, n_q) -> CallContext:
        grid = self.grid_of(layer)
        if grid[0] * grid[1] != image.stop - image.start:
            raise RuntimeError(
                f"layer {layer.name}: {image.stop - image.start} image tokens do not match its grid {grid}"
            )
        return CallContext(
            layer=layer,
            attn=attn,
            step=self.step,
            num_steps=self.run.num_steps,
            t=self.t,
            phase=self.phase,
            layout=self.layout,
            grid=grid,
            image=image,
            text=text,
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            run=self.run,
        )

    def step_callback(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        """`callback_on_step_end` for diffusers pipelines: lets controls update the latents."""
        updates: dict = {}
        for c in self.controls:
            if c.overrides("on_step_end"):
                tensors = {**callback_kwargs, **updates}
                updates.update(c.on_step_end(self.run, step_index, timestep, tensors) or {})
        return updates

    def records(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c in self.controls:
            rec = c.records()
            if rec:
                key = c.name if c.name not in out else f"{c.name}_{len(out)}"
                out[key] = rec
        return out

    def describe_layers(self, latent_hw: tuple[int, int] | None = None) -> list[dict[str, Any]]:
        """Registry as rows (name, kind, block, index, level, grid), for `attnedit info`."""
        rows = []
        for info in self.registry.ordered():
            row = {
                "name": info.name,
                "kind": info.kind,
                "block": info.block,
                "index": info.index,
                "level": info.level,
            }
            if latent_hw is not None:
                row["grid"] = info.grid(latent_hw, self.registry.patch)
            rows.append(row)
        return rows


_REGISTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _registry(denoiser: torch.nn.Module, family: str) -> LayerRegistry:
    """The layer registry of a denoiser, built once: module names do not change between runs."""
    cached = _REGISTRIES.get(denoiser)
    if cached is None or cached.family != family:
        cached = build_registry(denoiser, family)
        _REGISTRIES[denoiser] = cached
    return cached


def _windows_overlap(a: Control, b: Control, num_steps: int | None) -> bool:
    if not (set(a.phases) & set(b.phases)):
        return False
    try:
        lo_a, hi_a = a.steps.bounds(num_steps)
        lo_b, hi_b = b.steps.bounds(num_steps)
    except ValueError:
        return True  # fractional windows without a step count: assume they overlap
    return max(lo_a, lo_b) < min(hi_a, hi_b)
