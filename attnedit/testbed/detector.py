"""A deterministic detector that reads testbed images back into objects (shape, colour, box).

Why: every quality number of attnedit (objects neglected, colours leaking, boxes followed, identity
kept) is measured by reading generated images with this detector, so it must be exact on rendered
images and tolerant of the soft edges and small colour shifts of generated ones.

How: objects are saturated colours on a grey background, so pixels are split by saturation; each
saturated pixel gets the nearest of the world's six hues; connected regions of one hue are
objects; the shape comes from geometry (hole share, solidity against the convex hull, fill of the
bounding box, corners of the outline).
"""

from __future__ import annotations

import colorsys
from collections import deque
from dataclasses import dataclass

import numpy as np

from .world import COLOUR_HUES, COLOURS, ParsedPrompt, SceneObject, parse_prompt, relation_holds

SAT_MIN = 0.38  # background is grey (saturation < 0.1); objects are rendered at saturation >= 0.85
VAL_MIN = 0.22
MIN_AREA_FRAC = 0.008  # regions under this share are noise (33 px at 64x64; the smallest object has 71)


@dataclass(frozen=True)
class Detection:
    shape: str  # one of SHAPES or "unknown"
    colour: str
    box: tuple[float, float, float, float]  # normalised (x0, y0, x1, y1), x1/y1 exclusive
    area: float  # share of the image
    features: tuple[float, float, float] = (0.0, 0.0, 0.0)  # hole share, solidity, fill

    @property
    def label(self) -> tuple[str, str]:
        return (self.shape, self.colour)


