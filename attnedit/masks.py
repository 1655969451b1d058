"""Boxes and masks -> per-token region labels on a layer grid (shared by MasaCtrl and IR-Diffusion).

Methods receive subject locations as normalised boxes or pixel masks and need, at every attention
layer, one small integer label per image token (its subject, 0 = background). Labels feed
`RegionMask`, so no dense N x N mask is ever built by the API.

Rules (the same for boxes and masks, so a box and its filled mask give identical labels):
- a grid cell belongs to a box/mask when the cell *centre* does ("nearest-exact" resampling);
- a box too small to contain any cell centre still gets the cell that contains its own centre,
  so a subject never vanishes at a coarse layer;
- overlaps: a cell covered by several subjects goes to the subject with the smallest area (the
  official IR-Diffusion post-processing makes masks disjoint the same way, smaller masks win);
  ties go to the subject listed first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import validate

Box = tuple[float, float, float, float]


def check_boxes(boxes: Sequence[Sequence[float]], what: str = "box", distinct: bool = False) -> list[Box]:
    """Validate normalised (x0, y0, x1, y1) boxes: finite, inside [0, 1], with positive area; with
    `distinct`, no two boxes identical (two subjects in one place cannot be told apart)."""
    out: list[Box] = []
    for i, b in enumerate(boxes):
        try:
            x0, y0, x1, y1 = (validate.number(f"{what} {i}", v) for v in b)
        except (TypeError, ValueError):
            raise ValueError(f"{what} {i} must be 4 finite numbers (x0, y0, x1, y1) in [0, 1], "
                             f"got {validate.short(b)}") from None
        if len(b) != 4:
            raise ValueError(f"{what} {i} must be 4 numbers (x0, y0, x1, y1) in [0, 1], got {validate.short(b)}")
        if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise ValueError(f"{what} {i} {b!r} is outside the image: boxes are fractions in [0, 1], "
                             "(x0, y0, x1, y1) from the top-left")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{what} {i} {b!r} has zero area: need x1 > x0 and y1 > y0")
        if distinct and (x0, y0, x1, y1) in out:
            raise ValueError(f"{what} {i} {b!r} is the same box as {what} {out.index((x0, y0, x1, y1))}: two "
                             "subjects need two places")
        out.append((x0, y0, x1, y1))
    return out


def check_box_size(boxes: Sequence[Box], height: int, width: int, cell: int, what: str = "box") -> None:
    """Refuse a box smaller than one latent cell (`cell` px) at this image size: no token would be inside it."""
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        w, h = (x1 - x0) * width, (y1 - y0) * height
        if w < cell or h < cell:
            raise ValueError(f"{what} {i} {list((x0, y0, x1, y1))} is {w:.1f}x{h:.1f} px at {width}x{height}, smaller "
                             f"than one latent cell ({cell} px): make it at least {cell / width:.3f} of the width and "
                             f"{cell / height:.3f} of the height")


def to_mask(mask: Any) -> torch.Tensor:
    """A float (H, W) tensor in [0, 1] from a tensor, numpy array, PIL image or image file path.

    Paths let a mask drawn by hand travel in JSON (batch job files, sidecars) as a PNG next to it
    (white = 1); any image mode is read as its grey level.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(mask, (str, os.PathLike)):
        path = Path(mask)
        if not path.is_file():
            raise ValueError(f"mask file {str(path)!r} does not exist")
        try:
            with Image.open(path) as im:
                mask = im.convert("L")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"mask file {str(path)!r} is not an image ({err})") from None
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr)
    t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).float()
    if t.dim() == 3 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {tuple(t.shape)}")
    validate.finite_tensor("mask", t)
    if t.numel() and float(t.max()) > 1.0:
        t = t / 255.0
    return t.clamp(0.0, 1.0)


def check_masks(masks: Sequence[Any], size: tuple[int, int], what: str = "mask") -> list[torch.Tensor]:
    """Convert masks and check they have the image size (H, W) in pixels."""
    out = []
    for i, m in enumerate(masks):
        t = to_mask(m)
        if tuple(t.shape) != tuple(size):
            raise ValueError(
                f"{what} {i} has size {tuple(t.shape)} but the image is {size[0]}x{size[1]} (H x W); "
                "give masks at the image resolution"
            )
        out.append(t)
    return out


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Standard Otsu threshold of `values` (maximises between-class variance on a histogram)."""
    x = values.detach().float().flatten()
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-12:
        return lo
    hist = torch.histc(x, bins=bins, min=lo, max=hi).double()
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centres = (centres[:-1] + centres[1:]) / 2
    w0 = hist.cumsum(0)
    w1 = w0[-1] - w0
    m0 = (hist * centres).cumsum(0)
    mu0 = m0 / w0.clamp(min=1e-12)
    mu1 = (m0[-1] - m0) / w1.clamp(min=1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    k = int(between[:-1].argmax())
    return float((centres[k] + centres[k + 1]) / 2)


def binarize(mask: torch.Tensor, threshold: float | str = 0.5) -> torch.Tensor:
    """Bool mask: `mask >= threshold`, or Otsu's threshold with `threshold="otsu"`."""
    if threshold == "otsu":
        threshold = otsu_threshold(mask)
    return mask >= float(threshold)


