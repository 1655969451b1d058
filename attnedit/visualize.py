"""Pictures of attention maps: heatmaps over the image, one labelled tile per word."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# A perceptually ordered colormap (dark blue -> teal -> yellow), as piecewise-linear anchors.
_ANCHORS = np.array(
    [
        [0.0, 0.05, 0.03, 0.25],
        [0.25, 0.23, 0.30, 0.55],
        [0.5, 0.13, 0.57, 0.55],
        [0.75, 0.45, 0.78, 0.33],
        [1.0, 0.99, 0.91, 0.15],
    ]
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 (H, W, 3)."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def normalise(m: torch.Tensor | np.ndarray) -> np.ndarray:
    a = m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def heatmap(attn_map: torch.Tensor | np.ndarray, image: Image.Image | None = None, alpha: float = 0.55,
            size: tuple[int, int] | None = None) -> Image.Image:
    """An (H, W) map as a colour heatmap, blended over `image` when given (resized to it)."""
    heat = Image.fromarray(colormap(normalise(attn_map)))
    target = image.size if image is not None else (size or (heat.width * 16, heat.height * 16))
    heat = heat.resize(target, Image.BILINEAR)
    if image is None:
        return heat
    return Image.blend(image.convert("RGB"), heat, alpha)


def map_grid(maps: dict[str, torch.Tensor], image: Image.Image | None = None, tile: int = 192,
             columns: int | None = None) -> Image.Image:
    """One labelled tile per word (the image itself first when given), as a PNG-ready grid."""
    tiles: list[tuple[str, Image.Image]] = []  # (label, picture)
    base = image.convert("RGB").resize((tile, tile), Image.BICUBIC) if image is not None else None
    if base is not None:
        tiles.append(("image", base))
    for word, m in maps.items():
        tiles.append((word, heatmap(m, base, size=(tile, tile)) if base is not None else heatmap(m, size=(tile, tile))))
    if columns is None:  # at most 6 per row, rows filled evenly (7 tiles: 4 + 3, not 6 + 1)
        rows = -(-len(tiles) // 6)
        columns = -(-len(tiles) // rows)
    cols = columns
    rows = -(-len(tiles) // cols)
    font = label_font(max(11, tile // 12))
    label_h = font.size + 8
    grid = Image.new("RGB", (cols * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (word, im) in enumerate(tiles):
        x, y = (i % cols) * tile, (i // cols) * (tile + label_h)
        grid.paste(im, (x, y))
        # the label under its tile, centred: a page's own overlays sit on images' top-left corners
        text = fit_text(draw, word, font, tile - 6)
        width = draw.textlength(text, font=font)
        draw.text((x + (tile - width) / 2, y + tile + 4), text, fill="black", font=font)
    return grid


def label_font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at `size` px (the bitmap default when FreeType is unavailable)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> str:
    """`text`, shortened with an ellipsis only if it is wider than `width` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
