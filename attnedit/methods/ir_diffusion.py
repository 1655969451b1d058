"""IR-Diffusion: Isolation and Reposition Attention (He et al., arXiv 2411.19261).

The paper keeps several subjects consistent with their reference images when they appear together
in one scene. References are generated in the same batch as the scene; the scene's self-attention
also reads the references' keys/values (ConsiStory-style). Isolation Attention forbids scene pixels
of subject i from attending to scene pixels of subject j, so subjects do not merge; Reposition
Attention crops each reference subject's features to its box, resizes and pastes them at the
subject's box in the scene before computing keys/values, because tokens prefer nearby tokens.
A mutual cross-attention term blends each reference prompt's cross-attention output into the
subject's region (weight 0.9).

Where attnedit differs from the official code (hehuiguo/DreamStory, 91e1a4b):
- Masks are region labels fed to the attention kernels (`RegionMask`), never dense HW x (N+1)HW
  tensors or outer products on every call; repositioning is a cached gather per grid.
- Subject masks come from user boxes or masks (primary), or from attnedit's own cross-attention
  maps of a rehearsal generation (`attention_masks`, Otsu threshold), since Grounding DINO + SAM
  cannot run offline. No retry loop.
- Overlap rule: a pixel claimed by several subjects belongs to the smallest one (the official
  post-processing removes overlaps the same way), so isolation never blocks a pixel from both.
- Layers by module name, steps by timestep (official: call counting with a hard-coded 140).
  Defaults from the official driver: all steps; reposition/mutual on transformer index >= 36 for
  SDXL (the whole decoder on smaller SDXL-type UNets), the whole decoder for SD1.x (ours),
  isolation on every self-attention layer, mutual cross on every cross-attention layer. Mask
  dropout 0.5 (seeded per step, shared by all layers of a step), cross weight 0.9, reference
  logit bias 0.
- `RepositionAttention` includes isolation (`isolate=True`); `IsolationAttention` is isolation
  alone and also works on plain batches and on DiTs (joint attention: text tokens stay global).
  Reposition needs per-layer normalised hidden states of a spatial grid: UNets and PixArt.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from ..controls import NEEDS_PROMPT, CallContext, Control, Example, make_control, register
from ..kernels import attention
from ..kernels.types import RegionMask
from ..layout import BatchLayout
from ..masks import (
    binarize,
    box_cells,
    check_boxes,
    check_masks,
    map_layers,
    mask_bbox,
    mask_cells,
    subject_labels,
    to_mask,
)
from ..selectors import Select, Steps

NEEDS_ROLES = ("it needs reference rows (role 'source') and scene rows (role 'target') in one call: run it through "
               "attnedit.methods.ir_diffusion.ir_diffusion(...) or a batch job with references")


def _target_rows(layout: BatchLayout) -> list[int]:
    """Rows the subject masks describe: role "target", or every non-source row of a plain batch."""
    targets = [i for i, r in enumerate(layout.rows) if r.role == "target"]
    if targets:
        return targets
    return [i for i, r in enumerate(layout.rows) if r.role != "source"]


def _seq_len(ctx: CallContext) -> int:
    return max(ctx.image.stop, ctx.text.stop if ctx.text is not None else 0)


def _device(ctx: CallContext) -> torch.device:
    return ctx.hidden_states.device if ctx.hidden_states is not None else torch.device("cpu")


class _Subjects:
    """Subject locations (boxes or pixel masks) and their labels on any layer grid (cached)."""

    def __init__(self, boxes, masks, threshold, what: str, names: tuple[str, str] | None = None) -> None:
        names = names or (f"{what}_boxes", f"{what}_masks")
        if (boxes is None) == (masks is None):
            raise ValueError(f"give exactly one of {names[0]} / {names[1]} (one per subject)")
        self.boxes = check_boxes(boxes, f"{what} box") if boxes is not None else None
        self.masks = [to_mask(m) for m in masks] if masks is not None else None
        if not (self.boxes or self.masks):
            raise ValueError(f"{what}: give at least one subject")
        self.threshold = threshold
        self._labels: dict = {}
        self._cells: dict = {}

    def __len__(self) -> int:
        return len(self.boxes if self.boxes is not None else self.masks)

    def check_size(self, size: tuple[int, int] | None, what: str) -> None:
        if self.masks is not None and size is not None and None not in size:
            self.masks = check_masks(self.masks, size, what)

    def labels(self, grid, device) -> torch.Tensor:
        """(h*w,) 0 = background, i + 1 = subject i (disjoint: smaller subjects win overlaps)."""
        key = (tuple(grid), str(device))
        if key not in self._labels:
            self._labels[key] = subject_labels(grid, self.boxes, self.masks, self.threshold, device)
        return self._labels[key]

    def cells(self, i: int, grid) -> torch.Tensor:
        """(h, w) bool cells of subject i alone (before overlap resolution)."""
        key = (i, tuple(grid))
        if key not in self._cells:
            if self.boxes is not None:
                self._cells[key] = box_cells(self.boxes[i], grid)
            else:
                self._cells[key] = mask_cells(self.masks[i], grid, self.threshold)
        return self._cells[key]


def isolation_table(n_subjects: int, extra: int = 1, device=None) -> torch.Tensor:
    """(L, L) allowed table for labels 0 = background, 1..S = subjects, then `extra` global labels."""
    n = n_subjects + 1 + extra
    a = torch.arange(n, device=device)
    subj = (a >= 1) & (a <= n_subjects)
    return ~(subj[:, None] & subj[None, :] & (a[:, None] != a[None, :]))


@register
class IsolationAttention(Control):
    """Target pixels of subject i cannot attend to target pixels of subject j (i != j).

    Example:
        >>> iso = IsolationAttention(boxes=[(0.0, 0.2, 0.5, 0.9), (0.5, 0.2, 1.0, 0.9)])
        >>> pipe("a cat and a dog", controls=[iso], seed=0)

    Subjects (one of):
    - `boxes`: normalised (x0, y0, x1, y1);
    - `masks`: pixel masks at the image size (binarised at `threshold`, or "otsu");
    - `words`: the attention route: each word's cross-attention map of the *previous* step (the
      latent/4 level on UNets, `attnedit.masks.map_layers`), min-max normalised and cut at Otsu's
      threshold, per image; isolation starts at the second step. Each target prompt must contain
      every word.
    Subjects overlapping: the smaller one wins. Rows: the layout's "target" rows, or every
    non-source row of a batch without roles.
    """

    name = "isolation"
    phases = ("denoise",)

    @classmethod
    def example(cls) -> Example:
        return Example(options={"boxes": [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]})
    #: each image is isolated on its own: batching never changes it
    cross_sample = False

    def __init__(
        self,
        *,
        boxes: Sequence[Sequence[float]] | None = None,
        masks: Sequence[Any] | None = None,
        words: Sequence[str] | None = None,
        threshold: float | str = 0.5,
        layers: Select | None = None,
        steps: Steps | range | tuple | None = None,
    ) -> None:
        if sum(x is not None for x in (boxes, masks, words)) != 1:
            raise ValueError("give exactly one of boxes / masks / words (one per subject)")
        self.boxes = boxes
        self.masks = masks
        self.words = [words] if isinstance(words, str) else (list(words) if words is not None else None)
        self.threshold = threshold
        if self.words is not None and not self.words:
            raise ValueError("words: give at least one subject word")
        self._subjects = _Subjects(boxes, masks, threshold, "subject", names=("boxes", "masks")) \
            if words is None else None
        super().__init__(layers=layers, steps=steps)

    def default_layers(self) -> Select:
        return Select(kind=("self", "joint"))

    @property
    def n_subjects(self) -> int:
        return len(self.words) if self.words is not None else len(self._subjects)

    def setup(self, run) -> None:
        self._iso_layers = frozenset(n for n in self.selected_layers if run.registry[n].kind in ("self", "joint"))
        if not self._iso_layers:
            raise ValueError("IsolationAttention selected no self-attention layer; use layers=Select(kind='self')")
        self.use_layers(run, self._iso_layers)
        self._map_names: frozenset[str] = frozenset()
        if self._subjects is not None:
            self._subjects.check_size((run.height, run.width), "IsolationAttention mask")
            return
        if not run.tokens:
            raise ValueError(NEEDS_PROMPT.format(name="IsolationAttention(words=...)"))
        layout = run.layout
        n = layout.n_samples if layout is not None else len(run.tokens) * max(run.num_images_per_prompt, 1)
        samples = sorted({layout.rows[r].sample for r in _target_rows(layout)}) if layout is not None else range(n)
        positions = {s: [run.tokens_of_sample(s).find(w) for w in self.words] for s in samples}  # ValueError
        union = sorted({p for per in positions.values() for pos in per for p in pos})
        self._capture = torch.tensor(union, dtype=torch.long)
        self._columns = {s: [[union.index(p) for p in pos] for pos in per] for s, per in positions.items()}
        self._map_names = frozenset(i.name for i in map_layers(run.family, run.registry))
        self.use_layers(run, self._iso_layers | self._map_names)

    def reset(self) -> None:
        super().reset()
        self.state.regions = {}
        self.state.maps = {}  # grid -> [sum {sample: (S, N)}, count] of the current step
        self.state.prev_maps = {}

    def begin_step(self, run, step: int) -> None:
        if self.words is not None:
            self.state.prev_maps = self.state.maps or self.state.prev_maps
            self.state.maps = {}
            self.state.regions = {}

    def capture(self, ctx: CallContext) -> torch.Tensor | None:
        if self.words is None or ctx.layer.name not in getattr(self, "_map_names", ()) or ctx.text is None:
            return None
        return self._capture + ctx.text.start

    def observe(self, ctx: CallContext, probs: torch.Tensor) -> None:
        layout = ctx.layout
        cond = set(layout.cond_rows()) or set(range(layout.size))
        p = probs[:, ctx.image].detach().float()
        entry = self.state.maps.setdefault(tuple(ctx.grid), [{}, 0])
        for r, row in enumerate(layout.rows):
            if r not in cond or row.sample not in self._columns:
                continue
            m = torch.stack([p[r][:, cols].sum(-1) for cols in self._columns[row.sample]])  # (S, N)
            entry[0][row.sample] = entry[0][row.sample] + m if row.sample in entry[0] else m
        entry[1] += 1

    def regions(self, ctx: CallContext) -> RegionMask | None:
        iso_layers = getattr(self, "_iso_layers", None)  # None: not bound to a run (hand-built contexts)
        if iso_layers is not None and ctx.layer.name not in iso_layers:
            return None
        key = (tuple(ctx.grid), ctx.text is not None)
        cache = self.state.__dict__.setdefault("regions", {})
        cached = cache.get(key)
        if cached is None or cached[0] is not ctx.layout:
            cached = (ctx.layout, self._build(ctx))
            cache[key] = cached
        return cached[1]

    def _labels(self, ctx: CallContext, sample: int, dev) -> torch.Tensor | None:
        if self._subjects is not None:
            return self._subjects.labels(ctx.grid, dev)
        maps = self.state.prev_maps
        if not maps:
            return None
        grid = max(maps, key=lambda g: g[0] * g[1])
        sums, count = maps[grid]
        if sample not in sums:
            return None
        per = []
        for m in sums[sample] / count:
            m = m.reshape(grid)
            lo, hi = m.min(), m.max()
            per.append((m - lo) / (hi - lo) if float(hi - lo) > 1e-12 else torch.zeros_like(m))
        return subject_labels(ctx.grid, masks=per, threshold="otsu", device=dev)

    def _build(self, ctx: CallContext) -> RegionMask | None:
        dev = _device(ctx)
        s = self.n_subjects
        n = _seq_len(ctx)
        q = torch.zeros(ctx.layout.size, n, dtype=torch.long, device=dev)
        if ctx.text is not None:
            q[:, ctx.text] = s + 1  # text tokens: global
        any_rows = False
        for r in _target_rows(ctx.layout):
            lab = self._labels(ctx, ctx.layout.rows[r].sample, dev)
            if lab is not None:
                q[r, ctx.image] = lab
                any_rows = True
        if not any_rows:
            return None
        return RegionMask(q, q, isolation_table(s, device=dev))

    def records(self) -> dict[str, Any]:
        return {"subjects": self.n_subjects, "layers": len(getattr(self, "_iso_layers", ()))}


def default_reposition_layers(family, registry) -> Select:
    """The family's published reposition layers (its adapter's `method_defaults["reposition"]`; SDXL's
    official index >= 36 applies to the full 70-block UNet only), else the second half of the blocks."""
    full = family.method_default("reposition", "full_unet")
    if full is not None and max(i.index for i in registry) >= full[0]:
        return full[1]
    chosen = family.method_default("reposition", "layers")
    if chosen is not None:
        return chosen
    n = 1 + max(i.index for i in registry)
    return Select(kind="self", min_index=n // 2)


@register
class RepositionAttention(Control):
    """IR-Diffusion: scene subjects read their reference's repositioned features, isolated.

    Batch: references are the layout's "source" samples (subject i = i-th source sample), the
    scene is the "target" sample(s); `ir_diffusion(...)` builds all of it. Per subject: where it is
    in the scene (`target_boxes` / `target_masks`) and in its reference (`reference_boxes` /
    `reference_masks`). Switches: `reposition` (False = raw reference K/V, DreamStory mode),
    `isolate`, `cross_weight` (mutual cross-attention, 0 = off), `mask_dropout` (seeded by `seed`
    and the step). Layers: `layers` (mutual + reposition), `isolation_layers`, `cross_layers`.
    """

    name = "reposition"
    phases = ("denoise",)
    requires = ("spatial_self_attention",)
    unsupported = ("it repositions spatial self-attention features, and its joint attention has none "
                   "(IsolationAttention runs there)")

    @classmethod
    def example(cls) -> Example:
        return Example(references={"prompts": ["a red circle", "a blue square"], "subjects": ["circle", "square"],
                                    "boxes": [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]]},
                       stock=NEEDS_ROLES)
    #: the scene reads the references of its call
    cross_sample = True

    def __init__(
        self,
        *,
        target_boxes: Sequence[Sequence[float]] | None = None,
        target_masks: Sequence[Any] | None = None,
        reference_boxes: Sequence[Sequence[float]] | None = None,
        reference_masks: Sequence[Any] | None = None,
        reposition: bool = True,
        isolate: bool = True,
        cross_weight: float = 0.9,
        mask_dropout: float = 0.5,
        threshold: float | str = 0.5,
        seed: int = 0,
        isolation_layers: Select | None = None,
        cross_layers: Select | None = None,
        layers: Select | None = None,
        steps: Steps | range | tuple | None = None,
    ) -> None:
        if not 0.0 <= float(cross_weight) <= 1.0:
            raise ValueError(f"cross_weight must be within [0, 1], got {cross_weight}")
        if not 0.0 <= float(mask_dropout) < 1.0:
            raise ValueError(f"mask_dropout must be within [0, 1), got {mask_dropout}")
        self.target_boxes, self.target_masks = target_boxes, target_masks
        self.reference_boxes, self.reference_masks = reference_boxes, reference_masks
        self.reposition, self.isolate = bool(reposition), bool(isolate)
        self.cross_weight, self.mask_dropout = float(cross_weight), float(mask_dropout)
        self.threshold, self.seed = threshold, int(seed)
        self._targets = _Subjects(target_boxes, target_masks, threshold, "target")
        self._refs = _Subjects(reference_boxes, reference_masks, threshold, "reference")
        if len(self._targets) != len(self._refs):
            raise ValueError(f"{len(self._targets)} target subjects but {len(self._refs)} reference subjects; "
                             "give one target and one reference location per subject")
        self._user = (layers, isolation_layers, cross_layers)
        super().__init__(layers=layers or Select(kind="self"), steps=steps)

    def bind(self, run) -> None:
        layers, iso, cross = self._user
        reg = run.registry
        mutual = layers or default_reposition_layers(run.family, reg)
        self._mutual = frozenset(i.name for i in mutual.pick(reg) if i.kind == "self")
        self._iso = frozenset(i.name for i in (iso or Select(kind="self")).pick(reg) if i.kind == "self") \
            if self.isolate else frozenset()
        self._cross = frozenset(i.name for i in (cross or Select(kind="cross")).pick(reg) if i.kind == "cross") \
            if self.cross_weight > 0 else frozenset()
        if not self._mutual:
            raise ValueError("RepositionAttention selected no self-attention layer for reposition; "
                             "pass layers=Select(kind='self', ...)")
        self.use_layers(run, self._mutual | self._iso | self._cross)
        self.setup(run)

    def setup(self, run) -> None:
        layout = run.layout
        if layout is None or not any(r.role == "source" for r in layout.rows):
            raise ValueError(f"RepositionAttention: {NEEDS_ROLES}")
        halves = sorted({r.cfg for r in layout.rows})
        self._ref_rows = {h: [i for i in sorted(layout.indices(cfg=h, role="source"),
                                                key=lambda j: layout.rows[j].sample)] for h in halves}
        n_refs = len(self._ref_rows[halves[0]])
        if n_refs != len(self._targets):
            raise ValueError(f"the batch has {n_refs} reference image(s) but {len(self._targets)} subject(s) were "
                             "given; give one reference prompt per subject")
        if not _target_rows(layout) or not layout.indices(role="target"):
            raise ValueError("the batch layout has no scene row (role 'target')")
        size = (run.height, run.width)
        self._targets.check_size(size, "target mask")
        self._refs.check_size(size, "reference mask")
        if self.isolate:
            others = [c for c in run.controls if isinstance(c, IsolationAttention)]
            if others:
                raise ValueError("RepositionAttention already isolates subjects (isolate=True); "
                                 "remove IsolationAttention or pass isolate=False")

    def reset(self) -> None:
        super().reset()
        self.state.step = 0
        self.state.dropped = {}
        self.state.regions = {}
        self.state.moves = {}

    def begin_step(self, run, step: int) -> None:
        self.state.step = step
        self.state.dropped = {}
        self.state.regions = {}

    # ---------------------------------------------------------------------------- geometry
    def _move(self, i: int, grid) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference subject i moved into its scene box: (source cell index (N,), foreground (N,))."""
        key = (i, tuple(grid))
        if key in self.state.moves:
            return self.state.moves[key]
        h, w = grid
        r_cells = self._refs.cells(i, grid)
        n = h * w
        src = torch.zeros(n, dtype=torch.long)
        fg = torch.zeros(n, dtype=torch.bool)
        if not self.reposition:
            src = torch.arange(n)
            fg = r_cells.flatten().clone()
        else:
            rb = mask_bbox(r_cells)
            tb = mask_bbox(self._targets.cells(i, grid))
            if rb is not None and tb is not None:
                ry0, rx0, ry1, rx1 = rb
                ty0, tx0, ty1, tx1 = tb
                th, tw, sh, sw = ty1 - ty0, tx1 - tx0, ry1 - ry0, rx1 - rx0
                ys = ry0 + ((torch.arange(th) + 0.5) * sh / th).long().clamp(max=sh - 1)
                xs = rx0 + ((torch.arange(tw) + 0.5) * sw / tw).long().clamp(max=sw - 1)
                src_box = ys[:, None] * w + xs[None, :]  # (th, tw) reference cell of each scene cell
                dst = ((torch.arange(ty0, ty1)[:, None] * w) + torch.arange(tx0, tx1)[None, :]).flatten()
                src[dst] = src_box.flatten()
                fg[dst] = r_cells.flatten()[src_box.flatten()]
        self.state.moves[key] = (src, fg)
        return src, fg

    def _dropped(self, grid, device) -> torch.Tensor:
        """(S, N) bool: each subject's scene cells after this step's mask dropout (seeded)."""
        key = (tuple(grid), str(device))
        if key in self.state.dropped:
            return self.state.dropped[key]
        lab = self._targets.labels(grid, device)
        s = len(self._targets)
        subj = torch.stack([lab == i + 1 for i in range(s)])
        if self.mask_dropout > 0:
            seed = self.seed * 1_000_003 + self.state.step * 7919 + grid[0] * 131 + grid[1]
            gen = torch.Generator().manual_seed(seed)
            keep = (torch.rand(subj.shape, generator=gen) >= self.mask_dropout).to(device)
            kept = subj & keep
            empty = ~kept.any(-1)
            subj = torch.where(empty[:, None], subj, kept)  # a fully dropped mask: use the undropped one
        self.state.dropped[key] = subj
        return subj

    # ------------------------------------------------------------------------------- hooks
    def qkv(self, ctx: CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        name = ctx.layer.name
        if name in self._cross:
            ctx.extra["ir_qkv"] = (q, k, v)
            return q, k, v
        if name not in self._mutual:
            return q, k, v
        layout, s, n = ctx.layout, len(self._targets), k.shape[1]
        targets = set(layout.indices(role="target"))
        attn = ctx.attn
        kp = k.new_zeros(k.shape[0], s * n, *k.shape[2:])
        vp = v.new_zeros(v.shape[0], s * n, *v.shape[2:])
        for half, refs in self._ref_rows.items():
            rows = [r for r in layout.indices(cfg=half) if r in targets]
            if not rows:
                continue
            for i, ref in enumerate(refs):
                if self.reposition:
                    src, fg = self._move(i, ctx.grid)
                    src, fg = src.to(k.device), fg.to(k.device)
                    hs = ctx.hidden_states[ref].index_select(0, src) * fg[:, None].to(ctx.hidden_states.dtype)
                    ki = attn.to_k(hs).view(n, *k.shape[2:])
                    vi = attn.to_v(hs).view(n, *v.shape[2:])
                    if getattr(attn, "norm_k", None) is not None:
                        ki = attn.norm_k(ki)
                else:
                    ki, vi = k[ref], v[ref]
                kp[rows, i * n : (i + 1) * n] = ki.to(k.dtype)
                vp[rows, i * n : (i + 1) * n] = vi.to(v.dtype)
        return q, torch.cat([kp, k], dim=1), torch.cat([vp, v], dim=1)

    def regions(self, ctx: CallContext) -> RegionMask | None:
        name = ctx.layer.name
        if name not in self._mutual and name not in self._iso:
            return None
        dev = _device(ctx)
        kind = "mutual" if name in self._mutual else "isolation"
        key = (kind, tuple(ctx.grid), str(dev), id(ctx.layout))
        cached = self.state.regions.get(key)  # built once per (kind, grid) and step: dropout changes per step
        if cached is None or cached[0] is not ctx.layout:
            cached = (ctx.layout, self._build_regions(ctx, kind == "mutual", dev))
            self.state.regions[key] = cached
        return cached[1]

    def _build_regions(self, ctx: CallContext, mutual: bool, dev) -> RegionMask:
        layout, s = ctx.layout, len(self._targets)
        lab = self._targets.labels(ctx.grid, dev)
        targets = layout.indices(role="target")
        n = ctx.grid[0] * ctx.grid[1]
        if not mutual:  # isolation only
            qlab = torch.zeros(layout.size, n, dtype=torch.long, device=dev)
            qlab[targets] = lab
            return RegionMask(qlab, qlab, isolation_table(s, extra=0, device=dev))
        # labels: 0 bg, i subject reading reference i, S+i subject i not reading (dropped),
        # 2S+i reference i foreground, 3S+1 blocked
        reading = self._dropped(ctx.grid, dev)  # (S, N)
        qrow = lab.clone()
        subj = lab >= 1
        not_reading = subj & ~reading.any(0)
        qrow[not_reading] = lab[not_reading] + s
        qlab = torch.zeros(layout.size, n, dtype=torch.long, device=dev)
        qlab[targets] = qrow
        blocked = 3 * s + 1
        krow = torch.full((n * (s + 1),), blocked, dtype=torch.long, device=dev)
        for i in range(s):
            _, fg = self._move(i, ctx.grid)
            krow[i * n : (i + 1) * n] = torch.where(fg.to(dev), 2 * s + 1 + i, blocked)
        krow[s * n :] = lab
        klab = torch.full((layout.size, n * (s + 1)), blocked, dtype=torch.long, device=dev)
        klab[:, s * n :] = 0
        klab[targets] = krow
        size = 3 * s + 2
        table = torch.zeros(size, size, dtype=torch.bool, device=dev)
        a = torch.arange(2 * s + 1, device=dev)
        qsub = torch.where(a > s, a - s, a)
        b = torch.arange(s + 1, device=dev)
        iso = (qsub[:, None] >= 1) & (b[None, :] >= 1) & (qsub[:, None] != b[None, :]) if self.isolate else None
        table[: 2 * s + 1, : s + 1] = True if iso is None else ~iso
        for i in range(1, s + 1):
            table[i, 2 * s + i] = True
        return RegionMask(qlab, klab, table)

    def output(self, ctx: CallContext, out: torch.Tensor) -> torch.Tensor:
        if ctx.layer.name not in self._cross or "ir_qkv" not in ctx.extra:
            return out
        q, k, v = ctx.extra.pop("ir_qkv")
        layout = ctx.layout
        lab = self._targets.labels(ctx.grid, out.device)
        inside = lab >= 1
        if not bool(inside.any()):
            return out
        out = out.clone()
        lam = self.cross_weight
        for half, refs in self._ref_rows.items():
            rows = [r for r in layout.indices(cfg=half, role="target")]
            if not rows:
                continue
            qt = q[rows][:, ctx.image]
            mutual = torch.zeros_like(out[rows][:, ctx.image])
            for i, ref in enumerate(refs):
                where = lab == i + 1
                if not bool(where.any()):
                    continue
                kr = k[ref : ref + 1].expand(len(rows), -1, -1, -1)
                vr = v[ref : ref + 1].expand(len(rows), -1, -1, -1)
                m = attention(qt[:, where], kr, vr)
                mutual[:, where] = m.to(mutual.dtype)
            cur = out[rows][:, ctx.image]
            blended = torch.where(inside[None, :, None, None], (1 - lam) * cur + lam * mutual, cur)
            out[rows, ctx.image] = blended
        return out

    def records(self) -> dict[str, Any]:
        return {"subjects": len(self._targets), "reposition_layers": len(getattr(self, "_mutual", ())),
                "isolation_layers": len(getattr(self, "_iso", ())), "cross_layers": len(getattr(self, "_cross", ()))}


# ------------------------------------------------------------------------------ conveniences
def check_subject_words(edit_pipe, prompts: Sequence[str], words: Sequence[Sequence[str]], max_len=None) -> None:
    """Each prompt holds its words (a ValueError names the prompt's words otherwise); checked before any model call."""
    from ..tokens import index_prompt

    segs = edit_pipe.family.text_segments(max_len)
    for p, ws in zip(prompts, words):
        index = index_prompt(p, segs, warn=False)
        for w in ws:
            index.find(w)  # ValueError naming the prompt's words


def attention_masks(
    edit_pipe,
    prompts: str | Sequence[str],
    words: Sequence[str] | Sequence[Sequence[str]],
    *,
    seed: int | Sequence[int] = 0,
    threshold: float | str = "otsu",
    controls: Sequence[Control] = (),
    **kw: Any,
) -> list[list[torch.Tensor]]:
    """Subject masks from attnedit's own cross-attention maps of a (rehearsal) generation.

    For each prompt, one (H, W) float 0/1 mask per word: the word's map averaged over layers and
    steps at the finest captured grid, upsampled (bilinear) to the image size, min-max normalised
    and binarised (Otsu by default). This replaces the official Grounding DINO + SAM route.
    """
    from ..store import AttentionStore

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if words and isinstance(words[0], str):
        words = [list(words)] if len(prompts) == 1 else [[w] for w in words]
    if len(words) != len(prompts):
        raise ValueError(f"{len(words)} word lists for {len(prompts)} prompts; give one list per prompt")
    check_subject_words(edit_pipe, prompts, words, edit_pipe.call_defaults().get("max_sequence_length"))
    store = AttentionStore()
    res = edit_pipe.generate(prompts, controls=[store, *controls], seed=seed, **kw)
    height, width = res.images[0].size[1], res.images[0].size[0]
    out: list[list[torch.Tensor]] = []
    for sample, ws in enumerate(words):
        masks = []
        for w in ws:
            m = store.word_map(w, sample).float()
            m = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
            lo, hi = m.min(), m.max()
            m = (m - lo) / (hi - lo) if float(hi - lo) > 1e-12 else torch.zeros_like(m)
            masks.append(binarize(m, threshold).float())
        out.append(masks)
    return out


def ir_diffusion(
    edit_pipe,
    reference_prompts: Sequence[str],
    scene_prompt: str,
    subjects: Sequence[str],
    *,
    scene_subjects: Sequence[str] | None = None,
    target_boxes: Sequence[Sequence[float]] | None = None,
    target_masks: Sequence[Any] | None = None,
    reference_boxes: Sequence[Sequence[float]] | None = None,
    reference_masks: Sequence[Any] | None = None,
    reference_images: Sequence[Any] | None = None,
    seed: int = 0,
    reference_seed: int | None = None,
    control_options: dict[str, Any] | None = None,
    **kw: Any,
):
    """Generate references and a scene with IR-Diffusion; returns a `Result` (references first).

    `subjects[i]` names subject i in `reference_prompts[i]` (and, unless `scene_subjects` is
    given, in `scene_prompt`). Locations missing from the arguments come from attnedit's own
    cross-attention maps of rehearsal generations with the same seeds (the attention route).
    `reference_images`: real reference photos instead of generated references; each is inverted
    (`attnedit.inversion.invert`, prompt = its reference prompt) and its row follows the inversion
    trajectory, as in MasaCtrl's real-image editing.
    """
    from ..inversion import FollowTrajectory, invert, sampling_scheduler

    refs = list(reference_prompts)
    subjects = list(subjects)
    scene_subjects = list(scene_subjects) if scene_subjects is not None else subjects
    if not refs or len(subjects) != len(refs) or len(scene_subjects) != len(refs):
        raise ValueError(f"{len(refs)} reference prompts need one subject word each (got {len(subjects)} and "
                         f"{len(scene_subjects)} scene words)")
    if reference_images is not None and len(reference_images) != len(refs):
        raise ValueError(f"{len(reference_images)} reference images for {len(refs)} reference prompts")
    for bad in ("latents", "layout", "num_images"):
        if bad in kw:
            raise ValueError(f"ir_diffusion sets {bad!r} itself; do not pass it")
    max_len = edit_pipe.call_defaults().get("max_sequence_length")
    check_subject_words(edit_pipe, refs, [[w] for w in subjects], max_len)
    check_subject_words(edit_pipe, [scene_prompt], [scene_subjects], max_len)
    ref_seed = int(reference_seed) if reference_seed is not None else int(seed) + 1000
    opts = dict(control_options or {})
    whole = [[0.0, 0.0, 1.0, 1.0]] * len(refs)  # the options and the model are checked before any rehearsal
    placed = [k for k in opts if k.startswith(("target_", "reference_"))]
    if placed:
        raise ValueError(f"control_options: {placed[0]!r} is an argument of ir_diffusion itself; pass it there")
    make_control("reposition", {**opts, "target_boxes": whole, "reference_boxes": whole}).check_family(edit_pipe.family)
    n = len(refs) + 1
    guidance = kw.get("guidance")
    guidance = float(guidance) if guidance is not None else edit_pipe.recommended()["guidance"]
    cfg = edit_pipe.family.uses_cfg(guidance)
    layout = BatchLayout.standard(n, cfg, groups=[0] * n, roles=["source"] * len(refs) + ["target"])
    followers: list[Control] = []
    latents = None
    if reference_images is not None:
        steps = int(kw.get("steps") or edit_pipe.default_steps())
        kw["steps"] = steps
        invs = [invert(edit_pipe, img, prompt=p, steps=steps) for img, p in zip(reference_images, refs)]
        sizes = {(i.height, i.width) for i in invs}
        if len(sizes) != 1:
            raise ValueError(f"reference images must have one size (after fitting to the model stride), got {sizes}")
        height, width = sizes.pop()
        if kw.get("height", height) != height or kw.get("width", width) != width:
            raise ValueError(f"height/width must match the reference images ({height}x{width})")
        kw.update(height=height, width=width)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        scene_noise = edit_pipe.initial_latents(1, height, width, [gen])
        latents = torch.cat([*(i.latent for i in invs), scene_noise.to(invs[0].latent)])
        followers = [FollowTrajectory(inv, [i]) for i, inv in enumerate(invs)]
    with sampling_scheduler(edit_pipe) if reference_images is not None else _nothing():
        if target_boxes is None and target_masks is None:
            target_masks = attention_masks(edit_pipe, [scene_prompt], [scene_subjects], seed=[seed], **kw)[0]
        if reference_boxes is None and reference_masks is None:
            rkw = dict(kw)
            if latents is not None:  # maps of the real references, read along their inversion trajectories
                rkw.update(latents=latents[: len(refs)], controls=followers)
            found = attention_masks(edit_pipe, refs, [[w] for w in subjects], seed=[ref_seed] * len(refs), **rkw)
            reference_masks = [m[0] for m in found]
        control = make_control("reposition", dict(target_boxes=target_boxes, target_masks=target_masks,
                                                  reference_boxes=reference_boxes, reference_masks=reference_masks,
                                                  **opts))
        result = edit_pipe.generate([*refs, scene_prompt], controls=[control, *followers],
                                    seed=[ref_seed] * len(refs) + [seed], layout=layout, latents=latents, **kw)
    result.records["ir_diffusion"] = {"target_masks": target_masks, "reference_masks": reference_masks,
                                      "target_boxes": target_boxes, "reference_boxes": reference_boxes,
                                      "real_references": reference_images is not None}
    return result


@contextmanager
def _nothing():
    yield


__all__ = ["IsolationAttention", "RepositionAttention", "attention_masks", "ir_diffusion"]