def resize_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(H, W) mask -> (h, w) by sampling at cell centres (nearest-exact), any aspect ratio."""
    m = mask.float()[None, None]
    return F.interpolate(m, size=tuple(grid), mode="nearest-exact")[0, 0]


def box_cells(box: Box, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(h, w) bool: cells whose centre lies in the box (at least the cell holding the box centre)."""
    h, w = grid
    x0, y0, x1, y1 = box
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w
    iny = (ys >= y0) & (ys < y1)
    inx = (xs >= x0) & (xs < x1)
    cells = iny[:, None] & inx[None, :]
    if not bool(cells.any()):
        cy = min(int((y0 + y1) / 2 * h), h - 1)
        cx = min(int((x0 + x1) / 2 * w), w - 1)
        cells[cy, cx] = True
    return cells


def mask_cells(mask: torch.Tensor, grid: tuple[int, int], threshold: float | str = 0.5) -> torch.Tensor:
    """(h, w) bool cells of a pixel mask (binarised, then sampled at cell centres).

    A non-empty mask that misses every cell centre keeps the cell of its largest value.
    """
    binary = binarize(mask, threshold)
    cells = resize_mask(binary, grid) > 0.5
    if bool(binary.any()) and not bool(cells.any()):
        small = F.adaptive_max_pool2d(mask.float()[None, None], tuple(grid))[0, 0]
        flat = int(small.flatten().argmax())
        cells.view(-1)[flat] = True
    return cells


def subject_labels(
    grid: tuple[int, int],
    boxes: Sequence[Box] | None = None,
    masks: Sequence[torch.Tensor] | None = None,
    threshold: float | str = 0.5,
    device: torch.device | None = None,
) -> torch.Tensor:
    """LongTensor (h * w,) row-major: 0 = background, i + 1 = subject i (overlaps: smaller wins)."""
    cells: list[torch.Tensor] = []
    areas: list[float] = []
    for b in boxes or ():
        cells.append(box_cells(b, grid, device))
        areas.append((b[2] - b[0]) * (b[3] - b[1]))
    for m in masks or ():
        binary = binarize(m, threshold)
        cells.append(mask_cells(m, grid, threshold).to(device))
        areas.append(float(binary.float().mean()))
    labels = torch.zeros(grid, dtype=torch.long, device=device)
    # paint the largest first so smaller subjects overwrite them; stable for ties (first listed wins)
    order = sorted(range(len(cells)), key=lambda i: (-areas[i], -i))
    for i in order:
        labels[cells[i]] = i + 1
    return labels.flatten()


def mask_bbox(cells: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) exclusive bounding box of a bool (h, w) mask, None if empty."""
    ys = torch.nonzero(cells.any(1)).flatten()
    xs = torch.nonzero(cells.any(0)).flatten()
    if ys.numel() == 0:
        return None
    return int(ys[0]), int(xs[0]), int(ys[-1]) + 1, int(xs[-1]) + 1


def map_layers(family, registry) -> list:
    """Cross-attention layers whose maps give automatic subject masks.

    UNets: the latent/4 level (MasaCtrl's official 16x16 maps at 512 px), or the coarsest level the
    model has below it, chosen by level, never by token count, so any size and aspect works and
    the maps exist before the decoder layers that use them. DiTs: every cross/joint layer.
    """
    cross = [i for i in registry if i.kind in ("cross", "joint")]
    if family.arch != "unet":
        return cross
    levels = sorted({i.level for i in cross})
    below = [lv for lv in levels if lv <= 2]
    level = below[-1] if below else levels[0]
    return [i for i in cross if i.level == level]


__all__ = [
    "binarize",
    "box_cells",
    "check_boxes",
    "check_masks",
    "map_layers",
    "mask_bbox",
    "mask_cells",
    "otsu_threshold",
    "resize_mask",
    "subject_labels",
    "to_mask",
]
