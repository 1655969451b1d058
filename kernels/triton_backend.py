"""The Triton backend of `attnedit.kernels.attention`: which cases the fused kernels take, and running them.

Imported lazily by the dispatch; raises ImportError when Triton is missing so the dispatch falls
back to PyTorch. `supports` is deliberately narrow: one feature at a time (regions with capture is
the one combination), no dense `mask`, fp16/bf16/fp32, head dims up to 256 shared by q, k and v.
Anything else takes the PyTorch path, which is exact for every combination.
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only where triton is absent
    raise ImportError("attnedit's Triton backend needs the `triton` package") from exc

from .dispatch import register_backend
from .flash_attention import MAX_HEAD_DIM, SUPPORTED_DTYPES, flash_attention
from .local_window_attention import local_window_attention
from .todo_attention import MODES, todo_attention
from .types import KVDownsample, LocalWindow, RegionMask

MAX_AVG_CELL = 64  # "avg" unrolls fy * fx loads per key tile


def supports(
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
) -> bool:
    """True when one of the fused kernels computes exactly this case."""
    if mask is not None:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        return False
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    bsz, n_q, n_heads, head_d = q.shape
    if k.shape[0] != bsz or k.shape[2] != n_heads or k.shape[3] != head_d or head_d > MAX_HEAD_DIM:
        return False
    if sum(x is not None for x in (regions, downsample, window)) > 1:
        return False
    if capture is not None and (downsample is not None or window is not None):
        return False
    n_k = k.shape[1]
    if regions is not None:
        if regions.q_labels.shape != (bsz, n_q) or regions.k_labels.shape != (bsz, n_k):
            return False
        if regions.allowed.dim() == 3 and regions.allowed.shape[0] != bsz:
            return False
    if downsample is not None:
        fy, fx = downsample.factor
        gh, gw = downsample.grid
        if downsample.mode not in MODES or fy < 1 or fx < 1:
            return False
        if downsample.mode == "avg" and fy * fx > MAX_AVG_CELL:
            return False
        if downsample.start < 0 or downsample.start + gh * gw > n_k:
            return False
    if window is not None:
        gh, gw = window.grid
        if n_q != n_k or n_q != gh * gw + window.text_len:
            return False
    if capture is not None and capture.numel() > 0:
        if capture.dim() != 1 or int(capture.min()) < 0 or int(capture.max()) >= n_k:
            return False
    return True


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
    """Run the kernel for a case `supports` accepted; returns (out, head-averaged probs or None)."""
    if mask is not None:
        raise ValueError("the Triton backend does not take dense masks; use the PyTorch path")
    if downsample is not None:
        return todo_attention(q, k, v, downsample, scale=scale), None
    if window is not None:
        return local_window_attention(q, k, v, window, scale=scale), None
    return flash_attention(q, k, v, scale=scale, regions=regions, capture=capture)


register_backend("triton", supports, run)
