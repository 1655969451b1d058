"""One latent-guidance engine for Attend-and-Excite, A-STAR and Bounded Attention.

Between denoising steps a `GuidanceControl` runs the denoiser on the conditional rows only, with
attention probabilities captured (with autograd) at the few layers its loss needs, computes a
loss per sample and moves the latents down its gradient. Everything else stays on the fused
attention path, and with `early_exit` the guidance forward stops right after the last needed
layer (on SD1.5 the 32x32 and 64x64 decoder levels are skipped in forward and backward).

Where the updates happen (stock diffusers loops are kept, on `EditPipeline.generate` and on a
stock `pipe(...)` under `attnedit.apply` alike, which are one path):
- the update before step 0 runs in `prepare_latents`, which the controller calls at the first
  denoising forward on the pipeline's own initial latents x_T (scaled, packed), once the schedule
  is final, and feeds the updated latents to that forward and to the pipeline's loop;
- the update before step i + 1 runs in `on_step_end` of step i (`callback_on_step_end`, which
  diffusers calls after the scheduler step, and which the controller composes with the user's own
  callback): the latents it returns are x_{t_{i+1}}, and the guidance pass uses t_{i+1} looked up
  in `scheduler.timesteps`.

Prompt embeddings: the engine encodes the run's prompts itself with the pipeline class's own
`encode_prompt` (bypassing attnedit's wrapper), conditional branch only, plus SDXL's added time
ids for the run's size. This is what the pipeline computes for the cond half when the call
passes plain prompts; calls with user `prompt_embeds` are not supported by guidance.

Per guided step the engine owns: the step-size schedule (`plan`), iterative refinement towards a
per-sample loss target with an iteration cap (samples that reached it get no further updates),
optional gradient clipping (`max_grad_norm`, per sample), and a guard that skips the update of a
sample whose loss, gradient or updated latent is not finite, with a warning (never NaN latents).

Families: SD 1.x/2.x and SDXL (UNet cross-attention maps), SD3 and FLUX (the image-query x
text-key block of the joint attention, every joint layer by default; FLUX's distilled guidance
scale is read from the pipeline, else 3.5). The losses' defaults were calibrated by the authors
on SD 1.x only; on SDXL, SD3 and FLUX they are used as is (experimental). PixArt has no step
callback: guidance raises ValueError before denoising.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .controls import NEEDS_PROMPT, CallContext, Control
from .layers import LayerInfo, LayerRegistry
from .layout import BatchLayout
from .tokens import STOP_WORDS, TokenIndex

if TYPE_CHECKING:
    from .controller import Run

class _StopForward(Exception):
    """Raised inside the guidance forward once every needed map was captured (early exit)."""


@dataclass(frozen=True)
class StepPlan:
    """How one guided step updates the latents.

    - `step_size`: alpha of z <- z - alpha * grad.
    - `iterations`: refinement updates at most (the iteration cap).
    - `target`: per-sample loss at or below which a sample stops refining (None: no refinement).
    - `check`: "before" (A&E: a sample is updated only while its loss is above the target) or
      "after" (Bounded: every computed loss gives an update, then samples under the target stop).
    - `final_update`: one more update after refinement (A&E's normal per-step update).
    """

    step_size: float
    iterations: int = 0
    target: float | None = None
    check: str = "before"
    final_update: bool = True


@dataclass
class LayerMaps:
    """Captured probabilities of one layer in a guidance pass: (B, N_image, C) plus its grid."""

    probs: torch.Tensor
    grid: tuple[int, int]
    kind: str
    keys: torch.Tensor


def resolve_subjects(
    run: Run, subjects: list, *, what: str = "word", forbid_stop_words: bool = True
) -> list[list[list[int]]]:
    """Token positions [sample][subject] -> positions, validating every subject on every prompt.

    A subject is a word or phrase (`"red cat"`), an int token position, or a list of those.
    Raises ValueError naming the prompt's words when a word is absent, and refuses stop words
    (`attnedit.tokens.STOP_WORDS`) as subjects.
    """
    if not subjects:
        raise ValueError(f"give at least one {what} (e.g. {what}s=['cat', 'dog'])")
    n = max(len(run.prompts), 1) * max(run.num_images_per_prompt, 1)
    out: list[list[list[int]]] = []
    for sample in range(n):
        tokens = run.tokens_of_sample(sample)
        row = []
        for subject in subjects:
            items = subject if isinstance(subject, (list, tuple)) else [subject]
            if not items:
                raise ValueError(f"empty {what} entry {subject!r}")
            pos: list[int] = []
            for item in items:
                if isinstance(item, bool) or not isinstance(item, (str, int)):
                    raise ValueError(f"{what}s must be strings or token indices, got {item!r}")
                if isinstance(item, str) and forbid_stop_words:
                    parts = item.lower().split()
                    if parts and all(p in STOP_WORDS for p in parts):
                        raise ValueError(
                            f"{what} {item!r} is a filler word (attnedit.tokens.STOP_WORDS); pick a subject "
                            f"among the prompt's words: {', '.join(_content_words(tokens))}"
                        )
                if isinstance(item, int) and (item in tokens.bos or item in tokens.eos):
                    raise ValueError(f"token index {item} is a start/end token; subject tokens lie in "
                                     f"{_content_range(tokens)}")
                pos.extend(tokens.find(item))
            row.append(sorted(set(pos)))
        out.append(row)
    return out


def _content_words(tokens: TokenIndex) -> list[str]:
    return [w for w in tokens.words if any(c.isalnum() for c in w) and w.lower() not in STOP_WORDS]


def _content_range(tokens: TokenIndex) -> str:
    flat = sorted(p for ps in tokens.positions for p in ps)
    return f"{flat[0]}..{flat[-1]}" if flat else "(none)"


def native_latent_side(denoiser: torch.nn.Module) -> int | None:
    size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if size is None:
        return None
    return int(min(size) if isinstance(size, (list, tuple)) else size)


def map_level(registry: LayerRegistry, native: int | None) -> int:
    """The UNet level whose cross maps the guidance losses read.

    The coarsest level with cross-attention whose grid at the model's native size is at least
    min(16, native latent side): latent/4 on SD1.x/2.x (16x16 at 512 px, 24x24 at 768 px) and
    SDXL (32x32 at 1024 px), the P2P convention of the papers; level 0 on 64-px testbed models
    whose latent/4 grid would be 2x2.
    """
    levels = sorted({i.level for i in registry if i.kind == "cross"})
    if not levels:
        raise ValueError("this model has no cross-attention layers")
    if native is None:
        return 2 if 2 in levels else levels[-1]
    want = min(16, native)
    ok = [lv for lv in levels if -(-native // (2**lv)) >= want]
    return max(ok) if ok else min(levels)


def default_map_layers(registry: LayerRegistry, native: int | None) -> list[LayerInfo]:
    """Layers whose text maps the A&E / A-STAR losses average: UNet cross layers at `map_level`;
    every cross / joint layer of a DiT (ours: no published choice exists)."""
    if registry.per_level:
        level = map_level(registry, native)
        return [i for i in registry.ordered() if i.kind == "cross" and i.level == level]
    return [i for i in registry.ordered() if i.kind in ("cross", "joint")]


def mean_map(maps: dict[str, LayerMaps], names: list[str] | None = None) -> torch.Tensor:
    """Mean over layers of captured maps as (B, H, W, C), resized (bilinear) to the largest grid."""
    picked = [maps[n] for n in (names if names is not None else list(maps))]
    if not picked:
        raise RuntimeError("no attention maps were captured in the guidance pass")
    target = max((m.grid for m in picked), key=lambda g: g[0] * g[1])
    acc = None
    for m in picked:
        b, _, c = m.probs.shape
        x = m.probs.float().reshape(b, m.grid[0], m.grid[1], c)
        if m.grid != target:
            x = F.interpolate(x.permute(0, 3, 1, 2), size=target, mode="bilinear", align_corners=False)
            x = x.permute(0, 2, 3, 1)
        acc = x if acc is None else acc + x
    return acc / len(picked)


class GuidanceControl(Control):
    """Base class of latent-guidance methods (subclasses define the loss and the schedule).

    Subclasses implement `resolve(run)` (validate inputs, find tokens), `guidance_layers(run)`
    (where to capture), `capture_keys(ctx)` (which keys), `loss(maps, step, iteration)` ->
    per-sample losses (B,), and `plan(step, num_steps)` -> `StepPlan`. `steps` selects the guided
    steps (ints or fractions of the schedule). Options shared by all: `max_grad_norm` (clip each
    sample's latent gradient to this L2 norm; None = off, as in the papers) and `early_exit`.
    """

    phases = ("denoise", "guidance")
    requires = ("step_callback", "text_maps")
    unsupported = "its pipelines have no step callback, so the latents cannot be updated between steps"

    def __init__(self, *, max_grad_norm: float | None = None, early_exit: bool = True, layers=None, steps=None) -> None:
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self.early_exit = bool(early_exit)
        self._custom_layers = layers is not None
        super().__init__(layers=layers, steps=steps)

    # ------------------------------------------------------------------- subclass interface
    def resolve(self, run: Run) -> None:
        """Validate options against the prompts and model (raise ValueError)."""

    def guidance_layers(self, run: Run) -> list[LayerInfo]:
        """`layers=` when given (its cross/joint layers), else `default_map_layers`."""
        if self._custom_layers:
            chosen = self.selected_layers
            return [i for i in run.registry.ordered() if i.name in chosen and i.kind in ("cross", "joint")]
        return default_map_layers(run.registry, native_latent_side(run.family.denoiser))

    def capture_keys(self, ctx: CallContext) -> torch.Tensor | None:
        """Keys whose probabilities the loss needs at this layer (text positions by default)."""
        if ctx.text is None:
            return None
        return self.state.text_cols + ctx.text.start

    def text_columns(self, run: Run) -> list[int]:
        """Text positions to capture at the guidance layers (override)."""
        return []

    def loss(self, maps: dict[str, LayerMaps], step: int, iteration: int) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, step: int, num_steps: int) -> StepPlan:
        raise NotImplementedError

    def after_guided_step(self, step: int) -> None:
        """Called once a guided step's update is done (A-STAR updates its retention masks)."""

    def denoise_active(self, step: int, num_steps: int | None) -> bool:
        """Whether the control joins normal denoising forwards (Bounded's masks); off by default."""
        return False

    # ------------------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        super().reset()
        self.state.in_pass = False
        self.state.maps = {}
        self.state.cond = None
        self.state.log = []
        self.state.text_cols = torch.zeros(0, dtype=torch.long)

    def setup(self, run: Run) -> None:
        fam = run.family
        layers = self.guidance_layers(run)
        if not layers:
            raise ValueError(
                f"{type(self).__name__} needs cross-attention maps and this {fam.label} model has no layer "
                "that provides them"
            )
        self.state.layer_names = [i.name for i in layers]
        self.state.layer_set = frozenset(self.state.layer_names)
        self.resolve(run)
        self.state.text_cols = torch.tensor(sorted(set(self.text_columns(run))), dtype=torch.long)
        self.state.run = run

    def selects(self, layer: LayerInfo) -> bool:
        return True  # which layers capture is decided per call (`capture`)

    def check_steps(self, run: Run) -> None:
        if type(self).denoise_active is not GuidanceControl.denoise_active:
            return  # it also acts in every denoising forward (Bounded's masks), whatever the guided window
        super().check_steps(run)

    def active(self, step: int, num_steps: int | None, phase: str) -> bool:
        if phase == "guidance":
            return bool(self.state.in_pass)
        if phase == "denoise":
            return self.denoise_active(step, num_steps)
        return False

    def guided(self, step: int, num_steps: int | None) -> bool:
        return self.steps.active(step, num_steps)

    # ----------------------------------------------------------------------------- hooks
    def capture(self, ctx: CallContext) -> torch.Tensor | None:
        if ctx.phase == "guidance" and ctx.layer.name in self.state.layer_set:
            return self.capture_keys(ctx)
        return None

    def observe(self, ctx: CallContext, probs: torch.Tensor) -> None:
        if ctx.phase != "guidance" or ctx.layer.name not in self.state.layer_set:
            return
        keys = self.capture_keys(ctx)
        self.state.maps[ctx.layer.name] = LayerMaps(probs[:, ctx.image], ctx.grid, ctx.layer.kind, keys)
        if self.early_exit and len(self.state.maps) == len(self.state.layer_set):
            raise _StopForward

    def prepare_latents(self, run: Run, latents: torch.Tensor) -> torch.Tensor:
        if not self.guided(0, run.num_steps):
            return latents
        return self.guide(run, latents, 0)

    def on_step_end(self, run: Run, step: int, timestep, tensors: dict[str, torch.Tensor]) -> dict:
        nxt = step + 1
        total = len(run.pipe.scheduler.timesteps)
        if nxt >= total or not self.guided(nxt, run.num_steps or total):
            return {}
        return {"latents": self.guide(run, tensors["latents"], nxt)}

    # ----------------------------------------------------------------------------- engine
    def guide(self, run: Run, latents: torch.Tensor, step: int) -> torch.Tensor:
        """The pre-step update of step `step` applied to x_t (returns new latents, same dtype)."""
        total = len(run.pipe.scheduler.timesteps)
        plan = self.plan(step, run.num_steps or total)
        if self.state.cond is None:
            self.state.cond = encode_condition(run, latents)
        z = latents.detach()
        b = z.shape[0]
        loss, grad = self._loss_grad(run, z, step, 0)
        first = loss.clone()
        n_fwd, n_upd = 1, torch.zeros(b, dtype=torch.long)
        if plan.iterations and plan.target is not None:
            if plan.check == "before":
                live = loss > plan.target
                while bool(live.any()) and int(n_upd.max()) < plan.iterations:
                    z = self._apply(z, loss, grad, plan.step_size, live, step)
                    n_upd += live.long()
                    loss, grad = self._loss_grad(run, z, step, n_fwd)
                    n_fwd += 1
                    live = live & (loss > plan.target)
            else:
                live = torch.ones(b, dtype=torch.bool)
                for it in range(plan.iterations):
                    if it:
                        loss, grad = self._loss_grad(run, z, step, n_fwd)
                        n_fwd += 1
                    z = self._apply(z, loss, grad, plan.step_size, live, step)
                    n_upd += live.long()
                    live = live & (loss > plan.target)
                    if not bool(live.any()):
                        break
        if plan.final_update:
            z = self._apply(z, loss, grad, plan.step_size, torch.ones(b, dtype=torch.bool), step)
            n_upd += 1
        self.after_guided_step(step)
        self.state.log.append({
            "step": step,
            "loss": [round(float(v), 6) for v in first],
            "last_loss": [round(float(v), 6) for v in loss],
            "forwards": n_fwd,
            "updates": n_upd.tolist(),
            "step_size": plan.step_size,
        })
        return z.to(latents.dtype)

    def _apply(self, z, loss, grad, alpha, live, step) -> torch.Tensor:
        """z - alpha * grad for the `live` samples, clipped, skipping non-finite samples."""
        b, dev = z.shape[0], z.device
        shape = (-1, *[1] * (z.dim() - 1))
        g = grad.float()
        finite = torch.isfinite(g).reshape(b, -1).all(1).cpu() & torch.isfinite(loss.float().cpu()).reshape(b)
        g = torch.where(finite.to(dev).view(shape), g, torch.zeros_like(g))
        if self.max_grad_norm is not None:
            norms = g.reshape(b, -1).norm(dim=1)
            g = g * (self.max_grad_norm / norms.clamp(min=1e-12)).clamp(max=1.0).view(shape)
        keep = (live.cpu() & finite).to(dev).view(shape)
        new = z.float() - alpha * g * keep
        ok = torch.isfinite(new).reshape(b, -1).all(1).cpu()
        bad = ~(finite & ok)
        if bool(bad.any()):
            self._warn(step, [i for i in range(b) if bool(bad[i])])
        new = torch.where(ok.to(dev).view(shape), new, z.float())
        return new.to(z.dtype)

    def _warn(self, step: int, samples: list[int]) -> None:
        self.state.log.append({"step": step, "skipped_non_finite": samples})
        warnings.warn(
            f"{type(self).__name__}: non-finite loss or gradient at step {step} for sample(s) {samples}; "
            "their latent update was skipped",
            RuntimeWarning,
            stacklevel=3,
        )

    def _loss_grad(self, run: Run, z: torch.Tensor, step: int, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        zz = z.detach().requires_grad_(True)
        with torch.enable_grad():
            maps = self.capture_pass(run, zz, step)
            loss = self.loss(maps, step, iteration)
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), zz, allow_unused=True)
            else:
                grad = None
        if grad is None:
            grad = torch.zeros_like(zz)
        self.state.maps = {}
        return loss.detach().float().cpu(), grad.detach()

    def capture_pass(self, run: Run, z: torch.Tensor, step: int) -> dict[str, LayerMaps]:
        """One cond-only forward at step `step` capturing the guidance layers' maps."""
        t = run.pipe.scheduler.timesteps[step]
        b = z.shape[0]
        self.state.maps = {}
        self.state.in_pass = True
        try:
            with run.pass_phase("guidance", layout=BatchLayout.standard(b, cfg=False), step=step):
                try:
                    denoise(run, z, t, self.state.cond)
                except _StopForward:
                    pass
        finally:
            self.state.in_pass = False  # pass_phase restored the step fields
        missing = [n for n in self.state.layer_names if n not in self.state.maps]
        if missing:
            raise RuntimeError(f"guidance pass did not reach layer(s) {missing[:3]}")
        return self.state.maps

    def records(self) -> dict[str, Any]:
        log = getattr(self.state, "log", None)
        return {"guidance": list(log)} if log else {}


TOKEN_MODES = ("prompt", "ae", "subjects")


class TextMapGuidance(GuidanceControl):
    """Shared by A&E and A-STAR: subject words -> per-word maps (B, S, H, W) from the text maps.

    Maps are the mean over the guidance layers and heads, softmaxed over the prompt's tokens at
    temperature 0.01 (x100, A&E). `token_mode="prompt"` (default) softmaxes over the prompt's own
    tokens, excluding the start token, the end token and padding (helps SD 2.x, A&E issue #14);
    `"ae"` reproduces the diffusers A&E slice `1:-1` (SD/SDXL only); `"subjects"` (ours) softmaxes over
    the subjects' own tokens only, for models where an object's adjective outweighs its noun: at x100 the
    noun's map is then ~0 on its own object, and exciting it fights the object's colour (measured on the
    testbed, `benchmarks/results/quality_multisubject.md`). A word of several tokens uses
    the sub-token with the highest smoothed peak (`subtoken="max"`, the authors' advice) or the
    mean of its sub-token maps (`"mean"`). Smoothing is A&E's 3x3 Gaussian (`kernel="ae"`).
    """

    def __init__(
        self,
        *,
        words: list,
        token_mode: str = "prompt",
        subtoken: str = "max",
        smooth: bool = True,
        kernel: str = "ae",
        max_grad_norm: float | None = None,
        early_exit: bool = True,
        layers=None,
        steps=None,
    ) -> None:
        if isinstance(words, (str, int)):
            words = [words]
        self.words = list(words or [])
        if not self.words:
            raise ValueError("give the subject words, e.g. words=['cat', 'dog']")
        if token_mode not in TOKEN_MODES:
            raise ValueError(f"token_mode must be one of {', '.join(TOKEN_MODES)}, got {token_mode!r}")
        if token_mode == "subjects" and len(self.words) < 2:
            raise ValueError(f"token_mode='subjects' needs at least two subject words, got {self.words}: with one, "
                             "its softmax is 1 everywhere and the guidance would do nothing; use 'prompt'")
        if subtoken not in ("max", "mean"):
            raise ValueError(f"subtoken must be 'max' or 'mean', got {subtoken!r}")
        if kernel not in ("ae", "standard"):
            raise ValueError(f"kernel must be 'ae' or 'standard', got {kernel!r}")
        self.token_mode = token_mode
        self.subtoken = subtoken
        self.smooth = bool(smooth)
        self.kernel = kernel
        super().__init__(max_grad_norm=max_grad_norm, early_exit=early_exit, layers=layers, steps=steps)

    def resolve(self, run: Run) -> None:
        segments = run.family.text_segments(run.max_sequence_length)
        if self.token_mode == "ae" and not (len(segments) == 1 and segments[0].has_bos):
            raise ValueError("token_mode='ae' (the A&E 1:-1 slice) needs one CLIP text sequence with start and end "
                             f"tokens (SD 1.x/2.x, SDXL), which {run.family.label} does not have; use 'prompt'")
        self.state.subjects = resolve_subjects(run, self.words)
        n = len(self.state.subjects)
        sets = []
        for sample in range(n):
            tokens = run.tokens_of_sample(sample)
            if self.token_mode == "ae":
                sets.append(list(range(1, tokens.text_len - 1)))
            elif self.token_mode == "subjects":
                sets.append(sorted({p for pos in self.state.subjects[sample] for p in pos}))
            else:
                sets.append(sorted({p for ps in tokens.positions for p in ps}))
        self.state.softmax_sets = sets

    def text_columns(self, run: Run) -> list[int]:
        cols = sorted({p for s in self.state.softmax_sets for p in s})
        index = {p: i for i, p in enumerate(cols)}
        keep = torch.zeros(len(self.state.softmax_sets), len(cols), dtype=torch.bool)
        for b, s in enumerate(self.state.softmax_sets):
            keep[b, [index[p] for p in s]] = True
        self.state.keep = keep
        self.state.col_of = index
        return cols

    def word_maps(self, maps: dict[str, LayerMaps]) -> torch.Tensor:
        """(B, S, H, W) per-word probability maps (softmaxed, smoothed, sub-token chosen)."""
        from .losses import gaussian_smooth, token_softmax

        a = mean_map(maps, self.state.layer_names)
        keep = self.state.keep.to(a.device)[:, None, None, :]
        p = token_softmax(a, keep)
        out = []
        for b, subjects in enumerate(self.state.subjects):
            row = []
            for pos in subjects:
                m = p[b, :, :, [self.state.col_of[q] for q in pos]].permute(2, 0, 1)
                if self.smooth:
                    m = gaussian_smooth(m, kind=self.kernel)
                if m.shape[0] > 1:
                    m = m[int(m.flatten(1).amax(1).argmax())] if self.subtoken == "max" else m.mean(0)
                else:
                    m = m[0]
                row.append(m)
            out.append(torch.stack(row))
        return torch.stack(out)


# ------------------------------------------------------------------------- denoiser calls
def encode_condition(run: Run, latents: torch.Tensor) -> dict[str, Any]:
    """Cond-branch denoiser kwargs of the run's prompts, as the pipeline computes them (the family's adapter)."""
    if not run.prompts:
        raise ValueError(NEEDS_PROMPT.format(name="latent guidance"))
    grid = run.forward.image_grid or (int(latents.shape[-2]), int(latents.shape[-1]))
    return run.family.encode_condition(run.prompts, max(run.num_images_per_prompt, 1), height=run.height,
                                       width=run.width, image_grid=grid, max_sequence_length=run.max_sequence_length,
                                       options=run.text_options)


def denoise(run: Run, z: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> Any:
    """Call the denoiser on latents `z` at timestep `t` as the pipeline's loop does (cond rows)."""
    return run.family.denoise(z, t, cond)


__all__ = [
    "GuidanceControl",
    "LayerMaps",
    "StepPlan",
    "TextMapGuidance",
    "default_map_layers",
    "denoise",
    "encode_condition",
    "map_level",
    "mean_map",
    "resolve_subjects",
]
