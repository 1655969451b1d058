"""Bounded Attention (Dahary et al., ECCV 2024): several subjects in boxes without leakage.

The paper masks attention in every layer at every step so that pixels of one subject read neither
another subject's words (cross-attention, conditional half) nor another subject's pixels
(self-attention, both CFG halves), and during the first 15 of 50 steps moves the latent so each
subject's attention concentrates inside its box (per subject (1 - IoU)^2, cross and self terms
weighted 1.5 / 0.5, up to 5 gradient steps per step until the loss per subject falls under 0.2,
step size linear 8 -> 2 on SD 1.x and 18 -> 5 on SDXL). From step 15 on, every 5 steps, the boxes
are replaced by subject-shaped masks from k-means on the running-mean self-attention (3 clusters
per subject), matched to subjects through their cross-attention maps.

Differences from the official code (omer11a/bounded-attention): masks travel as region labels
(`RegionMask`: a subject bitset per pixel and a class per token) built once per grid, phase and
mask version, never as dense N x N tensors rebuilt per call; the guidance pass runs on the
conditional rows only (the loss only reads them; same gradient at half the cost) and stops after
the last loss layer; the refinement loop is per sample (a sample under the threshold stops
while others continue); filler words come from `attnedit.tokens.STOP_WORDS` instead of NLTK
tags (override with `filter_words`); boxes are rasterised per axis (non-square sizes) and never
to zero cells; the guided window and refinement steps are fractions of the schedule (15/50,
every 5/50); the k-means is a small torch implementation; heads are averaged rather than summed
(the IoU is scale-free per layer). UNet families only (SD 1.x/2.x, SDXL).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .. import validate
from ..controls import CallContext, Example, register
from ..guidance import GuidanceControl, LayerMaps, StepPlan, map_level, native_latent_side, resolve_subjects
from ..kernels.types import RegionMask
from ..layers import LayerInfo
from ..losses import bounded_iou_loss, linear_schedule
from ..masks import check_box_size, check_boxes
from ..selectors import Steps
from ..tokens import STOP_WORDS

# token classes of the cross-attention key labels (subject tokens are 3 + their subject bitset)
_FREE, _FILTER, _EOS = 0, 1, 2
#: official step sizes (start, end) where the model family names none (its adapter's method_defaults)
STEP_SIZES = (8.0, 2.0)


def box_masks(boxes: list[tuple[float, float, float, float]], grid: tuple[int, int]) -> torch.Tensor:
    """(S, H, W) bool masks of normalised [x0, y0, x1, y1] boxes on an H x W grid.

    Rows round(y0 H) .. round(y1 H) and columns round(x0 W) .. round(x1 W) (the official rule,
    per axis); a box thinner than a cell keeps the cell of its centre, so no mask is empty.
    """
    h, w = grid
    out = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        r0, r1 = _span(y0, y1, h)
        c0, c1 = _span(x0, x1, w)
        out[i, r0:r1, c0:c1] = True
    return out


def _span(a: float, b: float, n: int) -> tuple[int, int]:
    lo, hi = round(a * n), round(b * n)
    if hi <= lo:
        lo = min(int((a + b) / 2 * n), n - 1)
        hi = lo + 1
    return lo, hi


def subject_bits(masks: torch.Tensor) -> torch.Tensor:
    """(..., S, N) bool -> (..., N) long bitset of the subjects containing each pixel."""
    weights = (2 ** torch.arange(masks.shape[-2], device=masks.device)).view(-1, 1)
    return (masks.long() * weights).sum(-2)


def self_table(num_subjects: int, device=None) -> torch.Tensor:
    """(2^S, 2^S) allowed table: q sees k iff either is background or they share a subject."""
    r = torch.arange(2**num_subjects, device=device)
    return (r[:, None] == 0) | (r[None, :] == 0) | ((r[:, None] & r[None, :]) != 0)


def cross_table(num_subjects: int, guidance: bool, mask_eos: bool, device=None) -> torch.Tensor:
    """Allowed table of cross-attention labels.

    Query labels: pixel bitsets 0 .. 2^S - 1 (cond rows) and OPEN = 2^S (uncond rows: no mask).
    Key labels: 0 free token, 1 filter token, 2 EOS, 3 + m a subject token of subject bitset m.
    A subject pixel sees its subjects' tokens; nobody sees filter tokens; background pixels see
    EOS only when not `mask_eos`. In guidance passes the background also sees every subject's
    tokens and EOS (official `mask_cross_during_guidance`: only cross-subject leakage is blocked).
    """
    n = 2**num_subjects
    size = n + 3
    q = torch.arange(size, device=device)[:, None]
    k = torch.arange(size, device=device)[None, :]
    subj = k - 3
    is_pixel = q < n
    allowed = torch.ones(size, size, dtype=torch.bool, device=device)
    allowed &= ~(is_pixel & (k == _FILTER))
    if mask_eos and not guidance:
        allowed &= ~(is_pixel & (q == 0) & (k == _EOS))
    sees_subject = (q & subj.clamp(min=0)) != 0
    if guidance:
        sees_subject = sees_subject | (q == 0)
    allowed &= ~(is_pixel & (k >= 3) & ~sees_subject)
    return allowed


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    n_init: int = 10,
    iters: int = 50,
    centers: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means: x (B, N, D) -> labels (B, N), centres (B, k, D).

    `n_init` random starts (k distinct points each), best inertia kept; warm start from `centers`
    runs once. Empty clusters keep their previous centre.
    """
    b, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points ({n}), got k={k}")
    x = x.float()
    if centers is not None:
        starts = centers.float()[:, None]  # (B, 1, k, D)
    else:
        idx = torch.stack([torch.randperm(n, generator=generator)[:k] for _ in range(b * n_init)]).view(b, n_init, k)
        starts = torch.gather(x[:, None].expand(b, n_init, n, d), 2, idx.to(x.device)[..., None].expand(-1, -1, -1, d))
    c = starts.clone()
    xs = x[:, None].expand(-1, c.shape[1], -1, -1)
    for _ in range(iters):
        labels = torch.cdist(xs, c).argmin(-1)  # (B, I, N)
        onehot = F.one_hot(labels, k).float()  # (B, I, N, k)
        counts = onehot.sum(2)  # (B, I, k)
        sums = onehot.transpose(2, 3) @ xs  # (B, I, k, D)
        new = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], c)
        if torch.allclose(new, c):
            c = new
            break
        c = new
    dist = torch.cdist(xs, c)
    labels = dist.argmin(-1)
    inertia = dist.gather(-1, labels[..., None]).squeeze(-1).pow(2).sum(-1)  # (B, I)
    best = inertia.argmin(1)
    ar = torch.arange(b, device=x.device)
    return labels[ar, best], c[ar, best]


