"""The one attention entry point every attnedit control calls.

`attention(q, k, v, ...)` takes BSHD tensors plus optional feature descriptions (region labels,
ToDo K/V downsampling, a CLEAR local window, probability capture) and runs it on a registered
backend (`registry.py`): each backend lists small named constraints, and a backend takes a call
only when all of them pass. Choice order: `use(...)` > env `ATTNEDIT_KERNELS` (auto|torch|triton,
or any registered name) > auto.

- "torch" (`torch_backend.py`): SDPA, or xformers when installed and the case is plain; no
  constraints, exact for every case, the fallback of every other backend.
- "triton" (`triton_backend.py`): the fused kernels. Declared here with the constraints that
  decide whether triton is imported at all: the kernels are forward-only (when gradients must
  flow through the attention, e.g. guidance passes, CLEAR distillation, AttenCraft's attention
  losses, the PyTorch path runs, whose SDPA and captured probabilities carry autograd), and they
  need CUDA tensors, or CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`: how CI runs
  the kernels inside whole pipelines). The module adds the kernels' coverage (masks, shapes,
  dtypes, head dims, feature combinations).

"auto" silently takes the first backend, in registration order, whose `auto_devices` include the
tensors' device and whose constraints pass ("triton" for CUDA tensors only), else "torch". A
forced backend (`use("triton")`) runs every call its constraints accept; any other call runs on
PyTorch with one warning per distinct reason, except that a backend that cannot run here at all
(not importable; "triton" on CPU tensors without the interpreter) raises a RuntimeError.
`explain(q, k, v, **features)` says which backend a call would take and why the others refused.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .reference import downsample_kv, grid_centres, grid_corners, kv_index, window_mask  # noqa: F401 (re-exported)
from .registry import (  # noqa: F401 (re-exported)
    BACKENDS,
    Backend,
    Refusal,
    Unavailable,
    backend_names,
    forward_only,
    get_backend,
    needs_grad,
    register_backend,
    unregister_backend,
)
from .torch_backend import _captured_probs, _combine_masks, torch_attention  # noqa: F401 (re-exported)
from .types import KVDownsample, LocalWindow, RegionMask

_BACKENDS = BACKENDS  # the registry's table (name -> Backend)
_forced: str | None = None
_WARNED: set[tuple[str, str]] = set()  # (backend, reason) of the fallback warnings already given


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (`TRITON_INTERPRET=1`), i.e. on CPU tensors."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_or_interpreter(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_) -> str | None:
    """The Triton kernels run on CUDA tensors, and on CPU tensors in Triton's interpreter."""
    if q.is_cuda or (q.device.type == "cpu" and interpreting()):
        return None
    hint = ("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, to run "
            "them on the CPU in Triton's interpreter); use('auto') or use('torch') on the CPU")
    if q.device.type == "cpu":
        return Unavailable("CPU tensors need TRITON_INTERPRET=1", hint)
    return Unavailable(f"{q.device.type} tensors are not supported", hint)


# The built-in backends: "torch" registered itself on import (above); "triton" is declared here and
# registers itself when first needed (importing triton is slow, and on a CPU machine must not happen
# before TRITON_INTERPRET is set).
register_backend("triton", module=".triton_backend", constraints=[forward_only, cuda_or_interpreter],
                 auto_devices=("cuda",))


def _choices() -> tuple[str, ...]:
    return ("auto", *backend_names())


def use(name: str) -> None:
    """Force the backend for this process: "torch", "triton" (or another registered one) or "auto" (the default)."""
    if name not in _choices():
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(_choices())}")
    global _forced
    _forced = name


@contextmanager
def using(name: str):
    """Context manager form of `use`, restoring the previous choice on exit."""
    global _forced
    previous = _forced
    use(name)
    try:
        yield
    finally:
        _forced = previous


def current() -> str:
    """The backend choice in force ("auto", "torch", "triton" or another registered name)."""
    if _forced is not None:
        return _forced
    env = os.environ.get("ATTNEDIT_KERNELS", "auto").strip().lower() or "auto"
    if env not in _choices():
        raise ValueError(f"ATTNEDIT_KERNELS={env!r} is not one of {', '.join(_choices())}")
    return env


@dataclass(frozen=True)
class Explanation:
    """Which backend a call takes under `choice` and, for each backend refused, its first failing constraint.

    `backend` is None when the call raises instead (`error`: a forced backend that cannot run here).
    """

    choice: str
    backend: str | None
    refused: dict[str, Refusal] = field(default_factory=dict)
    error: str | None = None

    def __str__(self) -> str:
        lines = [f"{self.choice} -> {self.backend or 'error'}"]
        lines += [f"  {name} refused: {refusal}" for name, refusal in self.refused.items()]
        if self.error:
            lines.append(f"  error: {self.error}")
        return "\n".join(lines)


