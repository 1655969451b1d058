"""The controller: installs attnedit on a pipeline, tracks steps and batch roles, runs controls.

One controller per installation. It owns:
- the universal processor on every attention module (originals saved, restored by `remove`),
- a pre-forward hook on the denoiser that reads the timestep, latent size, FLUX image ids and
  text length before any processor runs (steps are known by timestep, never by counting calls),
- pre-forward hooks on UNet `Transformer2DModel`s that record each level's exact token grid,
- the pipeline's `__call__` (the instance's class is swapped for a subclass that adds nothing
  but this, and swapped back by `remove`): each call starts a `Run` from its own arguments and,
  for controls that update the latents, composes attnedit's `callback_on_step_end` with the
  user's own callback and tensor inputs, so a stock `pipe(...)` gets the whole method,
- the `BatchLayout` of the current forward and the `Run` (prompts, token indices, step count).

A forward of the denoiser outside a pipeline call (a user's own loop) starts a run of its own,
so layer selections are resolved the same way; controls that must update the latents refuse it.
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

from .controls import NEEDS_PROMPT, PHASES, CallContext, Control
from .families import Family, ForwardInfo, families_with, family_of
from .layers import LayerInfo, LayerRegistry
from .layout import BatchLayout
from .processor import AttnEditProcessor
from .tokens import TokenIndex, index_prompt

# Hooks that replace one part of a layer's attention: two controls in one group cannot both act on a
# layer in the same step. ToDo's downsampling and CLEAR's window both decide which keys a query sees.
_EXCLUSIVE_GROUPS = {"set the attention attend": ("attend",), "change the keys (downsample / window)": (
    "downsample", "window")}


class NonFiniteError(RuntimeError):
    """A run produced NaN or inf (the denoiser's output or the decoded image): it stops, nothing is written."""


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
    text_options: dict[str, Any] = field(default_factory=dict)  # the call's values of `family.text_options`
    _controller: Any = field(default=None, repr=False, compare=False)

    @property
    def controls(self) -> tuple[Control, ...]:
        """Every control of this installation (a method refusing a combination reads the others here)."""
        return tuple(self._controller.controls) if self._controller is not None else ()

    @property
    def forward(self) -> ForwardInfo:
        """Latent size, image-token grid and text length of the denoiser forward in progress (or the last)."""
        return self._controller.forward_info if self._controller is not None else ForwardInfo(None, None, 0)

    def pass_phase(self, phase: str, layout: BatchLayout | None = None, step: int | None = None):
        """Run the forwards inside as another phase ("guidance", "inversion"); see `Controller.pass_phase`."""
        if self._controller is None:
            raise RuntimeError("this run belongs to no installed controller")
        return self._controller.pass_phase(phase, layout=layout, step=step)

    def tokens_of_sample(self, sample: int) -> TokenIndex:
        """Token index of the prompt that image `sample` of the batch was generated from."""
        if not self.tokens:
            raise ValueError(NEEDS_PROMPT.format(name="this control"))
        return self.tokens[min(sample // max(self.num_images_per_prompt, 1), len(self.tokens) - 1)]

    def index_prompts(self, prompts: list[str]) -> None:
        segs = self.family.text_segments(self.max_sequence_length)
        self.prompts = list(prompts)
        self.tokens = [index_prompt(p, segs) for p in self.prompts]


class Controller:
    """Holds the controls of one installation and everything they read at run time."""

    def __init__(self, pipe: Any, controls: list[Control], denoiser: torch.nn.Module | None = None) -> None:
        for c in controls:
            if not isinstance(c, Control):
                raise TypeError(f"attnedit controls must be Control instances, got {type(c).__name__}")
        self.pipe = pipe
        self.family: Family = family_of(pipe, denoiser)
        self.denoiser: torch.nn.Module = self.family.denoiser
        self.registry = _registry(self.family)
        self.controls = list(controls)
        self.run = Run(pipe=pipe, family=self.family, registry=self.registry, _controller=self)
        # per-forward state
        self.step = 0
        self.timestep: float | None = None
        self.t = 1.0
        self.phase = "denoise"
        self.layout: BatchLayout | None = None
        self.layout_override: BatchLayout | None = None
        self.forward_info = ForwardInfo(None, None, 0)  # latent size, image grid, text length of this forward
        self._grids: dict[str, tuple[int, int]] = {}
        self._active_cache: dict[str, list[Control]] | None = None
        self._active_key: tuple | None = None
        self._forced_step: int | None = None
        # run state: a run is open from `begin_run` until the pipeline call that began it returns
        self._run_open = False
        self._in_call = False
        self._call_options: dict[str, Any] = {}
        self._loop_latents: torch.Tensor | None = None
        self._first_step_pending = False
        # installation state
        self._installed = False
        self._saved_processors: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._cache_wrapped: tuple[bool, Any] = (False, None)
        self._class_swapped: type | None = None
        self._pass_name: str | None = None
        self._checked: tuple | None = None  # the controls whose set checks passed for any step count
        self._check_controls(final=False)

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
            if info is None:
                procs[key] = original
            else:
                procs[key] = self.family.processor_class(self.registry.modules[name])(info, self, original)
        try:
            self.denoiser.set_attn_processor(procs)
            self._handles.append(self.denoiser.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
            self._handles.append(self.denoiser.register_forward_hook(self._post_forward))
            decoder = getattr(getattr(self.pipe, "vae", None), "decoder", None)
            if isinstance(decoder, torch.nn.Module):
                self._handles.append(decoder.register_forward_hook(self._post_decode))
            for parent in self.family.level_modules(self.registry):
                module = self.denoiser.get_submodule(parent)
                self._handles.append(module.register_forward_pre_hook(self._grid_hook(parent)))
            if hasattr(self.denoiser, "cache_context"):
                # FLUX runs true-CFG's uncond pass as a separate forward under cache_context("uncond");
                # an instance attribute already there (a user's own wrapper) is wrapped and put back
                self._cache_wrapped = (True, vars(self.denoiser).get("cache_context"))
                self.denoiser.cache_context = self._wrap_cache_context(self.denoiser.cache_context)
            base = type(self.pipe)
            self.pipe.__class__ = _controlled_class(base)
            self._class_swapped = base
        except Exception:
            self.remove()
            raise
        self.pipe._attnedit_controller = self
        self._installed = True
        return self

    def remove(self) -> None:
        """Put back exactly the processors, class and methods the pipeline had."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._saved_processors:
            _carry_backend_choice(self.denoiser, self._saved_processors)
            self.denoiser.set_attn_processor(dict(self._saved_processors))
            self._saved_processors = {}
        wrapped, previous = self._cache_wrapped
        if wrapped:
            _restore_attribute(self.denoiser, "cache_context", previous)
            self._cache_wrapped = (False, None)
        if self._class_swapped is not None:
            self.pipe.__class__ = self._class_swapped
            self._class_swapped = None
        if getattr(self.pipe, "_attnedit_controller", None) is self:
            del self.pipe._attnedit_controller
        self._installed = False
        self._run_open = False
        self._in_call = False

    def __getattr__(self, name: str) -> Control:
        """A control of this installation by its name: `ctrl.store.word_map("cat")`, `ctrl.todo`."""
        if name.startswith("_"):
            raise AttributeError(name)
        found = [c for c in self.__dict__.get("controls", ()) if c.name == name]
        if len(found) == 1:
            return found[0]
        if found:
            raise AttributeError(f"{len(found)} controls are named {name!r}: use ctrl.controls[i]")
        names = ", ".join(c.name for c in self.__dict__.get("controls", ())) or "none"
        raise AttributeError(f"'Controller' has no attribute or control {name!r}; its controls: {names}")

    def __enter__(self) -> Controller:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _refuse_unsupported(self) -> None:
        """Refuse up front a control outside its families, or one that updates the latents where the
        pipeline has no step callback (checked when the controller is made and at every run)."""
        for c in self.controls:
            c.check_family(self.family)
        stepping = [c for c in self.controls if c.overrides("on_step_end") or c.overrides("prepare_latents")]
        if stepping and not pipeline_has_step_callback(self.pipe):
            names = ", ".join(type(c).__name__ for c in stepping)
            raise ValueError(
                f"{names} update(s) the latents between denoising steps through `callback_on_step_end`, which "
                f"{type(self.pipe).__name__} does not have, so it would do nothing here; it runs on "
                f"{', '.join(f.label for f in families_with('step_callback'))}"
            )

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
        text_options: dict[str, Any] | None = None,
    ) -> Run:
        """Start a run explicitly (pipeline calls and the denoiser's first forward do this themselves)."""
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
            text_options=dict(text_options or {}),
            _controller=self,
        )
        if prompts is not None:
            self.run.index_prompts(prompts)
        self.timestep = None
        self.step = 0
        self._active_cache = None
        self._run_open = False  # until every control is bound: a refused run leaves nothing half open
        self._check_controls(num_steps)
        for c in self.controls:
            c.reset()
            c.bind(self.run)
        self._first_step_pending = any(c.overrides("prepare_latents") for c in self.controls)
        self._run_open = True
        return self.run

    def _check_conflicts(self, num_steps: int | None = None, final: bool = True) -> bool:
        """Refuse two controls that both replace the same part of one layer's attention.

        Fractional step windows with no step count: left undecided unless `final` (a run that has no
        step count, a direct denoiser call, counts them as overlapping). Returns whether the verdict
        holds for any step count, so a run need not check again.
        """
        decided = True
        for what, hooks in _EXCLUSIVE_GROUPS.items():
            owners = [c for c in self.controls if any(c.overrides(h) for h in hooks)]
            for i, a in enumerate(owners):
                for b in owners[i + 1 :]:
                    shared = [x for x in self.registry if a.layers(x) and b.layers(x)]
                    if not shared:
                        continue
                    if _windows_overlap(a, b, None) is None:
                        decided = False  # fractional windows: each step count decides anew
                    overlap = _windows_overlap(a, b, num_steps)
                    if overlap or (overlap is None and final):
                        raise ValueError(
                            f"controls {a.name!r} and {b.name!r} both {what} on {len(shared)} layer(s) "
                            f"(e.g. {shared[0].name}) in overlapping steps; give them disjoint `layers=` or `steps=`"
                        )
        return decided

    def _check_controls(self, num_steps: int | None = None, final: bool = True) -> None:
        """The checks of the controls as a set (families, step callback, conflicts), once per set of controls:
        when the controller is made, and at a run only if the controls changed or a step count decides."""
        # a control's identity and what decides its conflicts: changed steps or layers are checked again
        key = tuple((id(c), repr(c.steps), repr(c.layers), tuple(c.phases)) for c in self.controls)
        if self._checked == key:
            return
        self._refuse_unsupported()
        self._checked = key if self._check_conflicts(num_steps, final) else None

    @contextmanager
    def call_options(self, **options: Any) -> Iterator[None]:
        """Run settings the pipeline's arguments do not carry (EditPipeline's `layout`), for the next call."""
        saved, self._call_options = self._call_options, dict(options)
        try:
            yield
        finally:
            self._call_options = saved

    # ------------------------------------------------------------------------------ pipeline calls
    def pipeline_call(self, call: Any, args: tuple, kwargs: dict) -> Any:
        """One call of the pipeline's own `__call__` with this installation's run around it.

        The run starts from the call's arguments (prompts, images per prompt, steps, size), so the
        controls are validated before any model runs. Latent-updating controls get the step callback
        composed with the user's: the user's callback first (it sees the scheduler's latents, as
        without attnedit), then attnedit's update of the next step's latents; the tensor inputs are
        the user's plus "latents". The step-0 update runs on the pipeline's own initial latents at
        the first forward, once the schedule is final.
        """
        if self._in_call:
            raise RuntimeError("a controlled pipeline was called again from inside its own call; attnedit runs "
                               "one call at a time per installation")
        sig = inspect.signature(call)
        bound = sig.bind(self.pipe, *args, **kwargs)
        params = {**{k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty},
                  **bound.arguments}
        wrapped, previous = False, None
        self._in_call = True
        self._loop_latents = None
        try:
            self.family.check_call(params)
            self.begin_run(**self._run_arguments(params))
            if any(c.overrides("on_step_end") for c in self.controls):
                user = params.get("callback_on_step_end")
                if _is_own_callback(user, self):
                    user = None  # the pre-0.2 way: `callback_on_step_end=ctrl.step_callback`
                inputs = getattr(user, "tensor_inputs", None) or params.get("callback_on_step_end_tensor_inputs") or []
                bound.arguments["callback_on_step_end"] = self._composed_callback(user)
                bound.arguments["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys([*inputs, "latents"]))
            if self._first_step_pending:  # wraps what is there (a user's own instance attribute too), put back below
                wrapped, previous = True, vars(self.pipe).get("prepare_latents")
                self.pipe.prepare_latents = self._wrap_prepare_latents(self.pipe.prepare_latents)
            return call(*bound.args, **bound.kwargs)
        finally:
            self._in_call = False
            self._run_open = False
            self._loop_latents = None
            if wrapped:
                _restore_attribute(self.pipe, "prepare_latents", previous)

    def _run_arguments(self, params: dict[str, Any]) -> dict[str, Any]:
        """`begin_run` arguments read from a pipeline call's bound arguments (plus `call_options`)."""
        prompt = params.get("prompt")
        prompts = None if prompt is None else ([prompt] if isinstance(prompt, str) else list(prompt))
        steps = params.get("num_inference_steps")
        for key in ("timesteps", "sigmas"):
            if params.get(key) is not None:
                steps = len(params[key])
        height, width = params.get("height"), params.get("width")
        if height is None or width is None:
            side = getattr(self.pipe, "default_sample_size", None)
            if side is None:
                side = getattr(self.denoiser.config, "sample_size", None)
                side = side[0] if isinstance(side, (list, tuple)) else side
            f = int(getattr(self.pipe, "vae_scale_factor", 8))
            height = height or (side * f if side else None)
            width = width or (side * f if side else None)
        out = dict(
            prompts=prompts,
            cfg=self.family.cfg_rows(None, params.get("guidance_scale")),
            num_images_per_prompt=int(params.get("num_images_per_prompt") or 1),
            num_steps=int(steps) if steps is not None else None,
            height=height,
            width=width,
            max_sequence_length=params.get("max_sequence_length"),
            text_options={k: params[k] for k in self.family.text_options if params.get(k) is not None},
        )
        out.update(self._call_options)
        return out

    def _composed_callback(self, user: Any):
        def callback_on_step_end(pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
            outputs: dict = {}
            if user is not None:
                outputs = dict(user(pipe, step_index, timestep, callback_kwargs) or {})
            updates = self.step_callback(pipe, step_index, timestep, {**callback_kwargs, **outputs})
            return {**outputs, **updates}

        return callback_on_step_end

    def _wrap_prepare_latents(self, original):
        """Keep the pipeline's initial latents (a private copy: a user's `latents=` is never written to)."""

        def prepare_latents(*args, **kwargs):
            out = original(*args, **kwargs)
            if isinstance(out, tuple):
                latents = out[0].clone()
                self._loop_latents = latents
                return (latents, *out[1:])
            self._loop_latents = out.clone()
            return self._loop_latents

        return prepare_latents

    # ---------------------------------------------------------------------------- hooks
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

    def _grid_hook(self, parent: str):
        def hook(module, args):
            hs = args[0] if args else None
            if hs is not None and hs.dim() == 4:
                self._grids[parent] = (int(hs.shape[-2]), int(hs.shape[-1]))

        return hook

    def _pre_forward(self, module, args, kwargs):
        key = "sample" if "sample" in kwargs else ("hidden_states" if "hidden_states" in kwargs else None)
        sample = kwargs[key] if key is not None else (args[0] if args else None)
        t = kwargs.get("timestep")
        if t is None and len(args) > 1:
            t = args[1]
        if t is None:
            raise RuntimeError("attnedit could not read the timestep passed to the denoiser")
        if self.phase == "denoise" and self._forced_step is None:
            if not self._in_call:
                self._refuse_direct_call()
            if not self._run_open:
                self.begin_run()
            if self.timestep is None:
                self._resolve_steps()
            if self._first_step_pending:
                self._first_step_pending = False
                new = self._first_step_update(sample, t)
                if new is not None:
                    sample = new
                    if key is not None:
                        kwargs = {**kwargs, key: new}
                    else:
                        args = (new, *args[1:])
        t_val = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None and len(args) > 2 and isinstance(args[2], torch.Tensor):
            ehs = args[2]
        self.forward_info = self.family.read_forward(sample, kwargs, ehs, self.forward_info)
        if self.timestep is None and self._forced_step is None:
            self._check_processors()
        self._track_step(t_val)
        self._set_layout(int(sample.shape[0]))
        return args, kwargs

    def _post_forward(self, module, args, output) -> None:
        """The final guard: a NaN / inf prediction stops the run, naming the step and the controls."""
        pred = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if isinstance(pred, torch.Tensor) and not bool(torch.isfinite(pred).all()):
            live = [type(c).__name__ for c in self.controls if c.active(self.step, self.run.num_steps, self.phase)]
            raise NonFiniteError(
                f"the denoiser's output holds NaN or inf at step {self.step} (timestep {self.timestep}, {self.phase} "
                f"pass); controls acting there: {', '.join(live) or 'none'}. Nothing was written"
            )

    def _post_decode(self, module, args, output) -> None:
        """The VAE decoder's output must be finite too (a float16 VAE overflows into NaN / inf: black images)."""
        if isinstance(output, torch.Tensor) and not bool(torch.isfinite(output).all()):
            names = ", ".join(type(c).__name__ for c in self.controls) or "none"
            raise NonFiniteError(
                f"the decoded image holds NaN or inf (controls: {names}). Nothing was written; in float16 the VAE "
                "can overflow: load the model with dtype='float32' or 'bfloat16'"
            )

    def _refuse_direct_call(self) -> None:
        """A denoising forward outside a pipeline call (the user's own loop): latent updates cannot run there."""
        stepping = [type(c).__name__ for c in self.controls
                    if c.overrides("on_step_end") or c.overrides("prepare_latents")]
        if stepping:
            raise RuntimeError(
                f"{', '.join(stepping)} update(s) the latents between steps, which needs a pipeline call "
                "(pipe(...) or EditPipeline.generate); called directly, the denoiser would run without it"
            )

    def _resolve_steps(self) -> None:
        """At a run's first denoising forward the schedule is final: it decides the number of steps, and
        every control's step window is checked against it (also for runs that began without a count)."""
        sched = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        if sched is not None and len(sched) and self.run.num_steps != len(sched):
            self.run.num_steps = len(sched)
            for c in self.controls:
                c.check_steps(self.run)

    def _first_step_update(self, sample: torch.Tensor, t: Any) -> torch.Tensor | None:
        """Controls' `prepare_latents` on the loop's initial latents; returns this forward's new input."""
        latents = self._loop_latents
        if latents is None:
            return None
        new = latents
        for c in self.controls:
            if c.overrides("prepare_latents"):
                new = c.prepare_latents(self.run, new)
        if new is latents:
            return None
        latents.copy_(new)  # the tensor the pipeline's loop holds: the scheduler steps from x_t as updated
        return self.family.model_input(latents, sample, t)

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
            if new_run and self.timestep is not None and self.phase == "denoise" and not self._in_call:
                # a second denoising loop through the same installation, outside a pipeline call
                self.begin_run()
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
        target = self.family.schedule_value(t_val)
        diffs = (sched.float().cpu() - target).abs()
        i = int(diffs.argmin())
        return i if float(diffs[i]) <= 1e-3 * max(1.0, abs(target)) else None

    def _set_layout(self, batch: int) -> None:
        layout = self.layout_override or self.run.layout
        if layout is not None and self.layout_override is None and self._pass_name == "uncond" \
                and not layout.indices(cfg="uncond"):
            layout = layout.as_half("uncond")  # a given cond layout, in the separate uncond pass
        if layout is None:
            cfg = self.run.cfg
            if cfg is None:
                cfg = bool(self.family.cfg_rows(bool(getattr(self.pipe, "do_classifier_free_guidance", False)), None))
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
        saved = (self.phase, self.layout_override, self._forced_step, self.timestep, self.step, self.t, self.layout)
        self.phase, self.layout_override, self._active_cache = phase, layout, None
        if step is not None:
            self._forced_step = step
        try:
            yield
        finally:
            (self.phase, self.layout_override, self._forced_step, self.timestep, self.step, self.t,
             self.layout) = saved
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
        grid = self.family.grid_of_forward(self.forward_info, layer, self._grids)
        if grid is None:
            raise RuntimeError("grid requested before the denoiser ran")
        return grid

    @property
    def latent_hw(self) -> tuple[int, int] | None:
        return self.forward_info.latent_hw

    @property
    def image_grid(self) -> tuple[int, int] | None:
        return self.forward_info.image_grid

    @property
    def text_len(self) -> int:
        return self.forward_info.text_len

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
        """attnedit's part of `callback_on_step_end`: lets controls update the latents.

        Installed for every pipeline call by `pipeline_call` (composed with the user's callback);
        passing it yourself as `callback_on_step_end=ctrl.step_callback` still works (it is not doubled).
        """
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


# ----------------------------------------------------------------------------- pipeline classes
_CONTROLLED: dict[type, type] = {}


def _controlled_class(base: type) -> type:
    """`base` plus a `__call__` that runs through the installed controller (one subclass per class).

    Python looks `__call__` up on the type, so a stock `pipe(...)` can only be intercepted by the
    instance's class; the subclass keeps the name, module, signature and docstring of `base`.
    """
    if getattr(base, "_attnedit_base", None) is not None:
        base = base._attnedit_base
    cls = _CONTROLLED.get(base)
    if cls is None:
        stock_call = base.__call__

        def __call__(self, *args, **kwargs):
            ctrl = self.__dict__.get("_attnedit_controller")
            if ctrl is None:
                return stock_call(self, *args, **kwargs)
            return ctrl.pipeline_call(stock_call, args, kwargs)

        __call__.__signature__ = inspect.signature(stock_call)
        __call__.__doc__ = stock_call.__doc__
        cls = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__, "_attnedit_base": base})
        _CONTROLLED[base] = cls
    return cls


def _restore_attribute(obj: Any, name: str, previous: Any) -> None:
    """Put back an instance attribute attnedit replaced (or remove it when there was none)."""
    if previous is not None:
        setattr(obj, name, previous)
    else:
        obj.__dict__.pop(name, None)


def stock_class(pipe: Any) -> type:
    """The pipeline's own class (the class attnedit swapped in while installed is a subclass of it)."""
    cls = type(pipe)
    return getattr(cls, "_attnedit_base", None) or cls


def pipeline_has_step_callback(pipe: Any) -> bool:
    """Whether the pipeline's `__call__` takes `callback_on_step_end` (PixArt's does not)."""
    return "callback_on_step_end" in inspect.signature(stock_class(pipe).__call__).parameters


def _is_own_callback(callback: Any, controller: Controller) -> bool:
    return getattr(callback, "__self__", None) is controller and getattr(callback, "__name__", "") == "step_callback"


def _carry_backend_choice(denoiser: torch.nn.Module, saved: dict[str, Any]) -> None:
    """A diffusers attention backend chosen while attnedit was installed stays chosen after `remove`."""
    for key, proc in denoiser.attn_processors.items():
        original = saved.get(key)
        if isinstance(proc, AttnEditProcessor) and original is not None and proc.stock_dispatch:
            for attr in ("_attention_backend", "_parallel_config"):
                if getattr(proc, attr, None) is not getattr(original, attr, None):
                    setattr(original, attr, getattr(proc, attr, None))


_REGISTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _registry(family: Family) -> LayerRegistry:
    """The layer registry of a denoiser, built once: module names do not change between runs."""
    denoiser = family.denoiser
    cached = _REGISTRIES.get(denoiser)
    if cached is None or cached.family != family.name:
        cached = family.build_registry(denoiser)
        _REGISTRIES[denoiser] = cached
    return cached


def _windows_overlap(a: Control, b: Control, num_steps: int | None) -> bool | None:
    """Whether two controls' step windows share a step (None: fractional windows and no step count yet)."""
    if not (set(a.phases) & set(b.phases)):
        return False
    try:
        lo_a, hi_a = a.steps.bounds(num_steps)
        lo_b, hi_b = b.steps.bounds(num_steps)
    except ValueError:
        return None
    return max(lo_a, lo_b) < min(hi_a, hi_b)
