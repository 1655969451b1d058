"""The Triton backend of `attnedit.kernels.attention`: the cases the fused kernels take, and running them.

Registered as "triton" when imported; the dispatch imports it lazily, once the constraints it
declares for "triton" pass (forward-only, CUDA tensors or the interpreter: see dispatch.py), and
it raises ImportError when Triton is missing, so the dispatch reports the backend unavailable.
The constraints below are the kernels' coverage, one small named check each, walked in order:
one feature at a time (regions with capture is the one combination), no dense `mask`,
fp16/bf16/fp32, head dims up to 256 shared by q, k and v. Anything else takes the PyTorch path,
which is exact for every combination.
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where triton is absent
    raise ImportError("attnedit's Triton backend needs the `triton` package") from exc

from .flash_attention import MAX_HEAD_DIM, SUPPORTED_DTYPES, flash_attention
from .local_window_attention import local_window_attention
from .registry import register_backend
from .todo_attention import MODES, todo_attention
from .types import KVDownsample, LocalWindow, RegionMask

MAX_AVG_CELL = 64  # "avg" unrolls fy * fx loads per key tile


# ----------------------------------------------------------------------------- constraints
# Each takes the call (q, k, v, **features) and returns None when the kernels cover it, else why not.


def no_dense_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                  **_) -> str | None:
    return None if mask is None else "dense masks are not supported"


def one_device(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_) -> str | None:
    return None if q.device == k.device == v.device else "q, k, v are on different devices"


def bshd_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_) -> str | None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D (batch, seq, heads, head_dim)"
    if k.shape != v.shape:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape"
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or k.shape[3] != q.shape[3]:
        return "q and k differ in batch, heads or head_dim"
    return None


def kernel_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_) -> str | None:
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k, v differ in dtype"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {str(q.dtype).removeprefix('torch.')} is not one of float16, bfloat16, float32"
    return None


def head_dim(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **_) -> str | None:
    d = q.shape[-1]
    return f"head_dim {d} > {MAX_HEAD_DIM}" if d > MAX_HEAD_DIM else None


def one_feature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, regions: RegionMask | None = None,
                downsample: KVDownsample | None = None, window: LocalWindow | None = None, **_) -> str | None:
    if sum(x is not None for x in (regions, downsample, window)) > 1:
        return "regions, downsample and window are fused one at a time"
    return None


def capture_without_resampling(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               capture: torch.Tensor | None = None, downsample: KVDownsample | None = None,
                               window: LocalWindow | None = None, **_) -> str | None:
    if capture is not None and (downsample is not None or window is not None):
        return "capture is fused with plain and region attention only (not downsample or window)"
    return None


def region_labels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, regions: RegionMask | None = None,
                  **_) -> str | None:
    if regions is None:
        return None
    bsz, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
    if regions.q_labels.shape != (bsz, n_q) or regions.k_labels.shape != (bsz, n_k):
        return f"region labels must be ({bsz}, {n_q}) and ({bsz}, {n_k})"
    if regions.allowed.dim() == 3 and regions.allowed.shape[0] != bsz:
        return "a (B, R, R) region table needs B = batch size"
    return None


def fused_downsample(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, downsample: KVDownsample | None = None,
                     **_) -> str | None:
    if downsample is None:
        return None
    fy, fx = downsample.factor
    gh, gw = downsample.grid
    if downsample.mode not in MODES:
        return f"downsample mode {downsample.mode!r} is not fused (only {', '.join(MODES)})"
    if fy < 1 or fx < 1:
        return f"downsample factor {downsample.factor} is not >= 1"
    if downsample.mode == "avg" and fy * fx > MAX_AVG_CELL:
        return f"avg cells of {fy}x{fx} tokens > {MAX_AVG_CELL}"
    if downsample.start < 0 or downsample.start + gh * gw > k.shape[1]:
        return f"the image tokens [{downsample.start}, {downsample.start + gh * gw}) exceed the {k.shape[1]} keys"
    return None


def window_layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: LocalWindow | None = None,
                  **_) -> str | None:
    if window is None:
        return None
    n = window.grid[0] * window.grid[1] + window.text_len
    if q.shape[1] != n or k.shape[1] != n:
        return f"a local window needs Nq = Nk = text_len + h*w = {n}"
    return None


def capture_indices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, capture: torch.Tensor | None = None,
                    **_) -> str | None:
    if capture is None or capture.numel() == 0:
        return None
    if capture.dim() != 1:
        return "capture must be a 1-D tensor of key indices"
    if int(capture.min()) < 0 or int(capture.max()) >= k.shape[1]:
        return f"capture indices outside [0, {k.shape[1]})"
    return None


CONSTRAINTS = (
    no_dense_mask,
    one_device,
    bshd_shapes,
    kernel_dtype,
    head_dim,
    one_feature,
    capture_without_resampling,
    region_labels,
    fused_downsample,
    window_layout,
    capture_indices,
)


def refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **features) -> str | None:
    """The reason of the first constraint of `CONSTRAINTS` the case fails, or None."""
    for check in CONSTRAINTS:
        reason = check(q, k, v, **features)
        if reason is not None:
            return reason
    return None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **features) -> bool:
    """True when one of the fused kernels computes exactly this case (the device and autograd are the dispatch's)."""
    return refusal(q, k, v, **features) is None


def run(
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
    """Run the kernel for a case the constraints accepted; returns (out, head-averaged probs or None)."""
    if mask is not None:
        raise ValueError("the Triton backend does not take dense masks; use the PyTorch path")
    if downsample is not None:
        return todo_attention(q, k, v, downsample, scale=scale), None
    if window is not None:
        return local_window_attention(q, k, v, window, scale=scale), None
    return flash_attention(q, k, v, scale=scale, regions=regions, capture=capture)


register_backend("triton", run=run, constraints=CONSTRAINTS)
