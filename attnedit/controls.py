"""The interface every attention-control method implements.

A control says *where* it acts (a layer `Select`, a `Steps` window, the passes it joins) and
overrides only the hooks it needs; the universal processor calls them in a fixed order:

    q, k, v = control.qkv(ctx, q, k, v)          # transform projections (BSHD)
    regions = control.regions(ctx)               # region labels -> masks, never dense N x N
    downsample / window                          # ToDo K/V resampling, CLEAR local window
    keys = control.capture(ctx)                  # key tokens whose probabilities to observe
    out = control.attend(ctx, q, k, v, mask)     # replace the computation entirely (rare)
    control.observe(ctx, probs)                  # receive the captured probabilities
    out = control.output(ctx, out)               # post-process the attention output

Between steps, `on_step_end` may update the latents (through `callback_on_step_end`), and
`prepare_latents` may change the initial latents before the first step. Per-run state lives in
`self.state`, which the controller re-creates at the start of every run (`reset`), so two runs
never share state by accident.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .kernels.types import KVDownsample, LocalWindow, RegionMask
from .layers import LayerInfo, LayerRegistry
from .layout import BatchLayout
from .selectors import ALL, ALL_STEPS, Select, Steps, as_steps

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .controller import Run
    from .families import Family


PHASES = ("denoise", "guidance", "inversion")
#: why a control that reads the prompt's words cannot run (format with `name`)
NEEDS_PROMPT = (
    "{name} works on the prompt's words, and this run has none: pass prompt= to the pipeline call (prompt_embeds "
    "carry no words), or, when calling the denoiser yourself, start the run with controller.begin_run(prompts)"
)
#: the hooks the processor calls inside an attention layer (a control with none of them needs no layer)
ATTENTION_HOOKS = ("qkv", "regions", "downsample", "window", "capture", "observe", "attend", "output")


@dataclass
class CallContext:
    """Everything a control may read inside one attention call."""

    layer: LayerInfo
    attn: torch.nn.Module
    step: int
    num_steps: int | None
    t: float  # normalised timestep in [0, 1] (1 = pure noise)
    phase: str
    layout: BatchLayout
    grid: tuple[int, int]  # image token grid of this layer
    image: slice  # image tokens in the query/key sequence
    text: slice | None  # text tokens in the key sequence (cross / joint), None for self
    hidden_states: torch.Tensor | None = None  # input to the q projection (after norms)
    encoder_hidden_states: torch.Tensor | None = None
    run: Run | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_image(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class Example:
    """A small run that shows a control act, on the bundled and tiny models alike.

    The conformance matrix (`attnedit.conformance`) runs it on every family the control claims and
    through every entry path; the README's support table is generated from the same examples.
    - `options`: constructor options, JSON-able (a batch job carries them as they are);
    - `prompts`: the images of one example; with `together`, one call whose first image is the
      source of the others (MasaCtrl), else one call with every prompt;
    - `references`: an IR-Diffusion example instead (`{prompts, subjects, boxes}`, the scene is the
      last prompt), run through `ir_diffusion` and a batch `references` job;
    - `effect`: "image" (the images differ from plain generation) or "records" (the images are
      plain generation's, bit for bit, and the control's records are not empty);
    - `stock`: None when `attnedit.apply` on a stock pipeline runs it, else why it is refused there.
    """

    options: dict[str, Any] = field(default_factory=dict)
    prompts: tuple[str, ...] = ("a red circle and a blue square",)
    together: bool = False
    references: dict[str, Any] | None = None
    effect: str = "image"
    stock: str | None = None


class Control:
    """Base class of every attention-control method (override only the hooks you need)."""

    #: short name used by the CLI, the batch files and the app
    name: str = "control"
    #: passes this control joins by default
    phases: tuple[str, ...] = ("denoise",)
    #: family capabilities it needs (`attnedit.families.CAPABILITIES`); families without them are refused
    requires: tuple[str, ...] = ()
    #: why the other families are refused (one clause, shown in errors and the README's support table)
    unsupported: str = ""
    #: the control relates the images of one call, so a batch runs one group per call
    cross_sample: ClassVar[bool] = False
    #: options whose values name files, read relative to a job file
    file_options: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def example(cls) -> Example | None:
        """A small run that shows this control act (None: not part of the conformance matrix)."""
        return None

    def __init__(self, *, layers: Select | None = None, steps: Steps | range | tuple | None = None) -> None:
        self.layers = layers if layers is not None else self.default_layers()
        if not callable(self.layers):
            raise ValueError(f"layers must be a Select, got {layers!r}")
        self.steps = as_steps(steps) if steps is not None else self.default_steps()
        self.state = SimpleNamespace()
        self._selected: frozenset[str] | None = None

    # --- configuration -----------------------------------------------------------------------
    def default_layers(self) -> Select:
        return ALL

    def default_steps(self) -> Steps:
        return ALL_STEPS

    def options(self) -> dict[str, Any]:
        """The constructor options of this control, for sidecars and exported JSON."""
        out = {}
        for pname in inspect.signature(type(self).__init__).parameters:
            if pname in ("self", "layers", "steps"):
                continue
            if hasattr(self, pname):
                out[pname] = _jsonable(getattr(self, pname))
        return out

    # --- lifecycle ----------------------------------------------------------------------------
    def bind(self, run: Run) -> None:
        """Resolve the layer selection on this model, check the step window; then `setup` validates inputs.

        A selection that picks no layer, or a window that picks no step of the run, would make the
        control do nothing: both are refused here, before any denoising (an explicitly empty window,
        `Steps(0, 0)`, only warns: running plain is then what the user asked for).
        """
        picked = self.pick_layers(run)
        if not picked and any(self.overrides(h) for h in ATTENTION_HOOKS):
            raise ValueError(
                f"{type(self).__name__}: layers={self.layers!r} selects no attention layer of this "
                f"{run.family.label} model, so it would do nothing; its layers: {describe_layers(run.registry)}"
            )
        self._selected = frozenset(i.name for i in picked)
        self.check_steps(run)
        self.setup(run)

    @classmethod
    def runs_on(cls, family: Family | type[Family]) -> bool:
        """Whether `family` has every capability this control `requires`."""
        return all(family.has(c) for c in cls.requires)

    def check_family(self, family: Family) -> None:
        """Refuse a family without a capability in `requires` (the controller calls this when it is created)."""
        if not self.runs_on(family):
            from .families import FAMILIES

            raise ValueError(
                f"{type(self).__name__} does not run on {family.label}: {self.unsupported}; it runs on "
                f"{', '.join(f.label for f in FAMILIES.values() if self.runs_on(f))}"
            )

    def use_layers(self, run: Run, names: Iterable[str]) -> None:
        """Set the resolved layer selection to `names` (module names of this model).

        For methods whose layers depend on their inputs, from their `bind` / `setup`: MasaCtrl's
        mask-source layers, Reposition's mutual + isolation + cross sets, Isolation's map layers.
        """
        chosen = frozenset(names)
        unknown = sorted(chosen - set(run.registry.layers))
        if unknown:
            raise ValueError(f"{type(self).__name__}: no attention layer named {unknown[0]!r} on this model")
        self._selected = chosen

    def pick_layers(self, run: Run) -> list[LayerInfo]:
        """The layers `self.layers` selects on the run's model."""
        if isinstance(self.layers, Select):
            return self.layers.pick(run.registry)
        return [i for i in run.registry if self.layers(i)]

    def check_steps(self, run: Run) -> None:
        """Refuse a step window that selects no step of the run (warn once if it is empty by design)."""
        total = run.num_steps
        if total is None:
            return
        try:
            lo, hi = self.steps.bounds(total)
        except ValueError:
            return
        if max(lo, 0) < min(hi, total):
            return
        if self.steps.empty:
            if not getattr(self, "_warned_empty", False):
                self._warned_empty = True
                warnings.warn(f"{type(self).__name__}: steps={self.steps!r} selects no step, so it does not act "
                              "in this run", UserWarning, stacklevel=4)
            return
        raise ValueError(
            f"{type(self).__name__}: steps={self.steps!r} selects no step of this {total}-step run "
            f"(steps {lo}..{hi - 1 if hi < 1 << 29 else 'end'} asked, 0..{total - 1} exist), so it would do "
            "nothing; give a window inside the run, e.g. Steps(0, 0.5), or more steps"
        )

    def setup(self, run: Run) -> None:
        """Check the inputs against the model and prompts (raise ValueError before denoising)."""

    def reset(self) -> None:
        """Fresh per-run state."""
        self.state = SimpleNamespace()

    def selects(self, layer: LayerInfo) -> bool:
        if self._selected is None:
            return bool(self.layers(layer))
        return layer.name in self._selected

    @property
    def selected_layers(self) -> frozenset[str]:
        return self._selected or frozenset()

    def active(self, step: int, num_steps: int | None, phase: str) -> bool:
        return phase in self.phases and self.steps.active(step, num_steps)

    def begin_step(self, run: Run, step: int) -> None:
        """Called once when a new denoising step starts (before its first forward)."""

    # --- attention hooks ----------------------------------------------------------------------
    def qkv(self, ctx: CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return q, k, v

    def regions(self, ctx: CallContext) -> RegionMask | None:
        return None

    def downsample(self, ctx: CallContext) -> KVDownsample | None:
        return None

    def window(self, ctx: CallContext) -> LocalWindow | None:
        return None

    def capture(self, ctx: CallContext) -> torch.Tensor | None:
        return None

    def observe(self, ctx: CallContext, probs: torch.Tensor) -> None:
        pass

    def attend(
        self, ctx: CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        return None

    def output(self, ctx: CallContext, out: torch.Tensor) -> torch.Tensor:
        return out

    # --- between steps --------------------------------------------------------------------------
    def prepare_latents(self, run: Run, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def on_step_end(self, run: Run, step: int, timestep, tensors: dict[str, torch.Tensor]) -> dict:
        return {}

    def records(self) -> dict[str, Any]:
        """What this control recorded during the run (returned to the user)."""
        return {}

    # --- introspection --------------------------------------------------------------------------
    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(Control, hook)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def _split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`name`, `name:{"json": "options"}` or `name:key=value,key=value` -> (name, options)."""
    import json

    name, _, rest = spec.partition(":")
    name, rest = name.strip(), rest.strip()
    options: dict[str, Any] = {}
    if rest.startswith("{"):
        try:
            options = json.loads(rest)
        except json.JSONDecodeError as err:
            raise ValueError(f"control options of {name!r} are not valid JSON: {err}") from err
        if not isinstance(options, dict):
            raise ValueError(f"control options of {name!r} must be a JSON object, got {rest[:60]!r}")
    elif rest:
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"control option {item!r} of {name!r} is not key=value")
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value
    return name, options


def as_control(item: Control | str) -> Control:
    """A Control as given, or built from a name / "name:options" string (what `attnedit.apply` takes)."""
    return item if isinstance(item, Control) else make_control(item)


def _check_option(cls: type, control: str, key: str, value: Any) -> None:
    """An option of a simple declared type (int, float, bool, str, or one of them | None) gets exactly that:
    no "2" for an int, no true for a number, no NaN (what the CLI, job files and the app pass in)."""
    import types
    import typing

    from . import validate

    try:
        hint = typing.get_type_hints(cls.__init__).get(key)
    except Exception:  # an annotation this module cannot resolve: the constructor checks the value
        return
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    allowed = set(typing.get_args(hint)) if union else {hint}
    if value is None and type(None) in allowed:
        return
    simple = allowed - {type(None)}
    if not simple or not simple <= {int, float, bool, str}:
        return
    what = f"option {key} of control {control!r}"
    ok = ((bool in simple and isinstance(value, bool))
          or (int in simple and validate._is_int(value))
          or (float in simple and validate._is_number(value) and validate.math.isfinite(float(value)))
          or (str in simple and isinstance(value, str)))
    if not ok:
        words = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}
        names = " or ".join(words[t] for t in (bool, int, float, str) if t in simple)
        raise validate.InputError(what, value, names + (" or None" if type(None) in allowed else ""))


def describe_layers(registry: LayerRegistry) -> str:
    """A short summary of a model's layers for error messages (kinds, blocks, index range)."""
    infos = list(registry)
    kinds = sorted({i.kind for i in infos})
    blocks = sorted({i.block for i in infos})
    return (f"{len(infos)} layers, kinds {', '.join(kinds)}, blocks {', '.join(blocks)}, "
            f"indices 0..{max(i.index for i in infos)}, levels {', '.join(map(str, registry.levels()))}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)}>"
    return repr(value)


# Registry of control classes by name, for the CLI, batch files and the app.
CONTROLS: dict[str, type[Control]] = {}


def register(cls: type[Control]) -> type[Control]:
    CONTROLS[cls.name] = cls
    return cls


def make_control(name: str, options: dict[str, Any] | None = None) -> Control:
    """Build a control from its name and options, refusing unknown names and options by name.

    `name` may also carry the options in the command line's syntax: `"todo:factor=3"`,
    `'astar:{"words": ["cat", "dog"]}'` (then `options` must be None).

    >>> attnedit.make_control("todo", {"factor": 3})
    """
    if not isinstance(name, str):
        from . import validate

        raise validate.InputError("control", name, "a control name such as 'todo' or 'todo:factor=3'")
    if ":" in name:
        if options is not None:
            raise ValueError(f"give the options of {name!r} either after ':' or as options, not both")
        name, options = _split_spec(name)
    if name not in CONTROLS:
        from .methods import load_all

        load_all()
    if name not in CONTROLS:
        raise ValueError(f"unknown control {name!r}; available: {', '.join(sorted(CONTROLS))}")
    cls = CONTROLS[name]
    options = dict(options or {})
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self" and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for control {name!r}; valid options: {', '.join(valid)}"
        )
    for key, value in options.items():
        _check_option(cls, name, key, value)
    for key in ("steps",):
        if key in options and isinstance(options[key], list):
            options[key] = tuple(options[key])
    if "layers" in options and isinstance(options["layers"], dict):
        fields = [f for f in inspect.signature(Select).parameters]
        bad = [k for k in options["layers"] if k not in fields]
        if bad:
            raise ValueError(f"unknown key {bad[0]!r} in layers of control {name!r}; valid keys: {', '.join(fields)}")
        options["layers"] = Select(**options["layers"])
    return cls(**options)


__all__ = [
    "CONTROLS",
    "PHASES",
    "CallContext",
    "Control",
    "Example",
    "KVDownsample",
    "LocalWindow",
    "RegionMask",
    "as_control",
    "make_control",
    "register",
]
