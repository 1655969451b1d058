"""The attention backends by name: each one's implementation and the small named constraints it needs.

On the model of diffusers' `_AttentionBackendRegistry` (`diffusers/models/attention_dispatch.py`),
a backend registers a `run` function and a list of constraint checks:

    def no_dense_mask(q, k, v, *, mask=None, **features):
        return None if mask is None else "dense masks are not supported"

    register_backend("mine", run=my_attention, constraints=[no_dense_mask], auto_devices=("cuda",))

A constraint takes the call (`q, k, v, **features`: scale, mask, regions, downsample, window,
capture) and returns None when it is satisfied, else a short reason. `run(q, k, v, **features)`
returns `(out, probs or None)` like `torch_attention`. The dispatch (`dispatch.py`) walks the
constraints of a backend in order; the first failing one is why that backend does not take the
call (`attnedit.kernels.explain` shows it). "auto" tries the backends in registration order, each
only for tensors on its `auto_devices`, and falls back to "torch" (no constraints: exact for every
case); a backend forced with `use(name)` takes every call its constraints accept.

A reason that is an `Unavailable` says the backend cannot run here at all (not importable, CPU
tensors without Triton's interpreter): whoever forced it gets an error instead of a fallback.

A backend may be declared before its module is imported (`module=`): the constraints given with
the declaration are checked first, and the module is imported (once) only when they pass; it
registers `run` and its own constraints, which follow the declared ones. The Triton backend is
declared so (dispatch.py), because importing triton on a CPU machine is slow and must not happen
before a test sets TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

RunFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
Constraint = Callable[..., "str | None"]


class Unavailable(str):
    """A refusal meaning "cannot run in this environment" (not "not for this case"), with a hint for the error."""

    hint: str

    def __new__(cls, reason: str, hint: str = "") -> Unavailable:
        self = super().__new__(cls, reason)
        self.hint = hint
        return self


@dataclass(frozen=True)
class Refusal:
    """Why a backend does not take a call: its first failing constraint (by name) and that constraint's reason."""

    backend: str
    constraint: str
    reason: str

    @property
    def unavailable(self) -> bool:
        return isinstance(self.reason, Unavailable)

    def __str__(self) -> str:
        return f"{self.reason} [{self.constraint}]"


@dataclass
class Backend:
    """One registered backend. `declared` constraints are checked before `module` is imported; `constraints` after."""

    name: str
    run: RunFn | None = None
    constraints: tuple[Constraint, ...] = ()
    declared: tuple[Constraint, ...] = ()
    auto_devices: tuple[str, ...] = ()
    module: str | None = None
    load_error: str | None = field(default=None, repr=False)

    def all_constraints(self) -> tuple[Constraint, ...]:
        return self.declared + self.constraints

    def refusal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **features) -> Refusal | None:
        """The first failing constraint, or None when this backend computes the call exactly.

        Imports a declared backend's module once its declared constraints pass.
        """
        for check in self.declared:
            reason = check(q, k, v, **features)
            if reason is not None:
                return Refusal(self.name, constraint_name(check), reason)
        if self.run is None:
            error = self.load()
            if error is not None:
                return Refusal(self.name, "importable", error)
        for check in self.constraints:
            reason = check(q, k, v, **features)
            if reason is not None:
                return Refusal(self.name, constraint_name(check), reason)
        return None

    def supports(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **features) -> bool:
        return self.refusal(q, k, v, **features) is None

    def load(self) -> Unavailable | None:
        """Import the module of a declared backend (once); the reason it cannot be, or None."""
        if self.run is None and self.load_error is None:
            if self.module is None:
                self.load_error = f"backend {self.name!r} has no implementation"
            else:
                try:
                    importlib.import_module(self.module, __package__)
                except ImportError as exc:
                    self.load_error = str(exc)
                else:
                    if self.run is None:
                        self.load_error = f"{self.module} did not register backend {self.name!r}"
        if self.load_error is None:
            return None
        return Unavailable(f"{self.name} is not importable ({self.load_error})",
                           hint="install what it needs, or use('auto')")


BACKENDS: dict[str, Backend] = {}


def register_backend(
    name: str,
    supports: Callable[..., bool] | None = None,
    run: RunFn | None = None,
    *,
    constraints: Sequence[Constraint] = (),
    auto_devices: Sequence[str] | None = None,
    module: str | None = None,
):
    """Register an attention backend; returns its `Backend` (or a decorator, see below).

    - `register_backend(name, run=fn, constraints=[check, ...], auto_devices=("cuda",))`: a backend.
      `auto_devices`: device types "auto" may pick it for (default none: only `use(name)` picks it).
    - `@register_backend(name, constraints=[...])` on `fn`: the same, as a decorator.
    - `register_backend(name, module=".mod", constraints=[...], auto_devices=...)`: a declaration; `.mod`
      (relative to attnedit.kernels, or absolute) is imported when the constraints pass, and registers
      `run` and its own constraints under the same name (they follow the declared ones).
    - `register_backend(name, supports, run)`: the older form; `supports(q, k, v, **features) -> bool`
      becomes one constraint.
    """
    if supports is None and run is None and module is None:
        def decorator(fn: RunFn) -> RunFn:
            register_backend(name, run=fn, constraints=constraints, auto_devices=auto_devices)
            return fn

        return decorator
    checks = tuple(constraints)
    if supports is not None:
        checks += (_from_supports(supports),)
    devices = None if auto_devices is None else tuple(auto_devices)
    previous = BACKENDS.get(name)
    if module is not None:
        backend = Backend(name, run, declared=checks, auto_devices=devices or (), module=module)
    elif previous is not None and previous.module is not None:
        # the module of a declared backend registering itself: complete the declaration in place
        previous.run, previous.constraints, previous.load_error = run, checks, None
        if devices is not None:
            previous.auto_devices = devices
        return previous
    else:
        backend = Backend(name, run, checks, auto_devices=devices or ())
    BACKENDS[name] = backend
    return backend


def unregister_backend(name: str) -> None:
    """Remove a registered backend ("torch", the fallback, stays)."""
    if name == "torch":
        raise ValueError("the 'torch' backend is the fallback of every other; it cannot be removed")
    BACKENDS.pop(name, None)


def backend_names() -> list[str]:
    """Registered backends in registration order (the order "auto" tries them)."""
    return list(BACKENDS)


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"no attention backend {name!r} is registered; registered: {', '.join(BACKENDS)}") from None


def constraint_name(check: Callable) -> str:
    return getattr(check, "__name__", None) or type(check).__name__


def _from_supports(supports: Callable[..., bool]) -> Constraint:
    label = getattr(supports, "__qualname__", None) or constraint_name(supports)

    def check(q, k, v, **features):
        return None if supports(q, k, v, **features) else f"{label}() is False"

    check.__name__ = constraint_name(supports)
    return check


# ----------------------------------------------------------------------------- shared constraints


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd must flow through an attention on these inputs (the kernels are forward-only)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def forward_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_) -> str | None:
    """A backend without autograd: the call must not need gradients."""
    return "gradients must flow (the kernels are forward-only)" if needs_grad(q, k, v) else None
