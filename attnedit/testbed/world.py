"""A small synthetic world of coloured shapes with captions.

Why: no model weights can be downloaded here, so attnedit trains its own tiny text-to-image models.
Images of this world can be read back exactly by :mod:`attnedit.testbed.detector`, which turns every
quality claim (objects neglected, colours leaking, layout followed) into a number.

Everything is deterministic: scene ``i`` of ``World(seed)`` is always the same image and caption.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
#: Hue (degrees) of each colour: six hues 60 degrees apart, so colours never get confused.
COLOUR_HUES: dict[str, float] = {
    "red": 0.0,
    "yellow": 60.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 240.0,
    "magenta": 300.0,
}
COLOURS: tuple[str, ...] = tuple(COLOUR_HUES)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
#: Every word a caption can contain; the tokenizer makes each of them a single token.
VOCABULARY: tuple[str, ...] = (
    "a",
    "and",
    "two",
    "three",
    "left",
    "right",
    "of",
    "above",
    "below",
    *COLOURS,
    *SHAPES,
    *PLURALS.values(),
)
#: Default mix of caption styles used for training and sampling.
DEFAULT_STYLE_PROBS: dict[str, float] = {
    "single": 0.40,
    "pair": 0.20,
    "relation": 0.15,
    "count": 0.12,
    "triple": 0.13,
}
CAPTION_STYLES: tuple[str, ...] = tuple(DEFAULT_STYLE_PROBS)


def colour_rgb(colour: str, saturation: float = 1.0, value: float = 0.9, hue_shift: float = 0.0) -> np.ndarray:
    """RGB in [0, 1] of a named colour (optionally jittered)."""
    h = ((COLOUR_HUES[colour] + hue_shift) % 360.0) / 360.0
    return np.array(colorsys.hsv_to_rgb(h, saturation, value), dtype=np.float32)


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene; ``box`` is normalised ``(x0, y0, x1, y1)`` in [0, 1]."""

    shape: str
    colour: str
    box: tuple[float, float, float, float]

    @property
    def label(self) -> tuple[str, str]:
        return (self.shape, self.colour)

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass(frozen=True)
class Relation:
    """``subject`` (object index) stands in ``relation`` to ``reference`` (object index)."""

    subject: int
    relation: str
    reference: int


@dataclass
class Scene:
    """A scene: objects, caption, and everything needed to render it again bit-exactly."""

    objects: list[SceneObject]
    caption: str
    style: str
    background: tuple[float, float, float]
    texture: str = "plain"
    texture_seed: int = 0
    relations: list[Relation] = field(default_factory=list)
    colour_jitter: list[tuple[float, float, float]] = field(default_factory=list)


@dataclass
class ParsedPrompt:
    """Objects (shape, colour) a caption asks for, in caption order, and the relations between them."""

    objects: list[tuple[str, str]]
    relations: list[Relation] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- captions


def _noun(count: int, colour: str, shape: str) -> str:
    return f"{COUNT_WORDS[count]} {colour} {PLURALS[shape] if count > 1 else shape}"


def caption_for(groups: list[tuple[int, str, str]], relation: str | None = None) -> str:
    """Caption for groups ``(count, colour, shape)``; with ``relation`` there must be two groups."""
    nouns = [_noun(c, col, s) for c, col, s in groups]
    if relation is not None:
        assert len(nouns) == 2
        return f"{nouns[0]} {relation} {nouns[1]}"
    if len(nouns) == 1:
        return nouns[0]
    if len(nouns) == 2:
        return f"{nouns[0]} and {nouns[1]}"
    return ", ".join(nouns[:-1]) + " and " + nouns[-1]


