"""A-STAR (Agarwal et al., ICCV 2023): attention segregation and retention by latent guidance.

The paper adds two test-time losses on the subject words' cross-attention maps: a segregation loss
that penalises the overlap of every pair of concept maps (sum min / sum of both, Eq. 2) and a
retention loss that keeps each concept's map on a binarised copy of its previous-step map (Eq. 3);
their sum moves the latent before each step. No official code exists, so everything beyond the
two formulas is attnedit's choice: maps as in A&E (mean
over the latent/4 cross layers and heads, x100 softmax over the prompt's tokens, A&E Gaussian),
each concept min-max scaled to [0, 1] before both losses, retention masks = (map > 0.5) of the
previous guided step (always detached, none at the first guided step), step size A&E's
20 * sqrt(linspace(1, 0.5, T)[i]), guided steps the first half, losses weighted 1:1, no
iterative refinement unless `refine_target` is set (then up to `max_refinement` updates until
the loss is at most that value). Layout mode (paper Sec. 5): `retention_masks={word: mask}`
replaces the previous-step masks of those words by user masks at every guided step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..controls import Example, register
from ..guidance import LayerMaps, StepPlan, TextMapGuidance
from ..losses import ae_step_size, minmax, retention_loss, segregation_loss
from ..selectors import Steps


@register
class AStar(TextMapGuidance):
    """A-STAR guidance on the concept `words` (at least two for segregation).

    >>> astar = attnedit.AStar(words=["cat", "dog"])
    >>> result = pipe("a cat and a dog", controls=[astar], seed=0, steps=50)

    Options: `threshold` binarises the previous-step maps (0.5 of the min-max map), `scale_factor`
    and `scale_range` give the step size, `retention_masks` maps a word (or its index in
    `words`) to a user mask (2-D, any size, resized nearest to the map grid, > 0.5 = inside),
    `refine_target` / `max_refinement` turn on A&E-style refinement with the A-STAR loss,
    `steps` the guided steps (default first half).
    """

    name = "astar"

    @classmethod
    def example(cls) -> Example:
        return Example(options={"words": ["circle", "square"]})

    def __init__(
        self,
        *,
        words: list,
        threshold: float = 0.5,
        scale_factor: float = 20.0,
        scale_range: tuple[float, float] = (1.0, 0.5),
        retention_masks: dict | None = None,
        refine_target: float | None = None,
        max_refinement: int = 20,
        token_mode: str = "prompt",
        subtoken: str = "max",
        smooth: bool = True,
        kernel: str = "ae",
        max_grad_norm: float | None = None,
        early_exit: bool = True,
        layers=None,
        steps=None,
    ) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if scale_factor < 0:
            raise ValueError(f"scale_factor must be >= 0, got {scale_factor}")
        self.threshold = float(threshold)
        self.scale_factor = float(scale_factor)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.retention_masks = dict(retention_masks or {})
        self.refine_target = None if refine_target is None else float(refine_target)
        self.max_refinement = int(max_refinement)
        super().__init__(words=words, token_mode=token_mode, subtoken=subtoken, smooth=smooth, kernel=kernel,
                         max_grad_norm=max_grad_norm, early_exit=early_exit, layers=layers, steps=steps)
        self._user_masks = {}
        for key, mask in self.retention_masks.items():
            idx = key if isinstance(key, int) and not isinstance(key, bool) else None
            if idx is None:
                if key not in self.words:
                    raise ValueError(f"retention mask for {key!r}, which is not one of the words {self.words}")
                idx = self.words.index(key)
            elif not 0 <= idx < len(self.words):
                raise ValueError(f"retention mask index {idx} outside the {len(self.words)} words")
            m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
            if m.dim() != 2 or m.numel() == 0:
                raise ValueError(f"retention mask for {key!r} must be a non-empty 2-D array, got {tuple(m.shape)}")
            if not bool((m > 0.5).any()):
                raise ValueError(f"retention mask for {key!r} is empty (no value > 0.5)")
            self._user_masks[idx] = m

    def default_steps(self) -> Steps:
        return Steps(0, 0.5)

    def reset(self) -> None:
        super().reset()
        self.state.prev = None  # (B, S, H, W) bool masks from the previous guided step
        self.state.current = None
        self.state.history = {}  # guided step -> (B, S, H, W) bool masks made at that step

    def concept_maps(self, maps: dict[str, LayerMaps]) -> torch.Tensor:
        """(B, S, H, W) smoothed, min-max scaled concept maps."""
        return minmax(self.word_maps(maps))

    def _masks(self, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h, w = shape
        masks = torch.zeros(shape, device=device)
        weights = torch.zeros(b, s, device=device)
        prev = self.state.prev
        if prev is not None and tuple(prev.shape) == tuple(shape):
            masks = prev.to(device, torch.float32)
            weights[:] = 1.0
        for idx, m in self._user_masks.items():
            r = F.interpolate(m[None, None], size=(h, w), mode="nearest-exact")[0, 0] > 0.5
            masks[:, idx] = r.to(device, torch.float32)
            weights[:, idx] = 1.0
        return masks, weights

    def loss(self, maps: dict[str, LayerMaps], step: int, iteration: int) -> torch.Tensor:
        cm = self.concept_maps(maps)
        if iteration == 0:
            self.state.current = cm.detach()
        masks, weights = self._masks(tuple(cm.shape), cm.device)
        seg = segregation_loss(cm) if cm.shape[1] > 1 else cm.new_zeros(cm.shape[0])
        return seg + retention_loss(cm, masks, weights)

    def after_guided_step(self, step: int) -> None:
        if self.state.current is not None:
            self.state.prev = self.state.current > self.threshold
            self.state.history[step] = self.state.prev.cpu()

    def plan(self, step: int, num_steps: int) -> StepPlan:
        alpha = ae_step_size(self.scale_factor, step, num_steps, self.scale_range)
        if self.refine_target is not None and self.max_refinement > 0:
            return StepPlan(alpha, iterations=self.max_refinement, target=self.refine_target, check="before")
        return StepPlan(alpha)

    def records(self) -> dict[str, Any]:
        rec = super().records()
        if rec and self.state.prev is not None:
            rec["retention_masks"] = self.state.prev.cpu()
            rec["retention_masks_per_step"] = dict(self.state.history)  # for visualising masks over steps
        return rec


__all__ = ["AStar"]
