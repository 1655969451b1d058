"""AttentionStore: cross-attention maps per prompt word (and self-attention on request).

It captures only the layers and steps it is asked for (all other layers keep the fused attention
path) and keeps running means, never histories: one (N, tokens) mean per layer, plus optionally
one mean over layers per grid and step (for a step slider), restricted to the prompt's tokens.
A 50-step SD1.5-architecture run at 512x512 capturing every 16x16 and 32x32 cross map holds a
few MB (tested below 50 MB).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .controls import NEEDS_PROMPT, CallContext, Control, Example, register
from .selectors import Select, Steps


@register
class AttentionStore(Control):
    """Record attention maps during a run.

    Example:
        >>> store = attnedit.AttentionStore(words=["cat"])
        >>> result = pipe("a cat on a mat", controls=[store], seed=0)
        >>> store.word_map("cat")          # (H, W) tensor, averaged over layers and steps

    Options: `words` (None = every word), `self_attention` (also keep self-attention maps of the
    selected self layers; N x N per layer, use with care at large grids), `per_step` (keep one
    map per step and grid for step sliders), `rows` ("cond" rows only by default, or "all").
    """

    name = "store"
    phases = ("denoise",)

    @classmethod
    def example(cls) -> Example:
        return Example(options={"words": ["circle", "square"]}, effect="records")

    def __init__(
        self,
        *,
        words: list[str] | None = None,
        self_attention: bool = False,
        per_step: bool = False,
        rows: str = "cond",
        layers: Select | None = None,
        steps: Steps | range | tuple | None = None,
    ) -> None:
        if rows not in ("cond", "all"):
            raise ValueError(f"rows must be 'cond' or 'all', got {rows!r}")
        self.words = list(words) if words is not None else None
        self.self_attention = bool(self_attention)
        self.per_step = bool(per_step)
        self.rows = rows
        super().__init__(layers=layers, steps=steps)

    def default_layers(self) -> Select:
        return Select() if self.self_attention else Select(kind=("cross", "joint"))

    def setup(self, run) -> None:
        if not run.tokens:
            raise ValueError(NEEDS_PROMPT.format(name="AttentionStore"))
        if self.words is not None:
            for t in run.tokens:
                for w in self.words:
                    t.find(w)  # raises ValueError naming the prompt's words
        # token positions to capture: every prompt token plus start/end tokens, union over prompts
        positions: set[int] = set()
        for t in run.tokens:
            positions.update(t.bos)
            positions.update(t.eos)
            for p in t.positions:
                positions.update(p)
        self._positions = torch.tensor(sorted(positions), dtype=torch.long)
        self._run = run

    def reset(self) -> None:
        super().reset()
        self.state.cross = {}  # layer -> [sum (B, N, C), count]
        self.state.selfmaps = {}  # layer -> [sum (B, N, N), count]
        self.state.steps = {}  # (step, grid) -> [sum (B, N, C), count]
        self.state.grids = {}  # layer -> grid
        self.state.rows = None

    # ------------------------------------------------------------------------------------ hooks
    def _wants(self, ctx: CallContext) -> str | None:
        if ctx.text is not None:
            return "cross"
        if self.self_attention and ctx.layer.kind == "self":
            return "self"
        return None

    def capture(self, ctx: CallContext) -> torch.Tensor | None:
        what = self._wants(ctx)
        if what == "cross":
            if not hasattr(self, "_positions") or self._positions.numel() == 0:
                return None
            return self._positions + ctx.text.start
        if what == "self":
            return torch.arange(ctx.image.start, ctx.image.stop)
        return None

    def observe(self, ctx: CallContext, probs: torch.Tensor) -> None:
        rows = ctx.layout.cond_rows() if self.rows == "cond" else list(range(ctx.layout.size))
        if not rows:
            return
        self.state.rows = rows
        p = probs[rows][:, ctx.image].detach().float()
        name = ctx.layer.name
        self.state.grids[name] = ctx.grid
        bucket = self.state.cross if self._wants(ctx) == "cross" else self.state.selfmaps
        _accumulate(bucket, name, p)
        if self.per_step and bucket is self.state.cross:
            _accumulate(self.state.steps, (ctx.step, ctx.grid), p)

    # ---------------------------------------------------------------------------------- reading
    def token_index(self, sample: int = 0):
        """The prompt's words and their token positions (`TokenIndex`) for image `sample` of the last run."""
        return self._run.tokens_of_sample(sample)

    def grids(self) -> list[tuple[int, int]]:
        return sorted(set(self.state.grids.values()), key=lambda g: -g[0] * g[1])

    def token_maps(self, sample: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(H, W, C) mean map over layers (resized to `grid`, default the largest) for the
        captured token positions (`self.positions`)."""
        if not self.state.cross:
            raise ValueError("no cross-attention maps were captured (did the run reach the selected layers?)")
        target = grid or self.grids()[0]
        acc, n = None, 0
        for name, (total, count) in self.state.cross.items():
            g = self.state.grids[name]
            m = (total[sample] / count).reshape(g[0], g[1], -1)
            if g != target:
                m = F.interpolate(m.permute(2, 0, 1)[None], size=target, mode="bilinear", align_corners=False)
                m = m[0].permute(1, 2, 0)
            acc = m if acc is None else acc + m
            n += 1
        return acc / n

    @property
    def positions(self) -> list[int]:
        return self._positions.tolist()

    def word_map(self, word: str | int, sample: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(H, W) map of `word` (its tokens averaged); ValueError names the prompt's words."""
        tokens = self.token_index(sample)
        pos = tokens.find(word)
        maps = self.token_maps(sample, grid)
        cols = [self.positions.index(p) for p in pos]
        return maps[..., cols].mean(-1)

    def word_maps(self, sample: int = 0, grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Every requested word (default all words but punctuation) -> (H, W) map."""
        tokens = self.token_index(sample)
        words = self.words or [w for w in tokens.words if any(ch.isalnum() for ch in w)]
        maps = self.token_maps(sample, grid)
        out = {}
        for w in words:
            pos = tokens.find(w)
            out[w] = maps[..., [self.positions.index(p) for p in pos]].mean(-1)
        return out

    def step_word_maps(self, step: int, sample: int = 0) -> dict[str, torch.Tensor]:
        """Per-step maps (needs `per_step=True`), largest grid available at that step."""
        if not self.per_step:
            raise ValueError("per-step maps need AttentionStore(per_step=True)")
        keys = [k for k in self.state.steps if k[0] == step]
        if not keys:
            steps = sorted({k[0] for k in self.state.steps})
            raise ValueError(f"no maps recorded at step {step}; recorded steps: {steps}")
        key = max(keys, key=lambda k: k[1][0] * k[1][1])
        total, count = self.state.steps[key]
        maps = (total[sample] / count).reshape(key[1][0], key[1][1], -1)
        tokens = self.token_index(sample)
        words = self.words or [w for w in tokens.words if any(ch.isalnum() for ch in w)]
        return {w: maps[..., [self.positions.index(p) for p in tokens.find(w)]].mean(-1) for w in words}

    def self_map(self, y: int, x: int, sample: int = 0, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Self-attention of the query pixel (y, x) of `grid` as an (H, W) map (mean over layers)."""
        if not self.state.selfmaps:
            raise ValueError("no self-attention maps: use AttentionStore(self_attention=True)")
        grids = sorted({self.state.grids[n] for n in self.state.selfmaps}, key=lambda g: -g[0] * g[1])
        target = grid or grids[0]  # the largest grid kept, as word_map and token_maps default to
        if not (0 <= y < target[0] and 0 <= x < target[1]):
            raise ValueError(f"pixel ({y}, {x}) is outside the {target[0]}x{target[1]} grid")
        names = [n for n in self.state.selfmaps if self.state.grids[n] == target]
        if not names:
            raise ValueError(f"no self-attention maps at grid {target}; available: {grids}")
        acc = sum(self.state.selfmaps[n][0][sample] / self.state.selfmaps[n][1] for n in names) / len(names)
        return acc[y * target[1] + x].reshape(target)

    def nbytes(self) -> int:
        total = 0
        for bucket in (self.state.cross, self.state.selfmaps, self.state.steps):
            for t, _ in bucket.values():
                total += t.numel() * t.element_size()
        return total

    def records(self) -> dict[str, Any]:
        if not getattr(self.state, "cross", None):
            return {}
        n = len(self.state.rows or [])
        return {"word_maps": [self.word_maps(i) for i in range(n)]} if hasattr(self, "_run") else {}


def _accumulate(bucket: dict, key, value: torch.Tensor) -> None:
    if key in bucket:
        bucket[key][0] += value
        bucket[key][1] += 1
    else:
        bucket[key] = [value.clone(), 1]
