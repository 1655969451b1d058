"""Job kinds: what a job of each kind takes, how it expands and is checked, and how a batch of it runs.

The batch itself knows one kind, `generate` (prompts with controls; `together: true` makes them in one
call, the first the source of the others). A method that needs more (a real-image edit inverts a photo
first; IR-Diffusion makes references, then a scene) defines a `JobKind` beside its own code and
registers it when its module is imported (`load_methods` imports every method module), so the runner,
the validator and the app handle every kind the same way.

Controls' own declarations are read as plain class attributes: `file_options` (options naming files,
read relative to the job file) and `cross_sample` (the control relates the images of one call).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..validate import short
from .data import BASE_KEYS, Unit
from .files import input_file, resolve


# ---------------------------------------------------------------------------------- controls
def control_specs(value: Any) -> list[dict[str, Any]]:
    """A job's `controls` value as a list of `{"name": ..., options}` specs (a name alone is a spec)."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"controls must be a list of {{'name': ..., options}}, got {type(value).__name__}")
    specs = []
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"each control is an object with a 'name' and its options, got {short(item)}")
        specs.append(dict(item))
    return specs


def control_spec(control: Any) -> dict[str, Any]:
    """A control as a job names it (and `make_control` takes it): its name and constructor options."""
    return {"name": control.name, **control.options()}


def load_methods() -> list[str]:
    """Import every method module so controls (and job kinds) are known by name. A module that fails to
    import (a method being worked on) is reported once and skipped instead of stopping every job."""
    import importlib
    import pkgutil
    import warnings

    from .. import methods

    broken = []
    for info in pkgutil.iter_modules(methods.__path__):
        try:
            importlib.import_module(f"{methods.__name__}.{info.name}")
        except Exception as err:
            broken.append(info.name)
            warnings.warn(f"attnedit method module {info.name!r} failed to import ({type(err).__name__}: {err}); "
                          "its controls are unavailable", stacklevel=2)
    return broken


def spec_files(spec: dict[str, Any], base: Path | None, where: str, files: dict[str, str] | None = None):
    """A control spec with its file names (the class's `file_options`) resolved against the job file's
    folder, each checked (exists, readable image, digest recorded) when `files` is given."""
    from ..controls import CONTROLS

    cls = CONTROLS.get(spec["name"])
    out = dict(spec)
    for key in (k for k in (cls.file_options if cls is not None else ()) if k in spec):
        value = spec[key]
        single = not isinstance(value, list)
        items = [value] if single else value
        resolved = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if files is not None:
                    input_file(base, item, f"{where} ({spec['name']}) {key}" + ("" if single else f"[{i}]"), files)
                item = str(resolve(base, item))
            resolved.append(item)
        out[key] = resolved[0] if single else resolved
    return out


def build_controls(specs: list[dict[str, Any]], maps: Any = False, base: Path | None = None) -> tuple[list[Any], Any]:
    """Controls of one batch from their specs; adds an AttentionStore when maps are asked for.

    File names in options (`file_options`) are read relative to `base`, the job file's folder.
    Returns (controls, the store that feeds the map grids or None).
    """
    from ..controls import make_control
    from ..store import AttentionStore

    controls = []
    for i, spec in enumerate(specs):
        spec = spec_files(spec, base, f"controls[{i}]")
        opts = {k: v for k, v in spec.items() if k != "name"}
        controls.append(make_control(spec["name"], opts))
    store = None
    if maps:
        store = next((c for c in controls if isinstance(c, AttentionStore)), None)
        if store is None:
            store = AttentionStore(words=list(maps) if isinstance(maps, list) else None)
            controls.append(store)
    return controls, store


def cross_sample(spec: dict[str, Any]) -> bool:
    """Whether the control of `spec` relates the images of one call (its class's `cross_sample`)."""
    from ..controls import CONTROLS

    cls = CONTROLS.get(spec["name"])
    return cls is not None and cls.cross_sample


# ------------------------------------------------------------------------------ model checks
def group_layout(pipe: Any, units: Sequence[Unit], guidance: float):
    """Source/target roles of a `together` group for the controls that relate images (MasaCtrl)."""
    from ..layout import BatchLayout

    cfg = pipe.family.uses_cfg(guidance)
    return BatchLayout.standard(len(units), cfg, groups=[0] * len(units), roles=[u.role for u in units])