def _hsv(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = image.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    val = mx
    sat = np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(mx - mn, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    return hue * 60.0, sat, val


def _hue_labels(hue: np.ndarray) -> np.ndarray:
    centres = np.array([COLOUR_HUES[c] for c in COLOURS], dtype=np.float32)
    diff = np.abs(((hue[..., None] - centres) + 180.0) % 360.0 - 180.0)
    return diff.argmin(-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool mask, as arrays of (y, x) pixel coordinates."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        pix = []
        while queue:
            y, x = queue.popleft()
            pix.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        out.append(np.array(pix))
    return out


def _convex_area(points: np.ndarray) -> float:
    """Area of the convex hull of pixel squares (monotone chain over pixel corners)."""
    corners = np.concatenate([points + off for off in ((0, 0), (0, 1), (1, 0), (1, 1))])
    pts = sorted({(float(x), float(y)) for y, x in corners})
    if len(pts) < 3:
        return float(len(points))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    xs, ys = np.array([p[0] for p in hull]), np.array([p[1] for p in hull])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def _holes(region: np.ndarray) -> int:
    """Pixels of the bounding box not in `region` and not reachable from the box border."""
    padded = np.pad(~region, 1, constant_values=True)
    outside = np.zeros_like(padded)
    queue = deque([(0, 0)])
    outside[0, 0] = True
    h, w = padded.shape
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= ny < h and 0 <= nx < w and padded[ny, nx] and not outside[ny, nx]:
                outside[ny, nx] = True
                queue.append((ny, nx))
    return int((padded & ~outside).sum())


def classify(region: np.ndarray) -> tuple[str, tuple[float, float, float]]:
    """Shape of a bool region cropped to its bounding box, with (hole share, solidity, fill)."""
    area = float(region.sum())
    holes = _holes(region)
    hole_share = holes / (area + holes)
    ys, xs = np.nonzero(region)
    solidity = area / max(_convex_area(np.stack([ys, xs], 1)), 1.0)
    fill = area / float(region.size)
    feats = (hole_share, solidity, fill)
    if hole_share > 0.1:
        return "ring", feats
    if solidity < 0.76:
        return "star", feats
    if fill > 0.87:
        return "square", feats
    if fill > 0.64:
        return "circle", feats
    if fill > 0.36:
        return "triangle", feats
    return "unknown", feats


def detect(image: np.ndarray, min_area_frac: float = MIN_AREA_FRAC) -> list[Detection]:
    """Objects of an RGB uint8 image (H, W, 3), largest first."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    h, w = image.shape[:2]
    hue, sat, val = _hsv(image)
    coloured = (sat >= SAT_MIN) & (val >= VAL_MIN)
    labels = _hue_labels(hue)
    min_area = max(3, round(min_area_frac * h * w))
    found: list[Detection] = []
    for ci, colour in enumerate(COLOURS):
        for pix in _components(coloured & (labels == ci)):
            if len(pix) < min_area:
                continue
            y0, x0 = pix.min(0)
            y1, x1 = pix.max(0) + 1
            region = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            region[pix[:, 0] - y0, pix[:, 1] - x0] = True
            shape, feats = classify(region)
            found.append(Detection(shape, colour, (x0 / w, y0 / h, x1 / w, y1 / h), len(pix) / (h * w), feats))
    return sorted(found, key=lambda d: -d.area)


# ----------------------------------------------------------------------------------------- metrics
def box_mask(box: tuple[float, ...], grid: tuple[int, int]) -> np.ndarray:
    """(H, W) boolean mask of the grid cells a box (x0, y0, x1, y1 as fractions) touches, at least one cell.

    Why: attention maps live on a coarse grid (16x16 for a 64 px image); comparing a word's map inside and
    outside a detected object needs the object's box on that grid.
    """
    h, w = grid
    x0, y0, x1, y1 = (float(v) for v in box)
    m = np.zeros((h, w), dtype=bool)
    r0, c0 = int(y0 * h), int(x0 * w)
    m[r0:max(r0 + 1, int(np.ceil(y1 * h))), c0:max(c0 + 1, int(np.ceil(x1 * w)))] = True
    return m



def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match(expected: list[SceneObject], found: list[Detection], min_iou: float = 0.5) -> bool:
    """Whether `found` is exactly `expected`: same labels, one detection per object, boxes overlap."""
    if len(expected) != len(found):
        return False
    left = list(found)
    for obj in expected:
        best = max((d for d in left if d.label == obj.label), key=lambda d: iou(d.box, obj.box), default=None)
        if best is None or iou(best.box, obj.box) <= min_iou:
            return False
        left.remove(best)
    return True


def _requested(prompt: str | ParsedPrompt) -> ParsedPrompt:
    return parse_prompt(prompt) if isinstance(prompt, str) else prompt


def object_recall(prompt: str | ParsedPrompt, found: list[Detection]) -> float:
    """Share of the requested objects present with the right shape and colour (counts respected)."""
    want = _requested(prompt).objects
    pool = [d.label for d in found]
    hit = 0
    for label in want:
        if label in pool:
            pool.remove(label)
            hit += 1
    return hit / len(want) if want else 1.0


def all_present(prompt: str | ParsedPrompt, found: list[Detection]) -> bool:
    return object_recall(prompt, found) == 1.0


PAIR_MISSES = ("its shape in another colour", "its colour on the other requested shape",
               "its colour in a shape not asked for", "neither")
PRESENT = "present"


def pair_miss(wanted: tuple[str, str], other_shape: str, found: list[Detection]):
    """How a two-object prompt's requested (shape, colour), not found, is missing, and what stands in for it.

    Its colour on the other requested shape is a binding leak (the other noun's object took the colour); its
    colour in a shape nobody asked for is a stand-in whose shape is wrong, the kind a noun's map can mark
    while the object is missing. Returns (kind, stand-in detection or None); only the third kind has one.
    """
    shape, colour = wanted
    if any(d.shape == shape for d in found):
        return PAIR_MISSES[0], None
    third = [d for d in found if d.colour == colour and d.shape != other_shape]
    if third:
        return PAIR_MISSES[2], third[0]
    if any(d.colour == colour for d in found):
        return PAIR_MISSES[1], None
    return PAIR_MISSES[3], None


def pair_outcome(wanted: tuple[str, str], other_shape: str, found: list[Detection]) -> str:
    """`PRESENT` when the requested (shape, colour) is found, else its `pair_miss` kind."""
    if any(d.label == wanted for d in found):
        return PRESENT
    return pair_miss(wanted, other_shape, found)[0]


def attribute_binding(prompt: str | ParsedPrompt, found: list[Detection]) -> float | None:
    """Of the requested shapes that appear, the share drawn in the requested colour.

    None when no requested shape appears (binding is undefined, neglect is measured by recall).
    """
    want = _requested(prompt).objects
    seen_shapes = [d for d in found if d.shape != "unknown"]
    judged = right = 0
    for shape, colour in want:
        cands = [d for d in seen_shapes if d.shape == shape]
        if not cands:
            continue
        judged += 1
        hit = next((d for d in cands if d.colour == colour), None)
        if hit is not None:
            right += 1
            seen_shapes.remove(hit)
        else:
            seen_shapes.remove(cands[0])
    return right / judged if judged else None


def layout_iou(prompt: str | ParsedPrompt, boxes: list[tuple[float, ...]], found: list[Detection]) -> float:
    """Mean IoU between each requested object's box and its detection (0 when missing)."""
    want = _requested(prompt).objects
    if len(boxes) != len(want):
        raise ValueError(f"{len(boxes)} boxes for {len(want)} requested objects")
    pool = list(found)
    scores = []
    for label, box in zip(want, boxes):
        cands = [d for d in pool if d.label == label]
        if not cands:
            scores.append(0.0)
            continue
        best = max(cands, key=lambda d: iou(d.box, box))
        pool.remove(best)
        scores.append(iou(best.box, box))
    return float(np.mean(scores)) if scores else 1.0


def relations_hold(prompt: str | ParsedPrompt, found: list[Detection]) -> bool | None:
    """Whether the prompt's spatial relations hold between the detected objects (None if missing)."""
    req = _requested(prompt)
    if not req.relations:
        return None
    for rel in req.relations:
        a = next((d for d in found if d.label == req.objects[rel.subject]), None)
        b = next((d for d in found if d.label == req.objects[rel.reference]), None)
        if a is None or b is None:
            return None
        if not relation_holds(a.box, b.box, rel.relation):
            return False
    return True


def colour_name(rgb: tuple[float, float, float]) -> str:
    """Nearest world colour of an RGB triple in [0, 1] (for appearance statistics)."""
    h, _, _ = colorsys.rgb_to_hsv(*rgb)
    return COLOURS[int(_hue_labels(np.array([h * 360.0]))[0])]
