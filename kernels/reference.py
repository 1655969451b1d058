"""PyTorch definitions shared by the PyTorch path and the kernels' references.

What a resampled key sequence (ToDo) or a CLEAR local window *is*, written once in plain PyTorch:
the PyTorch backend (`torch_backend.py`) computes with these, and each kernel's `reference_<name>`
(beside its kernel) checks the kernel against them. This module imports torch and `types` only, so
the kernel modules, the backends and the dispatch can all import it without a cycle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .types import KVDownsample, LocalWindow


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


def downsample_key_mask(mask: torch.Tensor, spec: KVDownsample) -> torch.Tensor:
    """A mask over the keys (last dim) resampled as `downsample_kv` resamples the keys.

    Why: joint-attention models mask padded text keys (Qwen-Image's `encoder_hidden_states_mask`)
    and ToDo shortens the image part of the same key sequence. Nearest modes pick the same key as
    the keys do (exact); avg / bilinear keep a cell when any of its keys is kept (bool) or average
    the additive biases, which is exact wherever the image keys carry no mask (the usual case).
    """
    if spec.factor == (1, 1):
        return mask
    lead = mask.shape[:-1]
    as_keys = mask.reshape(-1, mask.shape[-1]).t()[None, :, :, None]  # (1, Lk, M, 1): keys on dim 1
    if mask.dtype == torch.bool:
        small = downsample_kv(as_keys.float(), spec) > 0
    else:
        small = downsample_kv(as_keys, spec)
    return small[0, :, :, 0].t().reshape(*lead, -1)


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
