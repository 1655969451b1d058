"""MasaCtrl: mutual self-attention control (Cao et al., ICCV 2023, arXiv 2304.08465).

The paper denoises a source and a target from the same noise; from a start step on, in the
self-attention of the decoder's last layers, the target's queries read the *source's* keys and
values, so the target keeps the source's identity and appearance while its prompt changes pose,
view or action. A mask-guided variant keeps foreground and background correspondences apart,
with masks given by the user or derived from the cross-attention maps of a word.

Where attnedit differs from the official code (TencentARC/MasaCtrl, d0ba16b):
- It swaps K/V rows (`qkv` hook) instead of recomputing attention: no extra attention work, the
  fused kernels still apply, and the source rows are untouched (bit-identical to plain generation).
- Layers are chosen by module name/level, steps by timestep: the SD1.x default (transformer blocks
  10..15) is "self-attention of the two finest decoder levels"; SDXL gets the spec's documented
  L = 44 set by name instead of the official scripts' broken call counting; the default start step
  is 8 % of the schedule (4 of 50), so other step counts scale.
- Any batch: one source with several targets, several groups, with or without CFG (the official
  processor hard-codes `[u_src, u_tgt, c_src, c_tgt]`). Batch roles come from the `BatchLayout`; a
  batch without roles treats sample 0 as the source of every other sample.
- The mask-guided variant is one attention pass with region labels (foreground queries may read
  only source-foreground keys, background only background), not two dense passes; an empty or
  full source mask falls back to the unmasked pass for that side instead of producing NaN.
- User masks reach a layer's token grid by sampling each cell at its centre (`masks.mask_cells`,
  the rule boxes and IR-Diffusion use too), where the official `F.interpolate(mask, (H, W))`
  (mode "nearest") reads each cell's top-left pixel, which shifts every mask up and left by half
  a cell; a mask smaller than a cell keeps the cell of its largest value instead of vanishing.
- With nothing to copy from (one image per call, or only sources), MasaCtrl refuses to run
  instead of returning the plain image.
- Automatic masks use the cross-attention of the latent/4 level (or the coarsest level the model
  has below it) at any size and aspect ratio; the official code keys on 256 query tokens and
  silently does nothing on SDXL or other sizes.
- The Union variant (`union=True`: targets read `[K_src; K_own]`) works; the official one crashes
  (its source re-enters the controlled path, issue #49). Sources keep exactly their own keys.
- DiTs (SD3, FLUX, PixArt): the target's *image* keys/values are replaced by the source's (after
  norms and RoPE, which match since the grids match); the target keeps its own text keys/values,
  so its prompt still steers it. No published setting exists: the default controls the second half
  of the blocks (our suggestion).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..controls import NEEDS_PROMPT, CallContext, Control, Example, register
from ..kernels.types import RegionMask
from ..layout import BatchLayout
from ..masks import check_masks, map_layers, mask_cells, resize_mask
from ..selectors import Select, Steps

#: official default start step (4 of 50) as a fraction of the schedule
DEFAULT_START = 0.08
NOTHING_TO_COPY = (
    "MasaCtrl has nothing to copy from: every image of this call is its own source (one image, or sources "
    "only), so it would return the plain image; generate a source and its targets in one call "
    "(attnedit.consistent(pipe, source, targets), several prompts, or `together: true` in a job file)"
)
def default_layers(family, registry) -> Select:
    """MasaCtrl's controlled self-attention layers: the family's published default (its adapter's
    `method_defaults["masactrl"]`, see the module docstring), else the second half of a DiT's blocks."""
    chosen = family.method_default("masactrl", "layers")
    if chosen is not None:
        return chosen
    n = 1 + max(i.index for i in registry)
    return Select(kind=("self", "joint"), min_index=n // 2)


@register
class MasaCtrl(Control):
    """Mutual self-attention: targets read their source's keys and values.

    Example (one source, two targets, same seed for all three):
        >>> from attnedit.methods.masactrl import MasaCtrl, consistent
        >>> res = consistent(pipe, "a cat sitting", ["a cat running", "a cat jumping"], seed=42)

    Options:
    - `start_step` / `end_step`: step window (ints = step indices, floats = fractions of the
      schedule); default from 8 % of the schedule (step 4 of 50, the official value) to the end.
    - `start_layer`: official "start layer" L, i.e. transformer-block index >= L; default: the
      family default (SD1.x: the two finest decoder levels = L 10; SDXL: the spec's L = 44 set).
    - `masks`: one foreground mask per image of the call (H x W at the image size) for the
      mask-guided variant: arrays, tensors, PIL images or PNG paths (white = foreground; a path
      keeps a hand-drawn mask replayable from JSON); `mask_words`: a word (or one per image)
      whose cross-attention gives the masks automatically, binarised at `mask_threshold`
      (official 0.1).
    - `union`: the Union variant: targets read their source's *and their own* keys/values
      (2N keys; sources keep exactly their own through region labels). This one does add
      attention work (twice the keys at the controlled layers). UNet/PixArt self-attention only.
    - `layers` / `steps`: explicit `Select` / `Steps` instead of the above.
    """

    name = "masactrl"
    phases = ("denoise",)
    #: an image depends on the other images of its call (targets read their source)
    cross_sample = True
    #: options that may hold file paths (mask PNGs); batch job files resolve them against their folder
    file_options = ("masks",)

    @classmethod
    def example(cls) -> Example:
        return Example(prompts=("a red circle", "a red circle on the left"), together=True)

    def __init__(
        self,
        *,
        start_step: int | float | None = None,
        end_step: int | float | None = None,
        start_layer: int | None = None,
        masks: Sequence[Any] | None = None,
        mask_words: str | Sequence[str] | None = None,
        mask_threshold: float = 0.1,
        union: bool = False,
        layers: Select | None = None,
        steps: Steps | range | tuple | None = None,
    ) -> None:
        if steps is not None and (start_step is not None or end_step is not None):
            raise ValueError("give either steps= or start_step/end_step, not both")
        if layers is not None and start_layer is not None:
            raise ValueError("give either layers= or start_layer, not both")
        if start_layer is not None and (not isinstance(start_layer, int) or start_layer < 0):
            raise ValueError(f"start_layer must be a non-negative int, got {start_layer!r}")
        if isinstance(masks, (str, bytes, os.PathLike)):
            raise ValueError("masks is a list with one mask per image of the call, e.g. [path, path]")
        if masks is not None and mask_words is not None:
            raise ValueError("give either masks= (explicit) or mask_words= (automatic), not both")
        if not 0.0 <= float(mask_threshold) <= 1.0:
            raise ValueError(f"mask_threshold must be within [0, 1], got {mask_threshold}")
        if union and (masks is not None or mask_words is not None):
            raise ValueError("the union variant has no mask-guided form; use union=True without masks/mask_words")
        self.start_step = start_step
        self.end_step = end_step
        self.start_layer = start_layer
        self.masks = list(masks) if masks is not None else None
        self.mask_words = mask_words
        self.mask_threshold = float(mask_threshold)
        self.union = bool(union)
        self._user_layers = layers
        if steps is None:
            steps = Steps(start_step if start_step is not None else DEFAULT_START, end_step)
        super().__init__(layers=layers if layers is not None else Select(kind="self"), steps=steps)

    # ------------------------------------------------------------------------------ binding
    def bind(self, run) -> None:
        if self._user_layers is not None:
            self.layers = self._user_layers
        elif self.start_layer is not None:
            self.layers = Select(kind=("self", "joint"), min_index=self.start_layer)
        else:
            self.layers = default_layers(run.family, run.registry)
        picked = self.layers.pick(run.registry) if isinstance(self.layers, Select) else [
            i for i in run.registry if self.layers(i)
        ]
        picked = [i for i in picked if i.kind in (("self",) if self.union else ("self", "joint"))]
        if not picked:
            raise ValueError(
                "MasaCtrl selected no self-attention layer on this model; valid start_layer values are 0.."
                f"{max(i.index for i in run.registry)}, or pass layers=Select(kind='self', ...)"
            )
        self.use_layers(run, (i.name for i in picked))
        self._map_layers = frozenset(i.name for i in self._mask_source_layers(run)) if self.mask_words else frozenset()
        self.setup(run)

    def _mask_source_layers(self, run) -> list:
        """Cross-attention layers whose maps give automatic masks (`attnedit.masks.map_layers`)."""
        return map_layers(run.family, run.registry)

    def selects(self, layer) -> bool:
        return layer.name in self.selected_layers or layer.name in getattr(self, "_map_layers", ())

    def setup(self, run) -> None:
        n = len(run.prompts) * max(run.num_images_per_prompt, 1) if run.prompts else None
        layout = run.layout
        if layout is not None:
            n = layout.n_samples
            roles = {r.role for r in layout.rows}
            if roles <= {"source"} or (not roles - {"plain"} and n < 2):
                raise ValueError(NOTHING_TO_COPY)
            if "source" in roles:
                for r in layout.rows:
                    if r.role == "target" and not layout.indices(cfg=r.cfg, role="source", group=r.group):
                        raise ValueError(
                            f"target sample {r.sample} (group {r.group}) has no source in its group and CFG half; "
                            "every group with targets needs one source (BatchLayout.standard(groups=, roles=))"
                        )
                for g in {r.group for r in layout.rows}:
                    for half in {r.cfg for r in layout.rows}:
                        if len(layout.indices(cfg=half, role="source", group=g)) > 1:
                            raise ValueError(f"group {g} has several sources; MasaCtrl needs one source per group")
        elif n is not None and n < 2:
            raise ValueError(NOTHING_TO_COPY)
        self._masks = None
        if self.masks is not None:
            if n is not None and len(self.masks) != n:
                raise ValueError(f"masks: {len(self.masks)} given for {n} images; give one mask per image")
            size = (run.height, run.width) if run.height and run.width else _shape(self.masks[0])
            self._masks = check_masks(self.masks, size, "MasaCtrl mask")
        self._capture = None
        if self.mask_words is not None:
            if not run.tokens:
                raise ValueError(NEEDS_PROMPT.format(name="MasaCtrl(mask_words=...)"))
            count = n or len(run.tokens)
            words = [self.mask_words] * count if isinstance(self.mask_words, str) else list(self.mask_words)
            if len(words) != count:
                raise ValueError(f"mask_words: {len(words)} given for {count} images; give one word or one per image")
            positions = [run.tokens_of_sample(s).find(w) for s, w in enumerate(words)]  # ValueError names words
            union = sorted({p for pos in positions for p in pos})
            self._capture = torch.tensor(union, dtype=torch.long)
            self._columns = [[union.index(p) for p in pos] for pos in positions]

    def reset(self) -> None:
        super().reset()
        self.state.maps = {}  # grid -> [sum (n_samples, N), count] of the current step
        self.state.prev_maps = {}
        self.state.labels = {}
        self.state.sources = None
        self.state.last_masks = {}

    def begin_step(self, run, step: int) -> None:
        if self.state.maps:
            self.state.prev_maps = self.state.maps
        self.state.maps = {}

    # ----------------------------------------------------------------------------- rows
    def sources(self, layout: BatchLayout) -> list[int]:
        """For every batch row, the row whose keys/values it reads (itself for sources)."""
        cached = getattr(self.state, "sources", None)
        if cached and cached[0] is layout:
            return cached[1]
        if any(r.role == "source" for r in layout.rows):
            out = layout.source_of()
        else:  # no roles: sample 0 of each CFG half is the source of the whole batch
            first: dict[str, int] = {}
            for i, r in enumerate(layout.rows):
                if r.cfg not in first or layout.rows[first[r.cfg]].sample > r.sample:
                    first[r.cfg] = i
            out = [first[r.cfg] for r in layout.rows]
        self.state.sources = (layout, out)
        return out

    # ---------------------------------------------------------------------------- hooks
    def qkv(self, ctx: CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if ctx.layer.name not in self.selected_layers:
            return q, k, v
        src = self.sources(ctx.layout)
        if src == list(range(len(src))):
            raise RuntimeError(NOTHING_TO_COPY)
        index = torch.tensor(src, dtype=torch.long, device=k.device)
        img = ctx.image
        if self.union:  # [K_src; K_own] for every row; sources are held to their own half by regions()
            return q, torch.cat([k.index_select(0, index), k], 1), torch.cat([v.index_select(0, index), v], 1)
        if ctx.text is None and img.start == 0 and img.stop == k.shape[1]:
            return q, k.index_select(0, index), v.index_select(0, index)
        k2, v2 = k.clone(), v.clone()
        k2[:, img] = k[index, img]
        v2[:, img] = v[index, img]
        return q, k2, v2

    def capture(self, ctx: CallContext) -> torch.Tensor | None:
        if self._capture is None or ctx.layer.name not in self._map_layers or ctx.text is None:
            return None
        if not ctx.layout.cond_rows():  # a separate uncond pass reads another prompt: its columns are not ours
            return None
        return self._capture + ctx.text.start

    def observe(self, ctx: CallContext, probs: torch.Tensor) -> None:
        rows = ctx.layout.cond_rows()
        p = probs[:, ctx.image].detach().float()  # (B, N, C)
        n_samples = ctx.layout.n_samples
        fg = torch.zeros(n_samples, p.shape[1], device=p.device)
        for r in rows:
            s = ctx.layout.rows[r].sample
            fg[s] = p[r][:, self._columns[s]].sum(-1)
        entry = self.state.maps.get(ctx.grid)
        if entry is None:
            self.state.maps[ctx.grid] = [fg, 1]
        else:
            entry[0] += fg
            entry[1] += 1

    def _auto_mask(self, sample: int, grid: tuple[int, int]) -> torch.Tensor | None:
        maps = self.state.maps or self.state.prev_maps
        if not maps:
            return None
        src_grid = max(maps, key=lambda g: g[0] * g[1])
        total, count = maps[src_grid]
        m = (total[sample] / count).reshape(src_grid)
        lo, hi = m.min(), m.max()
        m = (m - lo) / (hi - lo) if float(hi - lo) > 1e-12 else torch.zeros_like(m)
        return resize_mask(m, grid) >= self.mask_threshold

    def _mask(self, sample: int, grid: tuple[int, int], device) -> torch.Tensor | None:
        if self._masks is not None:
            key = (sample, grid)
            if key not in self.state.labels:
                self.state.labels[key] = mask_cells(self._masks[sample], grid, 0.5).flatten().to(device)
            return self.state.labels[key]
        if self._capture is not None:
            m = self._auto_mask(sample, grid)
            if m is not None:
                self.state.last_masks[sample] = m.cpu()
                return m.flatten().to(device)
        return None

    def _union_regions(self, ctx: CallContext) -> RegionMask | None:
        src = self.sources(ctx.layout)
        if src == list(range(len(src))):
            return None
        b, n = ctx.layout.size, ctx.grid[0] * ctx.grid[1]
        device = ctx.hidden_states.device if ctx.hidden_states is not None else torch.device("cpu")
        q_lab = torch.zeros(b, n, dtype=torch.long, device=device)
        k_lab = torch.zeros(b, 2 * n, dtype=torch.long, device=device)
        k_lab[:, :n] = 1  # the gathered source copy
        table = torch.ones(b, 2, 2, dtype=torch.bool, device=device)
        for r in range(b):
            if src[r] == r:
                table[r, 0, 1] = False  # a source reads its own keys once
        return RegionMask(q_lab, k_lab, table)

    def regions(self, ctx: CallContext) -> RegionMask | None:
        if self.union and ctx.layer.name in self.selected_layers:
            return self._union_regions(ctx)
        if (self._masks is None and self._capture is None) or ctx.layer.name not in self.selected_layers:
            return None
        layout = ctx.layout
        src = self.sources(layout)
        n_seq = max(ctx.image.stop, ctx.text.stop if ctx.text is not None else 0)
        device = ctx.hidden_states.device if ctx.hidden_states is not None else torch.device("cpu")
        b = layout.size
        q_lab = torch.full((b, n_seq), 2, dtype=torch.long, device=device)
        k_lab = torch.full((b, n_seq), 2, dtype=torch.long, device=device)
        table = torch.ones(b, 3, 3, dtype=torch.bool, device=device)
        masked_any = False
        for r, row in enumerate(layout.rows):
            if src[r] == r:
                continue
            m_t = self._mask(row.sample, ctx.grid, device)
            m_s = self._mask(layout.rows[src[r]].sample, ctx.grid, device)
            if m_t is None or m_s is None:
                continue
            q_lab[r, ctx.image] = m_t.long()
            k_lab[r, ctx.image] = m_s.long()
            t = torch.eye(3, dtype=torch.bool, device=device)
            t[2, :] = True
            t[:, 2] = True
            if not bool(m_s.any()):  # no source foreground: foreground queries read everything
                t[1, :] = True
            if bool(m_s.all()):  # no source background
                t[0, :] = True
            table[r] = t
            masked_any = True
        if not masked_any:
            return None
        return RegionMask(q_lab, k_lab, table)

    def records(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": sorted(self.selected_layers)}
        if self.state.sources:
            layout, src = self.state.sources  # image -> the image it reads from (its source), CFG halves alike
            out["reads_from"] = {layout.rows[r].sample: layout.rows[s].sample for r, s in enumerate(src) if r != s}
        if self.state.last_masks:
            out["auto_masks"] = dict(self.state.last_masks)
        return out


def _shape(mask: Any) -> tuple[int, int]:
    from ..masks import to_mask

    return tuple(to_mask(mask).shape)


def consistent(
    edit_pipe,
    source_prompt: str | Sequence[str],
    target_prompts: str | Sequence[str] | Sequence[Sequence[str]],
    *,
    control: MasaCtrl | None = None,
    controls: Sequence[Control] = (),
    seed: int = 0,
    **kw: Any,
):
    """Generate source(s) and their targets in one batch with MasaCtrl; returns a `Result`.

    `source_prompt` is one prompt (then `target_prompts` is one prompt or a list) or a list of
    sources (then `target_prompts` is one list of targets per source). Each group shares one seed
    (`seed + group`), so source and targets start from the same noise. Images come back as
    `[source_0, its targets..., source_1, ...]`.
    """
    if isinstance(source_prompt, str):
        sources = [source_prompt]
        groups_targets = [[target_prompts] if isinstance(target_prompts, str) else list(target_prompts)]
    else:
        sources = list(source_prompt)
        if isinstance(target_prompts, str) or len(target_prompts) != len(sources):
            raise ValueError(
                f"{len(sources)} source prompts need one list of target prompts each, got {target_prompts!r}"
            )
        groups_targets = [[t] if isinstance(t, str) else list(t) for t in target_prompts]
    if not sources:
        raise ValueError("give at least one source prompt")
    prompts, groups, roles, seeds = [], [], [], []
    for g, (src, tgts) in enumerate(zip(sources, groups_targets)):
        if not tgts or any(not isinstance(t, str) for t in tgts):
            raise ValueError(f"source {g} ({src!r}) needs at least one target prompt (strings)")
        for j, p in enumerate([src, *tgts]):
            prompts.append(p)
            groups.append(g)
            roles.append("source" if j == 0 else "target")
            seeds.append(int(seed) + g)
    if kw.get("num_images", 1) != 1:
        raise ValueError("consistent() makes one image per prompt; repeat target prompts for more")
    guidance = kw.get("guidance")
    guidance = float(guidance) if guidance is not None else edit_pipe.recommended()["guidance"]
    cfg = edit_pipe.family.uses_cfg(guidance)
    layout = BatchLayout.standard(len(prompts), cfg, groups=groups, roles=roles)
    control = control if control is not None else MasaCtrl()
    return edit_pipe.generate(prompts, controls=[control, *controls], seed=seeds, layout=layout, **kw)


__all__ = ["MasaCtrl", "consistent"]