_NOUN_RE = re.compile(
    r"^(a|an|one|two|three)\s+(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?$"
)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Turn a caption back into the objects it requests (raises ``ValueError`` outside the grammar)."""
    text = " ".join(prompt.lower().replace(",", " , ").split())
    relations: list[Relation] = []
    rel_found = None
    for rel in RELATIONS:
        if f" {rel} " in f" {text} ":
            rel_found = rel
            break
    if rel_found is not None:
        parts = [p.strip() for p in f" {text} ".split(f" {rel_found} ")]
        if len(parts) != 2:
            raise ValueError(f"cannot parse relation in {prompt!r}")
    else:
        parts = [p.strip() for p in re.split(r"\s*,\s*|\s+and\s+", text) if p.strip()]
    objects: list[tuple[str, str]] = []
    starts: list[int] = []
    for part in parts:
        m = _NOUN_RE.match(part)
        if m is None:
            raise ValueError(f"cannot parse {part!r} in {prompt!r}")
        count = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}[m.group(1)]
        starts.append(len(objects))
        objects.extend([(m.group(3), m.group(2))] * count)
    if rel_found is not None:
        relations.append(Relation(starts[0], rel_found, starts[1]))
    return ParsedPrompt(objects=objects, relations=relations)


# --------------------------------------------------------------------------------------------- layout


def relation_holds(a: tuple[float, ...], b: tuple[float, ...], relation: str, margin: float = 0.0) -> bool:
    """Whether box ``a`` stands in ``relation`` to box ``b`` (centres, with an optional margin)."""
    ax, ay = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    bx, by = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    if relation == "left of":
        return ax + margin < bx
    if relation == "right of":
        return ax > bx + margin
    if relation == "above":
        return ay + margin < by
    if relation == "below":
        return ay > by + margin
    raise ValueError(relation)


def _boxes_clear(box: tuple[float, ...], others: list[tuple[float, ...]], gap: float) -> bool:
    for o in others:
        if not (box[2] + gap <= o[0] or o[2] + gap <= box[0] or box[3] + gap <= o[1] or o[3] + gap <= box[1]):
            return False
    return True


def _place(
    rng: np.random.Generator, n: int, size: int, relation: str | None
) -> list[tuple[float, float, float, float]] | None:
    """Boxes (pixels) for ``n`` objects that do not overlap; ``None`` when sampling failed."""
    lo, hi = {1: (18, 34), 2: (14, 26), 3: (13, 22)}[n]
    margin, gap = 2, 3
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        for _try in range(60):
            s = int(rng.integers(lo, hi + 1))
            x0 = int(rng.integers(margin, size - margin - s + 1))
            y0 = int(rng.integers(margin, size - margin - s + 1))
            box = (float(x0), float(y0), float(x0 + s), float(y0 + s))
            if not _boxes_clear(box, boxes, gap):
                continue
            if relation is not None and len(boxes) == 1:
                a = boxes[0]
                # The relation must be clear to a viewer: the boxes do not overlap along its axis.
                if relation == "left of" and not a[2] + gap <= box[0]:
                    continue
                if relation == "right of" and not box[2] + gap <= a[0]:
                    continue
                if relation == "above" and not a[3] + gap <= box[1]:
                    continue
                if relation == "below" and not box[3] + gap <= a[1]:
                    continue
            boxes.append(box)
            break
        else:
            return None
    return boxes


# --------------------------------------------------------------------------------------------- world


class World:
    """Deterministic, seeded source of scenes; ``scene(i)`` depends only on ``(seed, i)``."""

    def __init__(self, seed: int = 0, size: int = 64, style_probs: dict[str, float] | None = None,
                 texture_prob: float = 0.35) -> None:
        self.seed = int(seed)
        self.size = int(size)
        probs = dict(DEFAULT_STYLE_PROBS if style_probs is None else style_probs)
        unknown = set(probs) - set(CAPTION_STYLES)
        if unknown:
            raise ValueError(f"unknown caption styles {sorted(unknown)}; known: {CAPTION_STYLES}")
        total = float(sum(probs.values()))
        if total <= 0:
            raise ValueError("style probabilities must sum to a positive number")
        self.styles = list(probs)
        self.style_p = np.array([probs[s] / total for s in self.styles])
        self.texture_prob = float(texture_prob)

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, int(index), 7331])
        style = self.styles[int(rng.choice(len(self.styles), p=self.style_p))]
        return sample_scene(rng, style, self.size, self.texture_prob)

    def image(self, index: int) -> np.ndarray:
        return render(self.scene(index), self.size)

    def batch(self, start: int, n: int) -> tuple[np.ndarray, list[Scene]]:
        """Images ``uint8 [n, size, size, 3]`` and scenes for indices ``start .. start + n - 1``."""
        scenes = [self.scene(start + k) for k in range(n)]
        return np.stack([render(s, self.size) for s in scenes]), scenes


def sample_scene(rng: np.random.Generator, style: str, size: int = 64, texture_prob: float = 0.35) -> Scene:
    """Sample one scene of a given caption style from ``rng``."""
    relation: str | None = None
    if style == "single":
        groups = [(1, _pick(rng, COLOURS), _pick(rng, SHAPES))]
    elif style in ("pair", "relation", "triple"):
        k = 3 if style == "triple" else 2
        labels: list[tuple[str, str]] = []
        while len(labels) < k:
            lab = (_pick(rng, COLOURS), _pick(rng, SHAPES))
            if lab not in labels:
                labels.append(lab)
        groups = [(1, c, s) for c, s in labels]
        if style == "relation":
            relation = _pick(rng, RELATIONS)
    elif style == "count":
        n = 2 if rng.random() < 0.6 else 3
        groups = [(n, _pick(rng, COLOURS), _pick(rng, SHAPES))]
        if n == 2 and rng.random() < 0.4:  # "two red circles and a blue star"
            while True:
                other = (1, _pick(rng, COLOURS), _pick(rng, SHAPES))
                if other[1:] != groups[0][1:]:
                    break
            groups.append(other)
    else:
        raise ValueError(style)
    labels_flat = [(s, c) for n, c, s in groups for _ in range(n)]
    boxes = None
    while boxes is None:
        boxes = _place(rng, len(labels_flat), size, relation)
    objects = [
        SceneObject(shape, colour, tuple(v / size for v in box))  # type: ignore[arg-type]
        for (shape, colour), box in zip(labels_flat, boxes)
    ]
    # Background: grey (barely tinted) at any brightness, so colour always separates objects from it.
    grey = float(rng.uniform(0.08, 0.95))
    tint = rng.uniform(-0.03, 0.03, size=3)
    background = tuple(float(np.clip(grey + t, 0.0, 1.0)) for t in tint)
    texture = "plain"
    if rng.random() < texture_prob:
        texture = _pick(rng, ("noise", "gradient", "stripes"))
    jitter = [
        (float(rng.uniform(-6, 6)), float(rng.uniform(0.85, 1.0)), float(rng.uniform(0.8, 0.98)))
        for _ in objects
    ]
    caption = caption_for(groups, relation)
    relations = [Relation(0, relation, 1)] if relation is not None else []
    return Scene(objects, caption, style, background, texture, int(rng.integers(2**31)), relations, jitter)


def _pick(rng: np.random.Generator, items: tuple[str, ...] | list[str]) -> str:
    return items[int(rng.integers(len(items)))]


# --------------------------------------------------------------------------------------------- rendering

_SUPER = 4  # supersampling factor: soft, anti-aliased edges like a real image


def shape_mask(shape: str, box: tuple[float, float, float, float], size: int = 64) -> np.ndarray:
    """Anti-aliased coverage ``float32 [size, size]`` in [0, 1] of a shape drawn in a pixel box."""
    big = size * _SUPER
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (v * _SUPER for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    r = (x1 - x0) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            ang = -np.pi / 2 + k * np.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * np.cos(ang), cy + r * 0.1 + rad * np.sin(ang)))
        draw.polygon(pts, fill=255)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner - 1, cy + inner - 1), fill=0)
    else:
        raise ValueError(shape)
    small = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(scene: Scene, size: int) -> np.ndarray:
    bg = np.broadcast_to(np.array(scene.background, dtype=np.float32), (size, size, 3)).copy()
    if scene.texture == "plain":
        return bg
    rng = np.random.default_rng(scene.texture_seed)
    if scene.texture == "noise":
        coarse = rng.normal(0.0, 1.0, size=(8, 8)).astype(np.float32)
        field_ = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
        amp = 0.04
        delta = amp * field_ / (np.abs(field_).max() + 1e-6)
    elif scene.texture == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
        delta = 0.12 * (np.cos(ang) * xx + np.sin(ang) * yy)
    else:  # stripes
        period = rng.uniform(6, 14)
        ang = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        delta = 0.035 * np.sin(2 * np.pi * (np.cos(ang) * xx + np.sin(ang) * yy) / period)
    return np.clip(bg + delta[..., None], 0.0, 1.0)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Render a scene to ``uint8 [size, size, 3]``."""
    img = _background(scene, size)
    for k, obj in enumerate(scene.objects):
        box = tuple(v * size for v in obj.box)
        alpha = shape_mask(obj.shape, box, size)[..., None]  # type: ignore[arg-type]
        hs, sat, val = scene.colour_jitter[k] if k < len(scene.colour_jitter) else (0.0, 1.0, 0.9)
        rgb = colour_rgb(obj.colour, sat, val, hs)
        img = img * (1.0 - alpha) + rgb[None, None, :] * alpha
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
