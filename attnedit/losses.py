"""Latent-guidance losses as pure functions of attention maps.

Kept apart from the controls so each formula can be checked on hand-built maps (disjoint,
identical, empty, one-pixel) without a model. Maps are (..., H, W) tensors; every function is
batched over the leading dimensions and differentiable.

- Attend-and-Excite: `token_softmax`, `gaussian_smooth`, `attend_excite_loss`.
- A-STAR: `minmax`, `segregation_loss` (Eq. 2), `retention_loss` (Eq. 3).
- Bounded Attention: `bounded_iou_loss` ((1 - IoU)^2 per subject).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-8


def gaussian_kernel(size: int = 3, sigma: float = 0.5, kind: str = "ae") -> torch.Tensor:
    """(size, size) normalised 2-D Gaussian.

    `kind="ae"` reproduces the Attend-and-Excite code, which evaluates exp(-((x - mu) / (2 sigma))^2)
    per axis (a textbook Gaussian of sigma * sqrt(2)); `kind="standard"` is exp(-(x - mu)^2 / (2 sigma^2)).
    At sigma 0.5 the "ae" 1-D weights are [e^-1, 1, e^-1] / (1 + 2 e^-1).
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be a positive odd int, got {size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    if kind == "ae":
        w = torch.exp(-((x / (2 * sigma)) ** 2))
    elif kind == "standard":
        w = torch.exp(-(x**2) / (2 * sigma**2))
    else:
        raise ValueError(f"unknown smoothing kind {kind!r}; choose 'ae' or 'standard'")
    w = w / w.sum()
    return torch.outer(w, w).float()


def gaussian_smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5, kind: str = "ae") -> torch.Tensor:
    """Smooth (..., H, W) maps with a reflect-padded Gaussian (A&E's 3x3, sigma 0.5 by default).

    Reflect padding needs H, W > size // 2; smaller maps fall back to replicate padding.
    """
    if size == 1:
        return maps
    kernel = gaussian_kernel(size, sigma, kind).to(maps.device, maps.dtype)
    lead = maps.shape[:-2]
    h, w = maps.shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    pad = size // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(x, kernel[None, None])
    return x.reshape(*lead, h, w)


def token_softmax(maps: torch.Tensor, keep: torch.Tensor | None = None, temperature: float = 0.01) -> torch.Tensor:
    """Softmax over the token axis (last) of (..., N, C) maps at `1 / temperature` (A&E: x100).

    `keep` (bool, broadcastable to (..., 1, C)) excludes columns (start/end tokens, padding, other
    prompts' tokens); excluded columns get probability 0.
    """
    logits = maps / temperature
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def attend_excite_loss(peaks: torch.Tensor) -> torch.Tensor:
    """A&E: max over subjects of max(0, 1 - peak); `peaks` (B, S) -> (B,).

    Only the weakest subject receives gradient, as in the official code.
    """
    return torch.relu(1.0 - peaks).amax(dim=-1)  # relu: no gradient once a peak reaches 1


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Scale each (..., H, W) map to [0, 1]; a constant map becomes all zeros."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp(min=EPS)).reshape(maps.shape)


def soft_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum min(a, b) / sum (a + b) over the last two axes (half a soft Dice; 0 when both are empty)."""
    num = torch.minimum(a, b).flatten(-2).sum(-1)
    den = (a + b).flatten(-2).sum(-1)
    return num / den.clamp(min=EPS)


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """A-STAR Eq. 2: sum over unordered concept pairs of the soft overlap; (B, S, H, W) -> (B,).

    Each pair term lies in [0, 0.5]: 0 for disjoint supports, 0.5 for identical maps.
    """
    s = maps.shape[-3]
    total = maps.new_zeros(maps.shape[:-3])
    for m in range(s):
        for n in range(m + 1, s):
            total = total + soft_overlap(maps[..., m, :, :], maps[..., n, :, :])
    return total


def retention_loss(maps: torch.Tensor, masks: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """A-STAR Eq. 3: sum over concepts of 1 - soft overlap(map, binary mask); (B, S, H, W) -> (B,).

    `masks` are the binarised previous-step activations (or user layout masks), detached.
    `weights` (B, S) or (S,) switches terms off (0) where a concept has no mask yet.
    """
    terms = 1.0 - soft_overlap(maps, masks.to(maps.dtype))
    if weights is not None:
        terms = terms * weights.to(terms.dtype)
    return terms.sum(-1)


def bounded_iou_loss(fg: torch.Tensor, bg: torch.Tensor, num_subjects: int | None = None) -> torch.Tensor:
    """Bounded Attention: per subject (1 - IoU)^2 with IoU = fg / (fg + S * bg); (B, S) -> (B, S).

    `fg` is the attention mass a subject's context puts inside its box, `bg` the mass on the
    background. With no mass anywhere the IoU is taken as 0 (loss 1).
    """
    s = fg.shape[-1] if num_subjects is None else num_subjects
    iou = fg / (fg + s * bg).clamp(min=EPS)
    return (1.0 - iou) ** 2


def linear_schedule(start: float, end: float, steps: int, i: int) -> float:
    """start + (end - start) * i / steps (Bounded Attention's step sizes)."""
    return start + (end - start) * i / max(steps, 1)


def ae_step_size(scale: float, i: int, total: int, scale_range: tuple[float, float] = (1.0, 0.5)) -> float:
    """A&E step size: scale * sqrt(linspace(range[0], range[1], total)[i])."""
    if total <= 1:
        return scale * math.sqrt(scale_range[0])
    frac = scale_range[0] + (scale_range[1] - scale_range[0]) * i / (total - 1)
    return scale * math.sqrt(frac)
