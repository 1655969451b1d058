"""The one attention entry point every attnedit control calls.

`attention(q, k, v, ...)` takes BSHD tensors plus optional feature descriptions (region labels,
ToDo K/V downsampling, a CLEAR local window, probability capture) and runs the best available
backend: a registered fast backend (the Triton kernels) when it supports the case, else the
PyTorch path (SDPA, or xformers when installed and the case is plain). Choice order:
`use(...)` > env `ATTNEDIT_KERNELS` (torch|triton|auto) > auto.

A fast backend is only chosen where it is exact for the caller:
- "auto" takes the Triton kernels for CUDA tensors; "triton" also for CPU tensors when Triton's
  interpreter is on (`TRITON_INTERPRET=1`: how CI runs the kernels inside whole pipelines) and
  refuses CPU tensors otherwise.
- The kernels are forward-only: when gradients must flow through the attention (grad enabled and
  q, k or v requiring grad: guidance passes, CLEAR distillation, AttenCraft's attention losses),
  the PyTorch path runs instead, whose SDPA and captured probabilities carry autograd.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .types import KVDownsample, LocalWindow, RegionMask

_CHOICES = ("auto", "torch", "triton")
_forced: str | None = None


@dataclass
class _Backend:
    supports: Callable[..., bool]
    run: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


_BACKENDS: dict[str, _Backend] = {}


def register_backend(
    name: str,
    supports: Callable[..., bool],
    run: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
) -> None:
    """Register a fast backend (`supports(q, k, v, **features) -> bool`, `run(...) -> (out, probs)`)."""
    _BACKENDS[name] = _Backend(supports, run)


def use(name: str) -> None:
    """Force the backend for this process: "torch", "triton" or "auto" (the default)."""
    if name not in _CHOICES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(_CHOICES)}")
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
    """The backend choice in force ("auto", "torch" or "triton")."""
    if _forced is not None:
        return _forced
    env = os.environ.get("ATTNEDIT_KERNELS", "auto").strip().lower() or "auto"
    if env not in _CHOICES:
        raise ValueError(f"ATTNEDIT_KERNELS={env!r} is not one of {', '.join(_CHOICES)}")
    return env


def _load_triton() -> _Backend | None:
    if "triton" not in _BACKENDS:
        try:
            from . import triton_backend  # noqa: F401  (registers itself)
        except ImportError:
            return None
    return _BACKENDS.get("triton")


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
    choice = current()
    # Import Triton only when it can run (CUDA) or was forced: importing it on CPU is slow and
    # would decorate the kernels before a test can set TRITON_INTERPRET.
    if choice != "torch" and (q.is_cuda or choice == "triton") and not needs_grad(q, k, v):
        backend = _load_triton()
        if backend is None:
            if choice == "triton":
                raise RuntimeError("attnedit.kernels.use('triton') was forced but Triton is not importable; "
                                   "pip install triton, or use('auto')")
        elif (q.is_cuda or _check_interpreter(choice)) and backend.supports(q, k, v, **features):
            out, probs = backend.run(q, k, v, **features)
            return out if capture is None else (out, probs)
    out, probs = torch_attention(q, k, v, **features)
    return out if capture is None else (out, probs)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd must flow through an attention on these inputs (the kernels are forward-only)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (`TRITON_INTERPRET=1`), i.e. on CPU tensors."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_interpreter(choice: str) -> bool:
    """CPU tensors under a forced "triton": fine in the interpreter, a clear error otherwise."""
    if interpreting():
        return True
    raise RuntimeError(
        "attnedit.kernels.use('triton') runs the Triton kernels, which need CUDA tensors (or TRITON_INTERPRET=1 "
        "set before triton is imported, to run them on the CPU in Triton's interpreter); use('auto') or "
        "use('torch') on the CPU"
    )


# ----------------------------------------------------------------------------- PyTorch path


def downsample_kv(x: torch.Tensor, spec: KVDownsample) -> torch.Tensor:
    """Resample the image tokens of a BSHD tensor on their grid; other tokens are kept."""
    h, w = spec.grid
    fh, fw = spec.factor
    if fh == 1 and fw == 1:
        return x
    if spec.mode in ("nearest", "nearest-exact"):
        return x.index_select(1, kv_index(x.shape[1], spec, x.device))
    b, _, nh, d = x.shape
    start, end = spec.start, spec.start + h * w
    img = x[:, start:end].reshape(b, h, w, nh * d).permute(0, 3, 1, 2)  # (B, C, h, w)
    oh, ow = spec.out_grid
    if spec.mode == "avg":
        small = F.avg_pool2d(
            img.float(), (fh, fw), stride=(fh, fw), ceil_mode=True, count_include_pad=False
        ).to(img.dtype)
    elif spec.mode == "bilinear":
        small = F.interpolate(img.float(), size=(oh, ow), mode="bilinear", align_corners=False)
        small = small.to(img.dtype)
    else:
        raise ValueError(
            f"unknown downsampling mode {spec.mode!r}; choose nearest, nearest-exact, avg or bilinear"
        )
    small = small.permute(0, 2, 3, 1).reshape(b, oh * ow, nh, d)
    return torch.cat([x[:, :start], small, x[:, end:]], dim=1)


_KV_INDEX: dict[tuple, torch.Tensor] = {}


def kv_index(n_k: int, spec: KVDownsample, device: torch.device) -> torch.Tensor:
    """Key positions kept by a nearest / nearest-exact `spec` over a sequence of `n_k` keys.

    One LongTensor per (sequence length, grid, factor, mode, image start, device), built once and
    reused: the tokens before the image, the picked token of every output cell, the tokens after.
    """
    key = (n_k, spec.grid, spec.factor, spec.mode, spec.start, str(device))
    idx = _KV_INDEX.get(key)
    if idx is None:
        h, w = spec.grid
        pick = grid_centres if spec.mode == "nearest-exact" else grid_corners
        ys, xs = pick(h, spec.factor[0]), pick(w, spec.factor[1])
        cells = (ys[:, None] * w + xs[None, :]).flatten() + spec.start
        end = spec.start + h * w
        idx = torch.cat([torch.arange(spec.start), cells, torch.arange(end, n_k)]).to(device)
        if len(_KV_INDEX) > 256:
            _KV_INDEX.clear()
        _KV_INDEX[key] = idx
    return idx


def grid_corners(size: int, factor: int, device: torch.device | None = None) -> torch.Tensor:
    """Source index of each output cell for "nearest": the first token of the cell (torch's rule)."""
    return torch.arange(-(-size // factor), device=device) * factor


def grid_centres(size: int, factor: int, device: torch.device | None = None) -> torch.Tensor:
    """Source index of each output cell for "nearest-exact" on a ceil-divided grid.

    Cell i covers [i*f, min((i+1)*f, size)); it reads token i*f + f//2, which is what torch's
    `interpolate(mode="nearest-exact")` reads (floor((i + 0.5) * f)) wherever f divides the size
    (the official ToDo's case: at f = 2 the lower-right token of each 2x2 cell). A partial border
    cell, which torch's floor-sized output drops, reads its last token when f//2 falls outside it.
    """
    starts = torch.arange(-(-size // factor), device=device) * factor
    return torch.clamp(starts + factor // 2, max=size - 1)


def window_mask(window: LocalWindow, n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """Dense (Nq, Nk) bool mask of a CLEAR local window (reference; small sizes)."""
    h, w = window.grid
    t = window.text_len
    n_img = h * w
    idx = torch.arange(n_img, device=device)
    ys, xs = (idx // w).float(), (idx % w).float()
    dist2 = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2
    local = dist2 < float(window.radius) ** 2
    full = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if window.text_first:
        full[t : t + n_img, t : t + n_img] = local
    else:
        full[:n_img, :n_img] = local
    return full


def _combine_masks(
    mask: torch.Tensor | None, extra: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Combine a bool `extra` (True = keep) with an optional bool/additive mask -> additive."""
    neg = torch.finfo(dtype).min
    bias = torch.zeros(extra.shape, dtype=dtype, device=extra.device).masked_fill(~extra, neg)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, neg)
    return (bias + mask.to(dtype)).clamp(min=neg)


def torch_attention(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch path: SDPA (or xformers) with masks materialised densely when needed."""
    if downsample is not None:
        k = downsample_kv(k, downsample)
        v = downsample_kv(v, downsample)
    n_q, n_k = q.shape[1], k.shape[1]
    keep: torch.Tensor | None = None
    if regions is not None:
        keep = regions.dense()  # (B, 1, Nq, Nk)
    if window is not None:
        wmask = window_mask(window, n_q, n_k, q.device)[None, None]
        keep = wmask if keep is None else keep & wmask
    attn_mask = mask
    if keep is not None:
        attn_mask = _combine_masks(mask, keep, q.dtype)
    if capture is None and attn_mask is None and _xformers is not None and q.is_cuda:
        return _xformers.memory_efficient_attention(q, k, v, scale=scale), None
    probs = None
    if capture is not None and _fused_lse_applies(q, k, v, attn_mask):
        out, probs = _capture_with_fused_lse(q, k, v, scale, attn_mask, capture)
    else:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
        ).transpose(1, 2)
        # The output stays SDPA's (identical to an uncaptured call); captured probabilities come from
        # explicit logits normalised over every key (autograd flows through them for guidance).
        if capture is not None:
            probs = _captured_probs(q, k, scale, attn_mask, capture)
    if keep is not None:
        # Rows with no allowed key: the additive finfo.min bias gives them a uniform softmax;
        # the contract is zeros, for the output and the probabilities alike.
        empty = ~keep.any(-1)  # (B|1, 1, Nq)
        if bool(empty.any()):
            out = out.masked_fill(empty.transpose(1, 2).unsqueeze(-1), 0.0)
            if probs is not None:
                probs = probs.masked_fill(empty.transpose(1, 2), 0.0)
    return out, probs


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fused_lse_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """CPU fp32 without autograd: SDPA's own CPU kernel can return the log-sum-exp beside the output."""
    return (
        _CPU_FLASH is not None
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and not needs_grad(q, k, v)
        and (attn_mask is None or attn_mask.dtype == q.dtype)
    )


def _capture_with_fused_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    capture: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention pass that also gives the probabilities of the captured keys.

    The output is the one `F.scaled_dot_product_attention` computes on the CPU (the same kernel, so
    bit-equal); the kernel's log-sum-exp normalises the logits of the captured keys only, instead of
    recomputing every logit and a second log-sum-exp beside SDPA (`_captured_probs`, the autograd path).
    """
    out, lse = _CPU_FLASH(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
                          attn_mask=attn_mask, scale=scale)[:2]
    cols = capture.to(k.device)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k.index_select(1, cols)) * s
    if attn_mask is not None:
        logits = logits + attn_mask[..., cols]
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return out.transpose(1, 2), torch.nan_to_num(probs, nan=0.0).mean(dim=1)


def _captured_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    capture: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged softmax probabilities (B, Nq, Nc) of the keys `capture`."""
    d = q.shape[-1]
    s = scale if scale is not None else d**-0.5
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * s
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logits[..., capture.to(logits.device)]
    probs = torch.exp(picked - lse)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows -> zeros
    return probs.mean(dim=1)


try:  # optional: xformers for plain attention on CUDA
    import xformers.ops as _xformers  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - not installed on CPU machines
    _xformers = None