@register
class BoundedAttention(GuidanceControl):
    """Bounded denoising plus bounded guidance for `boxes` (one per subject in `words`).

    >>> ba = attnedit.BoundedAttention(boxes=[[0.05, 0.2, 0.45, 0.8], [0.55, 0.2, 0.95, 0.8]],
    ...                                words=["kitten", "puppy"])
    >>> result = pipe("a ginger kitten and a gray puppy", controls=[ba], seed=160, steps=50)

    `boxes`: [x0, y0, x1, y1] in [0, 1], origin top-left; or `masks`: one 2-D array per subject
    (any size, > 0.5 inside; a box is a special case), used for the masks and the loss alike.
    `words`: one subject per box, a word or
    phrase (all its tokens belong to the subject; its last word is the subject's leading word
    for mask refinement), a token index, or a list of those. `filter_words`: words blocked for
    every pixel (default: the prompt's words in `attnedit.tokens.STOP_WORDS`; a list replaces it).
    Official defaults: `cross_loss_coef` 1.5, `self_loss_coef` 0.5, `iterations` 5 per step,
    `loss_threshold` 0.2 per subject, `step_size` (8, 2) on SD / (18, 5) on SDXL over the guided
    `steps` (first 30 %), refinement from `refine_start` (30 %) every `refine_every` (10 %) with
    `clusters_per_subject` 3 and thresholds 0.2 / 0.2, `mask_eos` on, `kmeans_inits` 100.
    """

    name = "bounded"
    requires = ("unet", "step_callback", "text_maps")
    unsupported = "it bounds UNet cross- and self-attention per level, which DiTs do not have"

    @classmethod
    def example(cls) -> Example:
        return Example(options={"boxes": [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]], "words": ["circle", "square"],
                                "kmeans_inits": 2})

    def __init__(
        self,
        *,
        boxes: list | None = None,
        words: list,
        masks: list | None = None,
        filter_words: list | None = None,
        cross_loss_coef: float = 1.5,
        self_loss_coef: float = 0.5,
        step_size: tuple[float, float] | None = None,
        iterations: int = 5,
        loss_threshold: float = 0.2,
        refine: bool = True,
        refine_start: float | int = 0.3,
        refine_every: float | int = 0.1,
        clusters_per_subject: int = 3,
        cross_mask_threshold: float = 0.2,
        self_mask_threshold: float = 0.2,
        mask_eos: bool = True,
        kmeans_inits: int = 100,
        seed: int = 0,
        max_grad_norm: float | None = None,
        early_exit: bool = True,
        layers=None,
        steps=None,
    ) -> None:
        if (boxes is None) == (masks is None):
            raise ValueError("give either boxes=[[x0, y0, x1, y1], ...] or masks=[2-D array, ...], one per subject")
        self.boxes = _check_boxes(boxes) if boxes is not None else None
        self.masks = _check_masks(masks) if masks is not None else None
        self.num_subjects = len(self.boxes if self.boxes is not None else self.masks)
        what = "boxes" if self.boxes is not None else "masks"
        if isinstance(words, (str, int)):
            words = [words]
        self.words = list(words or [])
        if self.num_subjects != len(self.words):
            more = f"{what} than words" if self.num_subjects > len(self.words) else f"words than {what}"
            raise ValueError(
                f"got {self.num_subjects} {what} and {len(self.words)} subject words (more {more}); "
                f"give exactly one word or phrase per {what[:-1] if what == 'masks' else 'box'}"
            )
        if self.num_subjects > 8:
            raise ValueError(f"at most 8 subjects are supported, got {self.num_subjects}")
        self.filter_words = None if filter_words is None else list(filter_words)
        if step_size is not None and (len(step_size) != 2 or min(step_size) < 0):
            raise ValueError(f"step_size must be (start, end) with values >= 0, got {step_size!r}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if clusters_per_subject < 1:
            raise ValueError(f"clusters_per_subject must be >= 1, got {clusters_per_subject}")
        self.cross_loss_coef = float(cross_loss_coef)
        self.self_loss_coef = float(self_loss_coef)
        self.step_size = None if step_size is None else (float(step_size[0]), float(step_size[1]))
        self.iterations = int(iterations)
        self.loss_threshold = float(loss_threshold)
        self.refine = bool(refine)
        self.refine_start = refine_start
        self.refine_every = refine_every
        self.clusters_per_subject = int(clusters_per_subject)
        self.cross_mask_threshold = float(cross_mask_threshold)
        self.self_mask_threshold = float(self_mask_threshold)
        self.mask_eos = bool(mask_eos)
        self.kmeans_inits = int(kmeans_inits)
        self.seed = int(seed)
        super().__init__(max_grad_norm=max_grad_norm, early_exit=early_exit, layers=layers, steps=steps)

    def default_steps(self) -> Steps:
        return Steps(0, 0.3)

    # ---------------------------------------------------------------------------- setup
    def reset(self) -> None:
        super().reset()
        self.state.refined = None  # (B, S, Hm, Wm) bool after the first refinement
        self.state.version = 0
        self.state.cache = {}
        self.state.acc_cross = None  # [sum (B, N, S), count]
        self.state.acc_self = None  # [sum (B, N, N), count]
        self.state.mask_grid = None
        self.state.centers = None
        self.state.refine_steps = []


    def guidance_layers(self, run) -> list[LayerInfo]:
        reg = run.registry.ordered()
        if self._custom_layers:
            return [i for i in reg if i.name in self.selected_layers]
        level = map_level(run.registry, native_latent_side(run.family.denoiser))
        loss, mask = _official_layers(reg, level, run.family.method_defaults.get("bounded", {}))
        self.state.mask_layers = frozenset(i.name for i in mask)
        return loss

    def resolve(self, run) -> None:
        if self.boxes is not None and run.height and run.width:
            check_box_size(self.boxes, run.height, run.width, int(getattr(run.pipe, "vae_scale_factor", 8)))
        if self._custom_layers:
            self.state.mask_layers = frozenset(
                i.name for i in run.registry if i.name in self.selected_layers and i.block == "up")
        subjects = resolve_subjects(run, self.words)
        s = len(self.words)
        per_sample = []
        for b, subj in enumerate(subjects):
            tokens = run.tokens_of_sample(b)
            taken = {p for pos in subj for p in pos}
            if self.filter_words is None:
                filt = sorted({p for w, ps in zip(tokens.words, tokens.positions) if w.lower() in STOP_WORDS
                               for p in ps} - taken)
            else:
                filt = sorted({p for w in self.filter_words for p in tokens.find(w)} - taken)
            eos = tokens.eos[0]
            labels = torch.zeros(tokens.text_len, dtype=torch.long)
            labels[filt] = _FILTER
            labels[eos] = _EOS
            bits = torch.zeros(tokens.text_len, dtype=torch.long)
            for i, pos in enumerate(subj):
                bits[pos] |= 1 << i
            labels = torch.where(bits > 0, 3 + bits, labels)
            lead = [self._leading(tokens, self.words[i], subj[i]) for i in range(s)]
            per_sample.append({"subjects": subj, "filter": filt, "eos": eos, "labels": labels, "lead": lead})
        self.state.samples = per_sample
        self.state.step_sizes = self.step_size or run.family.method_default("bounded", "step_size", STEP_SIZES)
        if run.num_steps:
            self._schedule(run.num_steps)

    def _schedule(self, total: int) -> None:
        """Guided window and refinement steps for `total` steps (stock pipeline runs learn it late)."""
        if getattr(self.state, "total", None) == total:
            return
        self.state.total = total
        lo, hi = self.steps.bounds(total)
        self.state.guide_window = (lo, min(hi, total))
        start = _resolve_step(self.refine_start, total)
        every = max(1, _resolve_step(self.refine_every, total))
        self.state.refine_steps = list(range(start, total, every)) if self.refine else []

    @staticmethod
    def _leading(tokens, subject, positions: list[int]) -> list[int]:
        last = subject[-1] if isinstance(subject, (list, tuple)) else subject
        if isinstance(last, str):
            return tokens.find(last.split()[-1])
        return [positions[-1]] if isinstance(last, int) else positions

    def text_columns(self, run) -> list[int]:
        cols: set[int] = set()
        for smp in self.state.samples:
            cols.update(p for pos in smp["subjects"] for p in pos)
            cols.add(smp["eos"])
        return sorted(cols)

    # -------------------------------------------------------------------------- masks
    def denoise_active(self, step: int, num_steps: int | None) -> bool:
        return True

    def region_masks(self, grid: tuple[int, int]) -> torch.Tensor:
        """(S, H, W) bool user regions at `grid`: rasterised boxes, or user masks resized nearest-exact
        (a mask smaller than a cell keeps the cell of its centroid, so no region is empty)."""
        if self.boxes is not None:
            return box_masks(self.boxes, grid)
        out = []
        for m in self.masks:
            r = F.interpolate(m[None, None], size=grid, mode="nearest-exact")[0, 0] > 0.5
            if not bool(r.any()):
                ys, xs = torch.nonzero(m > 0.5, as_tuple=True)
                cy = min(int(ys.float().mean() / m.shape[0] * grid[0]), grid[0] - 1)
                cx = min(int(xs.float().mean() / m.shape[1] * grid[1]), grid[1] - 1)
                r[cy, cx] = True
            out.append(r)
        return torch.stack(out)

    def subject_masks(self, grid: tuple[int, int], boxes_only: bool = False) -> torch.Tensor:
        """(B, S, H*W) bool subject masks at `grid`: boxes, or refined masks resized nearest-exact."""
        n = len(self.state.samples)
        if boxes_only or self.state.refined is None:
            return self.region_masks(grid).flatten(1)[None].expand(n, -1, -1)
        m = F.interpolate(self.state.refined.float(), size=grid, mode="nearest-exact")
        return (m > 0.5).flatten(2)

    def regions(self, ctx: CallContext) -> RegionMask | None:
        guidance = ctx.phase == "guidance"
        kind = "self" if ctx.text is None else "cross"
        key = (ctx.grid, kind, guidance, ctx.layout.rows, self.state.version, ctx.hidden_states.device)
        cached = self.state.cache.get(key)
        if cached is not None:
            return cached
        device = ctx.hidden_states.device
        s = self.num_subjects
        bits = subject_bits(self.subject_masks(ctx.grid)).to(device)  # (B_samples, N)
        rows = ctx.layout.rows
        if kind == "self":
            labels = torch.stack([bits[r.sample] for r in rows])
            region = RegionMask(labels, labels, self_table(s, device))
        else:
            open_label = torch.full_like(bits[0], 2**s)
            q = torch.stack([bits[r.sample] if r.cfg == "cond" else open_label for r in rows])
            k = torch.stack([self.state.samples[r.sample]["labels"] for r in rows]).to(device)
            region = RegionMask(q, k, cross_table(s, guidance, self.mask_eos, device))
        self.state.cache[key] = region
        return region

    # ---------------------------------------------------------------------- captures
    def capture_keys(self, ctx: CallContext) -> torch.Tensor | None:
        if ctx.text is not None:
            return self.state.text_cols + ctx.text.start
        inside = self.region_masks(ctx.grid).flatten(1).any(0)
        return torch.nonzero(inside).flatten() + ctx.image.start

    def _collecting(self, step: int) -> bool:
        return bool(self.state.refine_steps) and step < self.state.refine_steps[-1]

    def capture(self, ctx: CallContext) -> torch.Tensor | None:
        if ctx.phase == "guidance":
            return super().capture(ctx)
        if ctx.phase == "denoise" and ctx.layer.name in self.state.mask_layers and self._collecting(ctx.step):
            if ctx.text is not None:
                lead = sorted({p for smp in self.state.samples for pos in smp["lead"] for p in pos})
                return torch.tensor(lead, dtype=torch.long) + ctx.text.start
            return torch.arange(ctx.image.start, ctx.image.stop)
        return None

    def observe(self, ctx: CallContext, probs: torch.Tensor) -> None:
        if ctx.phase == "guidance":
            return super().observe(ctx, probs)
        rows = ctx.layout.cond_rows()
        if not rows:
            return
        p = probs[rows][:, ctx.image].detach().float()
        if self.state.mask_grid is not None and self.state.mask_grid != ctx.grid:
            return  # mask layers share one grid; a different one (custom layers) is ignored
        self.state.mask_grid = ctx.grid
        if ctx.text is not None:
            lead = sorted({q for smp in self.state.samples for pos in smp["lead"] for q in pos})
            col = {q: i for i, q in enumerate(lead)}
            per = []
            for j, r in enumerate(rows):
                smp = self.state.samples[ctx.layout.rows[r].sample]
                per.append(torch.stack([p[j][:, [col[q] for q in pos]].mean(-1) for pos in smp["lead"]], -1))
            value, slot = torch.stack(per), "acc_cross"
        else:
            value, slot = p, "acc_self"
        acc = getattr(self.state, slot)
        if acc is None:
            setattr(self.state, slot, [value, 1])
        else:
            acc[0] += value
            acc[1] += 1

    # ---------------------------------------------------------------------- refinement
    def begin_step(self, run, step: int) -> None:
        if run.num_steps:
            self._schedule(run.num_steps)
        if step in self.state.refine_steps and self.state.acc_self is not None and self.state.acc_cross is not None:
            self.refine_masks()

    def refine_masks(self) -> None:
        """Replace the subject masks by clusters of the mean self-attention (official algorithm)."""
        eps = 1e-5
        grid = self.state.mask_grid
        s = self.num_subjects
        self_maps = self.state.acc_self[0] / self.state.acc_self[1]  # (B, N, N)
        cross = self.state.acc_cross[0] / self.state.acc_cross[1]  # (B, N, S)
        feats = self_maps / (self_maps.amax(dim=1, keepdim=True) + eps)
        k = min(self.clusters_per_subject * s, feats.shape[1])
        gen = torch.Generator().manual_seed(self.seed)
        labels, self.state.centers = kmeans(
            feats, k, n_init=1 if self.state.centers is not None else self.kmeans_inits,
            centers=self.state.centers, generator=gen)
        clusters = F.one_hot(labels, k).float()  # (B, N, C)
        cm = cross / (cross.amax(dim=1, keepdim=True) + eps)
        cm = torch.sigmoid(10.0 * (cm - self.cross_mask_threshold))
        lo, hi = cm.amin(dim=1, keepdim=True), cm.amax(dim=1, keepdim=True)
        cm = (cm - lo) / (hi - lo + eps)
        existing = self.subject_masks(grid).float().to(cm.device)  # (B, S, N)
        cm = cm.transpose(1, 2) * existing
        inter = cm @ clusters  # (B, S, C)
        area = torch.minimum(cm.sum(-1, keepdim=True), clusters.sum(1, keepdim=True)).clamp(min=eps)
        score, subject = (inter / area).max(dim=1)  # (B, C)
        pix_subject = torch.gather(subject, 1, labels)
        pix_score = torch.gather(score, 1, labels)
        masks = torch.stack([(pix_subject == i) & (pix_score >= self.self_mask_threshold) for i in range(s)], 1)
        boxes = self.region_masks(grid).flatten(1).to(masks.device)
        for b in range(masks.shape[0]):
            for j in range(s):
                if not bool(masks[b, j].any()):
                    for o in range(s):
                        masks[b, o] = boxes[j] if o == j else masks[b, o] & ~boxes[j]
        self.state.refined = masks.reshape(masks.shape[0], s, grid[0], grid[1]).cpu()
        self.state.version += 1
        self.state.cache = {}

    # ------------------------------------------------------------------------ guidance
    def loss(self, maps: dict[str, LayerMaps], step: int, iteration: int) -> torch.Tensor:
        s = self.num_subjects
        fg = {"cross": [], "self": []}
        bg = {"cross": [], "self": []}
        for m in maps.values():
            boxes = self.region_masks(m.grid).flatten(1).to(m.probs.device)  # (S, N)
            back = ~boxes.any(0)
            probs = m.probs.float()
            if m.kind == "cross":
                col = {int(q): i for i, q in enumerate(self.state.text_cols.tolist())}
                per_b = []
                for b, smp in enumerate(self.state.samples):
                    ctx_cols = [[col[q] for q in pos] + [col[smp["eos"]]] for pos in smp["subjects"]]
                    per_b.append(torch.stack([probs[b][:, c].sum(-1) for c in ctx_cols]))  # (S, N)
                attn = torch.stack(per_b)  # (B, S, N)
                kind = "cross"
            else:
                inside = torch.nonzero(boxes.any(0)).flatten()
                pos = {int(q): i for i, q in enumerate(inside.tolist())}
                attn = torch.stack([probs[:, :, [pos[int(q)] for q in torch.nonzero(boxes[i]).flatten().tolist()]]
                                    .sum(-1) for i in range(s)], 1)  # (B, S, N)
                kind = "self"
            fg[kind].append((attn * boxes.float()).sum(-1))
            bg[kind].append((attn * back.float()).sum(-1))
        total = None
        for kind, coef in (("cross", self.cross_loss_coef), ("self", self.self_loss_coef)):
            if not fg[kind]:
                continue
            term = bounded_iou_loss(torch.stack(fg[kind]).mean(0), torch.stack(bg[kind]).mean(0), s).sum(-1)
            total = coef * term if total is None else total + coef * term
        return total

    def plan(self, step: int, num_steps: int) -> StepPlan:
        self._schedule(num_steps)
        lo, hi = self.state.guide_window
        start, end = self.state.step_sizes
        alpha = linear_schedule(start, end, max(hi - lo, 1), step - lo)
        return StepPlan(alpha, iterations=self.iterations, target=self.loss_threshold * self.num_subjects,
                        check="after", final_update=False)

    def records(self) -> dict[str, Any]:
        rec = super().records()
        if self.state.refined is not None:
            rec["masks"] = self.state.refined
        return rec


def _check_boxes(boxes) -> list[tuple[float, float, float, float]]:
    if boxes is None or len(boxes) == 0:
        raise ValueError("give one box [x0, y0, x1, y1] (fractions of the image, origin top-left) per subject")
    return check_boxes(boxes, distinct=True)


def _check_masks(masks) -> list[torch.Tensor]:
    if len(masks) == 0:
        raise ValueError("give one mask (2-D array, > 0.5 inside) per subject")
    out = []
    for i, m in enumerate(masks):
        t = torch.as_tensor(np.asarray(m, dtype=np.float32))
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(f"mask {i} must be a non-empty 2-D array, got shape {tuple(t.shape)}")
        validate.finite_tensor(f"mask {i}", t)
        if not bool((t > 0.5).any()):
            raise ValueError(f"mask {i} is empty (no value > 0.5)")
        out.append(t)
    return out


def _resolve_step(value: float | int, total: int) -> int:
    if isinstance(value, float):
        return round(value * total)
    return int(value)


def _official_layers(reg: list[LayerInfo], level: int, defaults: dict[str, Any]) -> tuple[list[LayerInfo],
                                                                                   list[LayerInfo]]:
    """Loss and mask layers by module name, generalised by grid level.

    Official: SD 1.5 module indices 12-19 (loss) = `mid_block` + `up_blocks.1`, 14-19 (masks) =
    `up_blocks.1`; SDXL 70-81 = `up_blocks.0.attentions.0.transformer_blocks.1..6`. Here: the
    decoder layers at the map level (latent/4 on real models, see `guidance.map_level`), plus on
    SD the mid block when it sits one level below; on SDXL (its adapter's `first_attention_blocks`)
    the first such attention, blocks 1-6.
    """
    ups = [i for i in reg if i.block == "up" and i.level == level]
    if not ups:
        raise ValueError(f"BoundedAttention needs decoder attention layers at level {level}")
    blocks = defaults.get("first_attention_blocks")
    if blocks is not None:
        first = min(i.block_index for i in ups)
        head = [i for i in ups if i.block_index == first and i.attention_index == 0]
        loss = [i for i in head if blocks[0] <= i.transformer_index <= blocks[1]] or head
        return loss, loss
    mid = [i for i in reg if i.block == "mid" and i.level == level + 1]
    return mid + ups, ups


__all__ = ["BoundedAttention", "box_masks", "cross_table", "kmeans", "self_table"]
