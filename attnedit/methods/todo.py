"""ToDo: token downsampling of keys and values (Smith, Saxena, Saha, arXiv 2402.13573).

ToDo speeds up self-attention at high resolution without training: every query is kept, but the
image tokens that become keys and values are subsampled on their 2-D grid by a factor df per side
(nearest-exact by default; average pooling and bilinear as options), so attention costs df^2 less
and the output keeps the query length (no unmerge). Differences from the official code
(ethansmith2000/ImprovedTokenMerge): layers are chosen by grid level from the layer registry, so
"top level" means the highest-resolution level *with attention* (SDXL's latent/2, where the
original's channel-width rule selects nothing); grids come from the registry with ceil division,
so odd and non-square sizes work; K and V are resampled after projection (equal to resampling the
hidden states for the linear resamplers, and the only correct choice for DiTs, whose keys carry
RoPE and RMSNorm); text tokens of DiTs keep full K/V; the secondary ToMe "similarity" path is not
implemented (the demo turns it off); a late-step disable and a normalised-timestep window are
offered (A1111 port). The resampling itself is `attnedit.kernels.attention(..., downsample=...)`,
so the fused Triton kernel runs it on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import validate
from ..controls import PHASES, CallContext, Control, Example, register
from ..kernels.types import KVDownsample
from ..selectors import Select

if TYPE_CHECKING:
    from ..controller import Run

__all__ = ["ToDo"]

METHODS = ("nearest-exact", "nearest", "avg", "bilinear")
# Native denoiser latent side when neither the family (its adapter's method_defaults) nor the config says
_NATIVE_LATENT = 128


MAX_FACTOR = 16  # keys/values 256x fewer: past this a layer's grid is one token or less at any real size


def _check_factor(value: object, what: str) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FACTOR:
        raise ValueError(f"{what} must be an integer from 1 (no downsampling) to {MAX_FACTOR}, or 'auto', "
                         f"got {validate.short(value)}")
    return value


@register
class ToDo(Control):
    """Downsample the image keys/values of self-attention by `factor` per side.

    - `factor`: int >= 1, "auto" (max(1, round(grid side / native grid side)): 2 at 1024 px on
      SD1.5, 4 at 2048 px), or a sequence giving one factor per attention level counted from the
      top (e.g. `(2, 2)` also downsamples the second level). DiTs use the first entry.
    - `method`: "nearest-exact" (default, the paper's), "nearest", "avg" or "bilinear".
    - `t_range`: optional (low, high) window of normalised timesteps t in [0, 1] (1 = noise) in
      which ToDo acts; `steps=` (inherited) gives a window by step index or fraction instead.

    >>> pipe = attnedit.load("tiny-sd")
    >>> result = pipe("a red circle", controls=[attnedit.ToDo(factor=2)])
    """

    name = "todo"
    phases = PHASES

    @classmethod
    def example(cls) -> Example:
        return Example(options={"factor": 2})

    def __init__(
        self,
        factor: int | str | Sequence[int | str] = 2,
        method: str = "nearest-exact",
        *,
        t_range: tuple[float, float] | None = None,
        layers: Select | None = None,
        steps=None,
    ) -> None:
        super().__init__(layers=layers, steps=steps)
        if isinstance(factor, (list, tuple)):
            if not factor:
                raise ValueError("factor sequence must name at least one level")
            factors = [_check_factor(f, f"factor of attention level {i}") for i, f in enumerate(factor)]
        else:
            factors = [_check_factor(factor, "factor")]
        if method not in METHODS:
            raise ValueError(f"unknown ToDo method {method!r}; choose from {', '.join(METHODS)}")
        if t_range is not None:
            lo, hi = (float(x) for x in t_range)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"t_range must satisfy 0 <= low <= high <= 1, got {t_range!r}")
            t_range = (lo, hi)
        self.factor = factor if not isinstance(factor, list) else tuple(factor)
        self.method = method
        self.t_range = t_range
        self._factors = factors
        self._level_rank: dict[int, int] = {}
        self._native_latent: tuple[int, int] | None = None

    def default_layers(self) -> Select:
        return Select(kind=("self", "joint"))

    def setup(self, run: Run) -> None:
        picked = [run.registry[n] for n in self.selected_layers]
        if not picked:
            raise ValueError(
                "ToDo selected no self- or joint-attention layer on this model; "
                f"its layers are e.g. {', '.join(i.name for i in list(run.registry)[:3])}"
            )
        levels = sorted({i.level for i in picked})
        self._level_rank = {lvl: r for r, lvl in enumerate(levels)}
        side = run.family.method_default("todo", "native_latent")
        size = getattr(run.family.denoiser.config, "sample_size", None)
        if side is not None or size is None:
            side = side or _NATIVE_LATENT
            self._native_latent = (side, side)
        else:
            self._native_latent = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        self.state.applied = {}

    def factor_for(self, ctx: CallContext) -> int:
        """The factor this layer gets in the current forward (1 = untouched)."""
        rank = self._level_rank.get(ctx.layer.level, 0) if ctx.layer.block in ("down", "mid", "up") else 0
        if rank >= len(self._factors):
            return 1
        f = self._factors[rank]
        if f != "auto":
            return int(f)
        gh, gw = ctx.grid
        nh, nw = self._native_grid(ctx)
        return max(1, round(math.sqrt(gh * gw / (nh * nw))))

    def _native_grid(self, ctx: CallContext) -> tuple[int, int]:
        lh, lw = self._native_latent or (64, 64)
        if ctx.layer.block in ("down", "mid", "up"):
            s = 2**ctx.layer.level
            return (max(1, math.ceil(lh / s)), max(1, math.ceil(lw / s)))
        patch = ctx.run.registry.patch if ctx.run is not None else 1
        return (max(1, lh // patch), max(1, lw // patch))

    def downsample(self, ctx: CallContext) -> KVDownsample | None:
        if self.t_range is not None and not self.t_range[0] <= ctx.t <= self.t_range[1]:
            return None
        f = self.factor_for(ctx)
        if f <= 1:
            return None
        spec = KVDownsample(grid=ctx.grid, factor=(f, f), mode=self.method, start=ctx.image.start)
        applied = getattr(self.state, "applied", None)
        if applied is not None and ctx.layer.name not in applied:
            applied[ctx.layer.name] = {"grid": list(ctx.grid), "kv_grid": list(spec.out_grid), "factor": f}
        return spec

    def records(self) -> dict:
        applied = getattr(self.state, "applied", None)
        return {"layers": applied} if applied else {}
