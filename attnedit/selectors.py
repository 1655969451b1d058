"""Declarative layer and step selection.

`Select(kind="self", block="up", min_index=10)` picks layers by what they are, never by how many
attention calls happened before them; `Steps(start=4)` or `Steps(start=0.08)` picks denoising
steps by index (ints) or by fraction of the schedule (floats in [0, 1]).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .layers import LayerInfo

_KINDS = ("self", "cross", "joint")
_BLOCKS = ("down", "mid", "up", "double", "single", "dit")


def _as_set(value, valid: tuple[str, ...] | None, what: str) -> frozenset | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, (str, int)) else tuple(value)
    if valid is not None:
        bad = [v for v in items if v not in valid]
        if bad:
            raise ValueError(f"unknown {what} {bad[0]!r}; choose from {', '.join(valid)}")
    return frozenset(items)


@dataclass(frozen=True)
class Select:
    """A layer selector. Every given criterion must hold.

    - `kind`: "self" | "cross" | "joint" (or several).
    - `block`: "down" | "mid" | "up" (UNet), "double" | "single" (FLUX), "dit".
    - `level`: UNet grid level(s), 0 = latent resolution, 1 = latent/2, ...; `top=True` picks the
      highest-resolution level that has attention (level 0 on SD1.x, level 1 on SDXL).
    - `min_index` / `max_index`: execution-order transformer-block index range (inclusive); the
      translation of the published "start layer" settings.
    - `name`: glob pattern(s) or a compiled regex on the module name.
    """

    kind: object = None
    block: object = None
    level: object = None
    top: bool = False
    min_index: int | None = None
    max_index: int | None = None
    name: object = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _as_set(self.kind, _KINDS, "layer kind"))
        object.__setattr__(self, "block", _as_set(self.block, _BLOCKS, "block"))
        if self.level is not None:
            levels = (self.level,) if isinstance(self.level, int) else tuple(self.level)
            if any((not isinstance(v, int)) or v < 0 for v in levels):
                raise ValueError(f"level must be non-negative ints, got {self.level!r}")
            object.__setattr__(self, "level", frozenset(levels))
        if isinstance(self.name, str):
            object.__setattr__(self, "name", (self.name,))

    def __call__(self, info: LayerInfo, top_level: int | None = None) -> bool:
        if self.kind is not None and info.kind not in self.kind:
            return False
        if self.block is not None and info.block not in self.block:
            return False
        if self.level is not None and info.level not in self.level:
            return False
        if self.top and top_level is not None and info.level != top_level:
            return False
        if self.min_index is not None and info.index < self.min_index:
            return False
        if self.max_index is not None and info.index > self.max_index:
            return False
        if self.name is not None:
            if isinstance(self.name, re.Pattern):
                if not self.name.search(info.name):
                    return False
            elif not any(fnmatch.fnmatchcase(info.name, pat) for pat in self.name):
                return False
        return True

    def __repr__(self) -> str:
        parts = []
        for key in ("kind", "block", "level", "top", "min_index", "max_index", "name"):
            value = getattr(self, key)
            if value is None or value is False:
                continue
            if isinstance(value, frozenset):
                value = sorted(value)
                value = value[0] if len(value) == 1 else tuple(value)
            parts.append(f"{key}={value!r}")
        return f"Select({', '.join(parts)})"

    def pick(self, layers: Iterable[LayerInfo]) -> list[LayerInfo]:
        """The selected layers among `layers` (resolving `top` on that set)."""
        layers = list(layers)
        top = min((i.level for i in layers), default=None) if self.top else None
        return [i for i in layers if self(i, top)]


ALL = Select()


@dataclass(frozen=True)
class Steps:
    """A window of denoising steps, [start, stop).

    ints are step indices; floats in [0, 1] are fractions of the schedule (so a default written
    for 50 steps scales to any step count); None means open. `Steps(0, 0)` selects nothing on
    purpose (the control then warns that it does not act); a start after the stop is refused.
    """

    start: int | float | None = 0
    stop: int | float | None = None

    def __post_init__(self) -> None:
        for v in (self.start, self.stop):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"step bounds must be ints, fractions or None, got {v!r}")
            if isinstance(v, float) and not 0.0 <= v <= 1.0:
                raise ValueError(f"fractional step bounds must be within [0, 1], got {v}")
            if isinstance(v, int) and v < 0:
                raise ValueError(f"step bounds must be >= 0, got {v}")
        lo, hi = self.start, self.stop
        if lo is not None and hi is not None and type(lo) is type(hi) and lo > hi:
            raise ValueError(f"Steps({lo!r}, {hi!r}): the start is after the stop, so it selects no step; "
                             f"did you mean Steps({hi!r}, {lo!r})?")

    @property
    def empty(self) -> bool:
        """Empty by construction (`Steps(0, 0)`, `Steps(0.5, 0.5)`), whatever the number of steps."""
        return self.start is not None and self.start == self.stop

    @staticmethod
    def _resolve(v: int | float | None, total: int | None, default: int) -> int:
        if v is None:
            return default
        if isinstance(v, float):
            if total is None:
                raise ValueError("a fractional step window needs the number of steps of the run")
            return round(v * total)
        return v

    def bounds(self, total: int | None) -> tuple[int, int]:
        big = 1 << 30
        return self._resolve(self.start, total, 0), self._resolve(self.stop, total, big)

    def __contains__(self, item: tuple[int, int | None]) -> bool:
        step, total = item
        lo, hi = self.bounds(total)
        return lo <= step < hi

    def active(self, step: int, total: int | None) -> bool:
        return (step, total) in self


ALL_STEPS = Steps()


def as_steps(value) -> Steps:
    """Accept a `Steps`, a `range`, a (start, stop) tuple, or a single start."""
    if isinstance(value, Steps):
        return value
    if value is None:
        return ALL_STEPS
    if isinstance(value, range):
        if value.step != 1:
            raise ValueError("step ranges must have step 1")
        return Steps(value.start, value.stop)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Steps(value[0], value[1])
    if isinstance(value, (int, float)):
        return Steps(value, None)
    raise ValueError(f"cannot read a step window from {value!r}; use Steps(start, stop) or (start, stop)")