def _choose(choice: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: dict[str, Any]) -> Explanation:
    """The walk `_pick` does for every call, keeping each refusal (for `explain`)."""
    if choice == "torch":
        return Explanation(choice, "torch")
    if choice != "auto":
        refusal = get_backend(choice).refusal(q, k, v, **features)
        if refusal is None:
            return Explanation(choice, choice)
        if refusal.unavailable:
            return Explanation(choice, None, {choice: refusal}, _unavailable_message(refusal))
        return Explanation(choice, "torch", {choice: refusal})
    refused: dict[str, Refusal] = {}
    device = q.device.type
    for name, backend in BACKENDS.items():
        if name == "torch":
            continue
        if device not in backend.auto_devices:
            on = ", ".join(backend.auto_devices)
            why = f"'auto' takes it for {on} tensors only, not {device}" if on else f"only use({name!r}) takes it"
            refused[name] = Refusal(name, "auto_devices", why)
            continue
        refusal = backend.refusal(q, k, v, **features)
        if refusal is None:
            return Explanation(choice, name, refused)
        refused[name] = refusal
    return Explanation(choice, "torch", refused)


def _unavailable_message(refusal: Refusal) -> str:
    hint = getattr(refusal.reason, "hint", "")
    return (f"attnedit.kernels.use({refusal.backend!r}) was forced but cannot run here: {refusal.reason}"
            + (f"; {hint}" if hint else ""))


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str | None = None,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    regions: RegionMask | None = None,
    downsample: KVDownsample | None = None,
    window: LocalWindow | None = None,
    capture: torch.Tensor | None = None,
) -> Explanation:
    """Which backend `attention(q, k, v, **features)` would run, and why the others refused; runs nothing.

    `backend` evaluates another choice than the one in force ("auto", "torch", "triton", ...).
    """
    choice = current() if backend is None else backend
    if choice not in _choices():
        raise ValueError(f"unknown attention backend {choice!r}; choose one of {', '.join(_choices())}")
    features = dict(scale=scale, mask=mask, regions=regions, downsample=downsample, window=window, capture=capture)
    return _choose(choice, q, k, v, features)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    regions: RegionMask | None = None,
    downsample: KVDownsample | None = None,
    window: LocalWindow | None = None,
    capture: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale [+ mask]) v on BSHD tensors, with optional features.

    - `mask`: a dense bool (True = keep) or additive mask broadcastable to (B, H, Nq, Nk), as
      diffusers passes it (legacy models' attention masks).
    - `regions`: region labels (see `RegionMask`), O(N + M) memory in the fast backends.
    - `downsample`: ToDo resampling of the image keys/values (see `KVDownsample`).
    - `window`: CLEAR local attention (see `LocalWindow`).
    - `capture`: a LongTensor of key indices; then `(out, probs)` is returned where `probs`
      (B, Nq, len(capture)) are the head-averaged softmax probabilities of those keys, exact
      (normalised over every key, masks included). With `downsample`, indices refer to the
      resampled key sequence.
    """
    features: dict[str, Any] = dict(
        scale=scale, mask=mask, regions=regions, downsample=downsample, window=window, capture=capture
    )
    out, probs = _pick(current(), q, k, v, features).run(q, k, v, **features)
    return out if capture is None else (out, probs)


def _pick(choice: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: dict[str, Any]) -> Backend:
    """The backend a call runs on (`_choose`'s walk without the record: every call pays for this one)."""
    if choice == "auto":
        device = q.device.type
        for backend in BACKENDS.values():
            if device in backend.auto_devices and backend.refusal(q, k, v, **features) is None:
                return backend
        return BACKENDS["torch"]
    backend = get_backend(choice)
    if choice == "torch":
        return backend
    refusal = backend.refusal(q, k, v, **features)
    if refusal is None:
        return backend
    if refusal.unavailable:
        raise RuntimeError(_unavailable_message(refusal))
    _warn_fallback(refusal)
    return BACKENDS["torch"]


def _warn_fallback(refusal: Refusal) -> None:
    """One warning per distinct reason a forced backend passed a call to PyTorch."""
    key = (refusal.backend, str(refusal.reason))
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"attnedit.kernels.use({refusal.backend!r}): a call runs on PyTorch instead: {refusal.reason} "
        f"[{refusal.constraint}] (warned once per reason)",
        stacklevel=4,  # the caller of `attention`
    )
