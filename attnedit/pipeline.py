"""`attnedit.load` and `EditPipeline`, plus `apply` / `remove` / `controlled` for stock pipelines.

`EditPipeline` wraps a stock diffusers pipeline (reachable as `.pipe`): each `generate` call
installs the controls, runs the pipeline's own denoising loop, and puts the original processors
back in a `finally` block, so the pipeline is exactly as it was afterwards, also when a control
raised. Seeds are per image (one generator each), so an image does not depend on its batch (on CPU,
kernels may round a pixel by a level or two differently at another batch size).
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from . import validate
from .controller import Controller, NonFiniteError
from .controls import Control, as_control
from .families import FAMILIES, Family, family_from_class, family_of
from .layout import BatchLayout
from .paths import BUNDLED_DIR, DEFAULT_MODEL, TINY_PREFIX

_LOAD_OPTIONS = ("variant", "revision", "local_files_only", "cache_dir", "token", "use_safetensors")
# attnedit adapters loaded after the pipeline: option -> (module, function(edit_pipe, path))
_ADAPTERS = {
    "clear": ("attnedit.methods.clear", "load_adapter"),
    "concepts": ("attnedit.methods.attencraft", "load_concepts"),
}


# ------------------------------------------------------------------------------ stock pipelines
def apply(pipe: Any, *controls: Control | str) -> Controller:
    """Install attnedit with `controls` on a stock diffusers pipeline (undo with `remove`).

    Controls are instances or names with options in the CLI's syntax ("todo", "todo:factor=3");
    the returned controller reaches them by name (`ctrl.store.word_map("cat")`).

    >>> ctrl = attnedit.apply(pipe, "todo", attnedit.AttentionStore())
    >>> image = pipe("a cat and a dog").images[0]
    >>> attnedit.remove(pipe)
    """
    return Controller(_stock(pipe), [as_control(c) for c in controls]).install()


def _stock(pipe: Any) -> Any:
    """The diffusers pipeline to install on (an EditPipeline's `.pipe`)."""
    return pipe.pipe if isinstance(pipe, EditPipeline) else pipe


def remove(pipe: Any) -> None:
    """Remove attnedit from `pipe`, restoring its original processors (no-op if not applied)."""
    ctrl = getattr(_stock(pipe), "_attnedit_controller", None)
    if ctrl is not None:
        ctrl.remove()


@contextmanager
def controlled(pipe: Any, *controls: Control | str) -> Iterator[Controller]:
    """`with attnedit.controlled(pipe, store) as ctrl: pipe(prompt)`; always restores `pipe`."""
    ctrl = Controller(_stock(pipe), [as_control(c) for c in controls]).install()
    try:
        yield ctrl
    finally:
        ctrl.remove()


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Inputs:
    """The checked arguments of one `generate` call (see `EditPipeline.check_inputs`)."""

    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    height: int
    width: int
    negative_prompt: str | list[str] | None
    num_images: int
    n: int  # images in all


@dataclass
class Result:
    """Images of one `generate` call plus what the controls recorded and every parameter."""

    images: list[Image.Image]
    records: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    latents: torch.Tensor | None = None

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    def save(self, path: str | os.PathLike, index: int = 0) -> Path:
        """Save image `index` as PNG plus a JSON sidecar (atomic writes: temp name, then rename)."""
        return save_image(self.images[index], path, {**self.params, "index": index,
                                                     "seed": self.params["seeds"][index]})


def save_image(image: Image.Image, path: str | os.PathLike, params: dict[str, Any]) -> Path:
    """`image` as a PNG at `path` (which must end in .png) plus its JSON sidecar beside it."""
    path = validate.output_file("path", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    side = path.with_suffix(".json")
    tmp_side = side.with_name(f".{side.name}.tmp")
    tmp_side.write_text(json.dumps(params, indent=2, default=str))
    os.replace(tmp_side, side)
    return path


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    from . import __version__

    return {
        "attnedit": __version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# -------------------------------------------------------------------------------------- loading
def resolve_model(model: str | os.PathLike) -> tuple[str, Family | None]:
    """Where `model` lives and its family: a bundled name, a tiny builtin, a folder or a hub id."""
    name = str(model)
    if name.startswith(TINY_PREFIX):
        fam = name[len(TINY_PREFIX):]
        if fam not in FAMILIES:
            raise ValueError(f"unknown builtin model {name!r}; choose from "
                             + ", ".join(TINY_PREFIX + f for f in FAMILIES))
        return name, FAMILIES[fam]
    bundled = BUNDLED_DIR / name
    if "/" not in name and (bundled / "model_index.json").is_file():
        name = str(bundled)
    path = Path(name)
    if path.exists():
        index = path / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return str(path), _family_from_index(index)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import hf_hub_download

            index = hf_hub_download(name, "model_index.json")
        except Exception as err:  # offline, unknown repo, ...
            raise ValueError(
                f"cannot read model_index.json of {name!r} from the Hub ({type(err).__name__}); "
                f"use a local folder, a bundled model ({', '.join(bundled_models()) or 'none'}) or "
                + ", ".join(TINY_PREFIX + f for f in FAMILIES)
            ) from err
        return name, _family_from_index(Path(index))
    raise ValueError(
        f"model {name!r} is neither a folder, a hub id (owner/name), a bundled model "
        f"({', '.join(bundled_models()) or 'none'}) nor a builtin ({', '.join(TINY_PREFIX + f for f in FAMILIES)})"
    )


def bundled_models() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "model_index.json").is_file())


def _family_from_index(index: Path) -> Family:
    return family_from_class(str(read_index(index).get("_class_name")))


def read_index(index: Path) -> dict[str, Any]:
    """A model folder's model_index.json, or an error naming the file and what is wrong with it."""
    try:
        data = json.loads(Path(index).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise validate.InputError("model", str(index), "a diffusers pipeline folder", message=(
            f"{index} is not valid JSON{where}: {type(err).__name__}; a diffusers pipeline folder needs a "
            "model_index.json naming its pipeline class")) from None
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise validate.InputError("model", str(index), "", message=f"{index} names no pipeline class "
                                  "(its _class_name is missing)")
    return data


def load(
    model: Any = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **kw: Any,
) -> EditPipeline:
    """Load a pipeline of a supported family and wrap it as an `EditPipeline`.

    `model`: a hub id, a local folder, a bundled name ("shapes-sd") or a builtin ("tiny-sd"), or a
    diffusers pipeline object you already have (wrapped as it is; `device`/`dtype` still apply).

    >>> pipe = attnedit.load("tiny-sd")              # or a folder, a hub id, "shapes-sd"
    >>> result = pipe("a red circle", seed=0)
    """
    adapters = {k: kw.pop(k) for k in list(kw) if k in _ADAPTERS and kw[k] is not None}
    validate.keywords("load", kw, (*_LOAD_OPTIONS, *_ADAPTERS, "device", "dtype"))
    dtype = _as_dtype(dtype)
    device = validate.device(device)
    if not isinstance(model, (str, os.PathLike)):
        if not hasattr(model, "components") or not callable(model):
            raise validate.InputError("model", model, "a hub id, a folder, a bundled or builtin name, or a diffusers "
                                      "pipeline", shown=f"a {type(model).__name__}")
        if kw:
            raise validate.InputError(next(iter(kw)), kw[next(iter(kw))], "", message=(
                "load options for from_pretrained do not apply to a pipeline object that is already loaded"))
        edit = EditPipeline(model)  # family_of refuses an unsupported class by name
        if dtype is not None:
            model.to(dtype=dtype)
        if device is not None:
            model.to(device)
        _load_adapters(edit, adapters)
        return edit
    if device is not None and device.type == "cpu" and dtype == torch.float16:
        warnings.warn("float16 on the CPU is slow and not supported by every op; float32 is recommended",
                      stacklevel=2)
    where, family = resolve_model(model)
    if where.startswith(TINY_PREFIX):
        from .tiny import build_tiny

        pipe = build_tiny(family.name)
    else:
        import diffusers

        cls_name = read_index(Path(where, "model_index.json"))["_class_name"] if Path(where).exists() else None
        cls = getattr(diffusers, cls_name) if cls_name else diffusers.DiffusionPipeline
        pipe = cls.from_pretrained(where, dtype=dtype or torch.float32, **family.load_options(), **kw)
        pipe.set_progress_bar_config(disable=True)
    if dtype is not None:
        pipe.to(dtype=dtype)
    if device is not None:
        pipe.to(device)
    edit = EditPipeline(pipe, model_name=str(model))
    settings = Path(where, "attnedit.json")
    if settings.is_file():  # recommended steps/guidance/size shipped with a model folder
        edit.settings = json.loads(settings.read_text())
    _load_adapters(edit, adapters)
    return edit


def _load_adapters(edit: EditPipeline, adapters: dict[str, Any]) -> None:
    import importlib

    for option, path in adapters.items():
        module, func = _ADAPTERS[option]
        try:
            loader = getattr(importlib.import_module(module), func)
        except (ModuleNotFoundError, AttributeError) as err:
            raise ValueError(f"load option {option!r} is not available in this attnedit build") from err
        loader(edit, path)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise validate.InputError("dtype", dtype, "torch.float32, torch.float16 or torch.bfloat16")
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    validate.choice("dtype", dtype, names)
    return names[dtype]


# ------------------------------------------------------------------------------- EditPipeline
class EditPipeline:
    """A diffusers pipeline plus attention controls. `.pipe` is the untouched stock pipeline."""

    def __init__(self, pipe: Any, model_name: str | None = None) -> None:
        self.pipe = pipe
        self.family: Family = family_of(pipe)
        self.model_name = model_name or getattr(pipe, "name_or_path", type(pipe).__name__)
        # controls every `generate` runs first (set by adapters, e.g. a loaded CLEAR student's window)
        self.default_controls: list[Control] = []
        # recommended generation settings of the model folder (`attnedit.json`: steps, guidance, ...)
        self.settings: dict[str, Any] = {}

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.family.denoiser

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.family.vae_scale_factor

    @property
    def pixel_stride(self) -> int:
        """Image sizes must be multiples of this (latent factor x patch size)."""
        return self.family.pixel_stride

    def default_size(self) -> tuple[int, int]:
        """The model's native size: config sample_size x VAE factor (FLUX: 1024, tiny: 64)."""
        if str(self.model_name).startswith(TINY_PREFIX):
            return (64, 64)
        if "height" in self.settings and "width" in self.settings:
            return (int(self.settings["height"]), int(self.settings["width"]))
        return self.family.native_size()

    def call_defaults(self) -> dict[str, Any]:
        """Family arguments every call needs (tiny builtins need short text sequences)."""
        if str(self.model_name).startswith(TINY_PREFIX):
            from .tiny import tiny_call_kwargs

            return tiny_call_kwargs(self.family.name)
        # a model folder's own call arguments (`attnedit.json` "call"), e.g. shapes-dit's short T5 sequence
        return {**self.family.call_defaults, **self.settings.get("call", {})}

    @property
    def true_cfg(self) -> bool:
        """Whether `guidance` runs as true CFG: a separate unconditional pass (FLUX.1 without a guidance
        embedding, e.g. shapes-dit; Qwen-Image)."""
        return self.family.true_cfg

    def guidance_call(self, call: dict, guidance: float, negative_prompt: Any = None) -> tuple[dict, Any]:
        """`call` plus the arguments that make the pipeline guide at `guidance`, and the negative prompt to pass.

        Why one place: generation and CLEAR's teacher samples must guide the same way; the family's
        adapter knows the argument names (`guidance_scale`, `true_cfg_scale`) and whether true CFG
        runs against an empty prompt when none is given.
        """
        args, negative_prompt = self.family.guidance_arguments(guidance, negative_prompt)
        return {**args, **call}, negative_prompt

    def controller(self, controls: Sequence[Control]) -> Controller:
        return Controller(self.pipe, list(controls))

    def __call__(self, prompt: str | list[str], **kw: Any) -> Result:
        return self.generate(prompt, **kw)

    def generate(
        self,
        prompt: str | list[str],
        *,
        controls: Sequence[Control] = (),
        seed: int | Sequence[int] = 0,
        steps: int | None = None,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images: int = 1,
        layout: BatchLayout | None = None,
        latents: torch.Tensor | None = None,
        **pipe_kwargs: Any,
    ) -> Result:
        """Generate images with `controls` active; returns a `Result`.

        `seed` is one int (image i gets seed + i) or one seed per image. Everything is validated
        (sizes, words, control options) before any denoising starts.
        """
        controls = [as_control(c) if isinstance(c, str) else c for c in controls]
        # an explicit control of the same class replaces the default one (e.g. CLEAR with other options)
        controls = [*(d for d in self.default_controls if not any(type(c) is type(d) for c in controls)), *controls]
        checked = self.check_inputs(prompt, seed=seed, steps=steps, guidance=guidance, height=height, width=width,
                                    negative_prompt=negative_prompt, num_images=num_images, latents=latents,
                                    controls=controls, **pipe_kwargs)
        prompts, seeds, steps, guidance = checked.prompts, checked.seeds, checked.steps, checked.guidance
        height, width, negative_prompt, n = checked.height, checked.width, checked.negative_prompt, checked.n
        num_images = checked.num_images
        self._check_devices()
        cfg = self.family.uses_cfg(guidance)
        if layout is not None and layout.size != (2 * n if cfg else n):
            raise ValueError(f"layout has {layout.size} rows, the batch has {2 * n if cfg else n}")
        ctrl = Controller(self.pipe, list(controls))
        kwargs = self.stock_arguments(prompts, seeds, steps=steps, guidance=guidance, height=height, width=width,
                                      negative_prompt=negative_prompt, num_images=num_images, latents=latents,
                                      **pipe_kwargs)
        params = {
            "model": self.model_name,
            "family": self.family.name,
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            # true CFG runs against an empty negative prompt when none is given (`guidance_call`)
            "negative_prompt": negative_prompt if negative_prompt is not None else (
                "" if "negative_prompt" in kwargs else None),
            "seeds": seeds,
            "steps": steps,
            "guidance": guidance,
            "height": height,
            "width": width,
            "num_images": num_images,
            "controls": [{"name": c.name, **c.options()} for c in controls],
            "versions": versions(),
        }
        for key, value in kwargs.items():
            if key not in self._SET_BY_GENERATE and isinstance(value, (str, int, float, bool)):
                params.setdefault(key, value)
        ctrl.install()
        try:
            # the same path as a stock call under attnedit.apply: the controlled __call__ starts the run
            # from these arguments (plus the layout and CFG flag they do not carry)
            with ctrl.call_options(layout=layout, cfg=cfg):
                out = self.pipe(**kwargs)
            records = ctrl.records()
        finally:
            ctrl.remove()
        return Result(images=to_pil(out.images, controls), records=records, params=params)

    def check_inputs(
        self,
        prompt: Any,
        *,
        seed: Any = 0,
        steps: Any = None,
        guidance: Any = None,
        height: Any = None,
        width: Any = None,
        negative_prompt: Any = None,
        num_images: Any = 1,
        latents: Any = None,
        controls: Sequence[Any] = (),
        **pipe_kwargs: Any,
    ) -> Inputs:
        """Every argument of `generate` checked against this model, before any model call.

        Raises `attnedit.validate.InputError` (a ValueError) naming the parameter, the bad value and
        what is valid (see `attnedit.validate` for the ranges); returns the values `generate` uses,
        the model's recommended settings filled in where an argument is None.
        """
        prompts = validate.prompts(prompt)
        num_images = validate.num_images(num_images)
        n = len(prompts) * num_images
        seeds = validate.seeds(seed, n)
        steps = validate.steps(steps) if steps is not None else self.default_steps()
        guidance = validate.guidance(guidance if guidance is not None else self.recommended()["guidance"])
        dh, dw = self.default_size()
        height = validate.side("height", height if height is not None else dh, self.pixel_stride)
        width = validate.side("width", width if width is not None else dw, self.pixel_stride)
        negative_prompt = validate.negative_prompt(negative_prompt, len(prompts))
        for c in controls:
            if not isinstance(c, Control):
                raise validate.InputError("controls", c, "Control instances (e.g. attnedit.ToDo()) or names with "
                                          "options (e.g. 'todo:factor=3')")
        self.check_pipe_kwargs(pipe_kwargs)
        if latents is not None:
            if not isinstance(latents, torch.Tensor):
                raise validate.InputError("latents", latents, "a torch.Tensor")
            expected = self.latent_shape(n, height, width)
            if tuple(latents.shape) != expected:
                raise validate.InputError("latents", latents,
                                          f"of shape {expected} for {n} image(s) of {height}x{width}",
                                          shown=f"a tensor of shape {tuple(latents.shape)}")
            if latents.device != self.device or latents.dtype != self.dtype:
                raise validate.InputError("latents", latents, f"{self.dtype} on {self.device} (the model's)",
                                          shown=f"{latents.dtype} on {latents.device}")
            validate.finite_tensor("latents", latents)
        return Inputs(prompts, seeds, steps, guidance, height, width, negative_prompt, num_images, n)

    #: arguments of the stock call that `generate` sets itself, and the parameter that sets each
    _SET_BY_GENERATE: ClassVar[dict[str, str | None]] = {
        "prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
        "guidance_scale": "guidance", "height": "height", "width": "width", "num_images_per_prompt": "num_images",
        "generator": "seed", "latents": "latents", "output_type": None, "return_dict": None,
    }

    def check_pipe_kwargs(self, pipe_kwargs: dict[str, Any], what: str = "generate",
                          own: Sequence[str] = ()) -> None:
        """Extra keyword arguments of `generate` (or of `what`, whose own parameters are `own`) are the stock
        pipeline call's own, and are finite."""
        import inspect

        from .controller import stock_class

        params = inspect.signature(stock_class(self.pipe).__call__).parameters
        for key, value in pipe_kwargs.items():
            if key in own:
                continue
            if key in self._SET_BY_GENERATE:
                ours = self._SET_BY_GENERATE[key]
                use = (f"pass {ours}= instead" if ours else "generate returns PIL images (Result.images); for "
                       "latents or arrays, call the stock pipeline (EditPipeline.pipe) under attnedit.apply")
                raise validate.InputError(key, value, "", message=f"{what}() sets {key} itself: {use}")
            if key not in params or key in ("self", "kwargs"):
                extra = sorted(k for k in params if k not in self._SET_BY_GENERATE and k not in ("self", "kwargs"))
                validate.keywords(what, [key], [*own, "controls", "seed", "steps", "guidance", "height", "width",
                                                "negative_prompt", "num_images", "layout", "latents", *extra])
            if isinstance(value, float):
                validate.number(key, value)

    def stock_arguments(
        self,
        prompts: list[str],
        seeds: Sequence[int],
        *,
        steps: int,
        guidance: float,
        height: int,
        width: int,
        negative_prompt: str | list[str] | None = None,
        num_images: int = 1,
        latents: torch.Tensor | None = None,
        **pipe_kwargs: Any,
    ) -> dict[str, Any]:
        """The arguments of the stock `self.pipe(...)` call that `generate` makes (checked values).

        One seeded generator and one initial latent per image, the family's call defaults, true CFG
        where `guidance` means it; `self.pipe(**stock_arguments(...))` under `attnedit.apply` gives
        `generate`'s images.
        """
        call, negative_prompt = self.guidance_call({**self.call_defaults(), **pipe_kwargs}, guidance, negative_prompt)
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        if latents is None:
            latents = self.initial_latents(len(prompts) * num_images, height, width, generators)
        kwargs = dict(
            prompt=list(prompts),
            negative_prompt=_expand(negative_prompt, len(prompts)),
            num_inference_steps=steps,
            height=height,
            width=width,
            num_images_per_prompt=num_images,
            generator=generators,
            latents=latents,
            output_type="np",  # checked for NaN / inf, then made PIL images (`to_pil`)
            **call,
        )
        if negative_prompt is None:
            kwargs.pop("negative_prompt")
        return kwargs

    def invert(self, image: Any, prompt: str = "", steps: int | None = None, **kw: Any):
        """Invert a real image into initial noise (DDIM for UNets, Euler for flow models).

        See `attnedit.inversion.invert`; returns the inverted latent and every intermediate one.
        """
        from .inversion import invert

        validate.keywords("invert", kw, ["guidance", "fit", "negative_prompt"])
        return invert(self, image, prompt=prompt, steps=steps, **kw)

    def edit(self, image: Any, source_prompt: str, target_prompt: str, **kw: Any) -> Result:
        """Edit a real image: invert it, then denoise source and target with a control (MasaCtrl).

        See `attnedit.inversion.edit`.
        """
        from .inversion import edit

        return edit(self, image, source_prompt, target_prompt, **kw)

    def recommended(self) -> dict[str, Any]:
        """Recommended settings of this model (steps, guidance, height, width)."""
        h, w = self.default_size()
        return {"steps": self.default_steps(), "guidance": self.settings.get("guidance", self.family.default_guidance),
                "height": h, "width": w}

    def default_steps(self) -> int:
        if "steps" in self.settings:
            return int(self.settings["steps"])
        if str(self.model_name).startswith(TINY_PREFIX):
            return 4
        return self.family.default_steps

    def _check_devices(self) -> None:
        """All model components on one device (unless diffusers' offload hooks manage them)."""
        devices = {}
        for name, comp in self.pipe.components.items():
            if isinstance(comp, torch.nn.Module) and not hasattr(comp, "_hf_hook"):
                p = next(comp.parameters(), None)
                if p is not None:
                    devices[name] = p.device
        if len({d.type + str(d.index) for d in devices.values()}) > 1:
            listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
            raise ValueError(f"pipeline components are on different devices ({listing}); move them with "
                             "pipe.to(device) or use enable_model_cpu_offload()")

    def latent_shape(self, n: int, height: int, width: int) -> tuple[int, ...]:
        return self.family.latent_shape(n, height, width)

    def initial_latents(self, n: int, height: int, width: int, generators: list[torch.Generator]) -> torch.Tensor:
        """Per-image seeded initial latents in the layout the pipeline expects (the family packs them)."""
        return self.family.initial_latents(n, height, width, generators)

    def save(self, result: Result, path: str | os.PathLike, index: int = 0) -> Path:
        """Save image `index` of `result` as PNG with its JSON sidecar."""
        return result.save(path, index)

    def __repr__(self) -> str:
        return f"EditPipeline({self.model_name!r}, family={self.family.name})"


def to_pil(images: Any, controls: Sequence[Control] = ()) -> list[Image.Image]:
    """The pipeline's float images in [0, 1] as PIL images, refusing any that hold NaN or inf.

    diffusers would write such an image as black (NaN cast to 0) with only a NumPy warning.
    """
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    arr = np.asarray(images)
    if not np.isfinite(arr).all():
        bad = [i for i in range(arr.shape[0]) if not np.isfinite(arr[i]).all()]
        names = ", ".join(type(c).__name__ for c in controls) or "no control"
        raise NonFiniteError(f"the decoded image(s) {bad} hold NaN or inf (controls: {names}); nothing was written. "
                             "In float16 the VAE can overflow: load the model with dtype='float32' or "
                             "'bfloat16'")
    return VaeImageProcessor.numpy_to_pil(arr)


def _expand(value: str | list[str] | None, n: int) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"{len(value)} negative prompts for {n} prompts")
    return list(value)