def check_with_model(pipe: Any, prompts: list[str], settings: dict[str, Any], controls: list[Any],
                     roles: list[str] | None = None) -> None:
    """Everything `EditPipeline.generate` checks before denoising, without denoising: the size,
    and each control's `setup` against this model and these prompts (words, boxes, layers, roles).
    Several prompts are one call whose first is the source of the others, unless `roles` says."""
    from ..controller import Controller
    from ..layout import BatchLayout

    check_size(pipe, settings)
    h, w = settings["height"], settings["width"]
    cfg = pipe.family.uses_cfg(settings["guidance"])
    pipe.pipe.scheduler.set_timesteps(settings["steps"])
    layout = None
    if len(prompts) > 1:
        roles = roles or ["source"] + ["target"] * (len(prompts) - 1)
        layout = BatchLayout.standard(len(prompts), cfg, groups=[0] * len(prompts), roles=roles)
    ctrl = _CHECKERS.get(pipe)
    if ctrl is None:  # one controller per pipeline: its layer registry is built once, not per job
        ctrl = _CHECKERS[pipe] = Controller(pipe.pipe, [])
    ctrl.controls = list(controls)
    try:
        ctrl.begin_run(prompts, num_steps=settings["steps"], height=h, width=w, cfg=cfg, layout=layout,
                       max_sequence_length=pipe.call_defaults().get("max_sequence_length"))
    finally:
        ctrl.controls = []


_CHECKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_size(pipe: Any, settings: dict[str, Any]) -> None:
    """The job's size is one this model takes (sides multiples of its stride)."""
    h, w, stride = settings["height"], settings["width"], pipe.pixel_stride
    if h % stride or w % stride:
        raise ValueError(f"image size {h}x{w} is not a multiple of {stride} for this model")


def image_size(image: Path, pipe: Any) -> tuple[int, int]:
    """(height, width) an input photo has once fitted to the model's stride (as `invert` fits it);
    without a model, its own size."""
    import warnings

    from PIL import Image

    if pipe is None:
        with Image.open(image) as im:
            return im.height, im.width
    from ..inversion import prepare_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run says it again when it inverts
        fitted, _ = prepare_image(image, pipe.pixel_stride)
    return fitted.height, fitted.width


# ------------------------------------------------------------------------------------ kinds
class JobKind:
    """One kind of batch job. Subclasses override what differs from `generate`; an instance is registered
    with `register_kind` by the module that defines it (beside its method)."""

    #: registry name, kept in each unit (`Unit.kind`, not part of image keys)
    name: ClassVar[str] = ""
    #: what a job of this kind is, in messages ("a real-image edit")
    title: ClassVar[str] = ""
    #: job keys only this kind takes; the first marks a job as this kind
    keys: ClassVar[tuple[str, ...]] = ()
    #: settings keys holding the kind's inputs (a sidecar's `inputs`, with the files' digests)
    inputs: ClassVar[tuple[str, ...]] = ()
    #: True: every job is one call (a group), whatever `together` says; None: the job's `together`
    together: ClassVar[bool | None] = None
    #: the seeds every job of this kind has (None: the job's `seeds` / `seed`)
    fixed_seeds: ClassVar[tuple[int, ...] | None] = None

    @property
    def marker(self) -> str | None:
        return self.keys[0] if self.keys else None

    def claims(self, job: dict[str, Any]) -> bool:
        """A job of this kind: it has the marker key."""
        return self.marker is not None and self.marker in job

    def stray(self, key: str) -> str:
        """The message for one of this kind's keys in a job of another kind."""
        return f"{key} is a key of {self.title} job: add {self.marker}: or drop {key}"

    def check_job(self, job: dict[str, Any], cli: dict[str, Any]) -> None:
        """Refuse keys (or command-line values) this kind cannot take, before anything is merged."""

    def default_controls(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The control specs a job of this kind runs when it names `specs`."""
        return specs

    def expand(self, job: dict[str, Any], prompts: list[str], settings: dict[str, Any], pipe: Any,
               base: Path | None, files: dict[str, str]) -> list[str]:
        """The kind's own keys, checked into `settings` (files named are checked and recorded in `files`);
        returns the prompts of the job's images in call order."""
        return prompts

    def roles(self, n: int) -> list[str]:
        """Roles of the `n` images of one group: the first is the source of the others."""
        return ["source"] + ["target"] * (n - 1)

    def check_with_model(self, pipe: Any, prompts: list[str], settings: dict[str, Any], controls: list[Any],
                         together: bool) -> None:
        """What the run would refuse before denoising, without denoising (`check_with_model` per call)."""
        for group in ([prompts] if together else [[p] for p in prompts]):
            check_with_model(pipe, group, settings, controls)

    def run(self, pipe: Any, batch: Sequence[Unit], controls: list[Any], common: dict[str, Any]) -> Any:
        """Make the images of `batch` (every unit, in order); `common` holds steps, guidance and
        negative_prompt. Returns the result (`.images` in the batch's order)."""
        raise NotImplementedError

    def to_job(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """One job line replaying a result (the app's downloads); each kind names its own fields."""
        raise NotImplementedError


class GenerateKind(JobKind):
    """Prompts with controls: one image per prompt and seed, or, `together`, one call per seed."""

    name = "generate"
    title = "a generate"

    def run(self, pipe: Any, batch: Sequence[Unit], controls: list[Any], common: dict[str, Any]) -> Any:
        s = batch[0].settings
        layout = group_layout(pipe, batch, s["guidance"]) if batch[0].group else None
        return pipe.generate([u.prompt for u in batch], controls=controls, seed=[u.seed for u in batch],
                             height=s["height"], width=s["width"], layout=layout, **common)

    def to_job(self, prompts: str | Sequence[str], *, seeds: Sequence[int], steps: int, guidance: float,
               height: int, width: int, controls: Sequence[Any] = (), negative_prompt: str | None = None,
               together: bool = False) -> dict[str, Any]:
        """A generate job: one prompt, or several (`together`: made in one call, the first the source)."""
        job: dict[str, Any] = {"prompt": prompts} if isinstance(prompts, str) else {"prompts": list(prompts)}
        if together:
            job["together"] = True
        job.update(seeds=list(seeds), steps=steps, guidance=guidance, height=height, width=width,
                   controls=[c if isinstance(c, dict) else control_spec(c) for c in controls])
        if negative_prompt:
            job["negative_prompt"] = negative_prompt
        return job


GENERATE = GenerateKind()
_KINDS: dict[str, JobKind] = {}


def register_kind(kind: JobKind) -> JobKind:
    """Make `kind` known to job files (its keys become valid job keys) and to the runner."""
    if not kind.name or kind.name == GENERATE.name:
        raise ValueError(f"a job kind needs its own name, got {kind.name!r}")
    taken = {k for other in kinds() if other.name != kind.name for k in other.keys}
    clash = [k for k in kind.keys if k in BASE_KEYS or k in taken]
    if clash:
        raise ValueError(f"job kind {kind.name!r}: key {clash[0]!r} is taken")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> list[JobKind]:
    """Every kind: `generate`, then the registered ones by name (the order of `job_keys` and messages)."""
    return [GENERATE, *(_KINDS[n] for n in sorted(_KINDS))]


def kind_named(name: str) -> JobKind:
    """The kind called `name` (method modules are imported first if it is not registered yet)."""
    if name == GENERATE.name:
        return GENERATE
    if name not in _KINDS:
        load_methods()
    return _KINDS[name]


def kind_of(job: dict[str, Any]) -> JobKind:
    """The kind of a job: the one whose marker key it has, else `generate`; two markers are refused."""
    claimed = [k for k in kinds() if k.claims(job)]
    if len(claimed) > 1:
        a, b = claimed[:2]
        raise ValueError(f"a job is either {a.title} ({a.marker}) or {b.title} ({b.marker}), not both")
    return claimed[0] if claimed else GENERATE


def job_keys() -> tuple[str, ...]:
    """Every key a job may have: the common ones, then each kind's own."""
    return (*BASE_KEYS, *(k for kind in kinds() for k in kind.keys))
