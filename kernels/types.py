"""Plain descriptions of the attention variants the controls ask for.

Kernels know nothing about diffusers: a control describes *what* attention it needs with these
small dataclasses (O(N + M) memory at most), and `attnedit.kernels.attention` picks a backend
(PyTorch reference, Triton) that computes it. Tensors are BSHD: (batch, sequence, heads, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RegionMask:
    """Attention allowed between region labels, instead of a dense N x M mask.

    `q_labels` (B, Nq) and `k_labels` (B, Nk) hold small non-negative ints; query i of row b may
    attend key j iff `allowed[b, q_labels[b, i], k_labels[b, j]]` (or `allowed[...]` without the
    batch index when `allowed` is (R, R)). A query row with no allowed key outputs zeros (the
    kernels and the reference agree on that; callers make sure it does not happen when it matters).
    """

    q_labels: torch.Tensor
    k_labels: torch.Tensor
    allowed: torch.Tensor

    def __post_init__(self) -> None:
        if self.q_labels.dim() != 2 or self.k_labels.dim() != 2:
            raise ValueError("RegionMask labels must be (batch, tokens) integer tensors")
        if self.allowed.dim() not in (2, 3) or self.allowed.shape[-1] != self.allowed.shape[-2]:
            raise ValueError("RegionMask.allowed must be (R, R) or (batch, R, R)")

    @property
    def num_regions(self) -> int:
        return int(self.allowed.shape[-1])

    def dense(self) -> torch.Tensor:
        """(B, 1, Nq, Nk) bool mask: for tests and the small-size PyTorch path only."""
        table = self.allowed if self.allowed.dim() == 3 else self.allowed.unsqueeze(0)
        table = table.expand(self.q_labels.shape[0], -1, -1)
        rows = torch.gather(
            table, 1, self.q_labels.long().unsqueeze(-1).expand(-1, -1, table.shape[-1])
        )  # (B, Nq, R)
        dense = torch.gather(rows, 2, self.k_labels.long().unsqueeze(1).expand(-1, rows.shape[1], -1))
        return dense.unsqueeze(1).bool()


@dataclass(frozen=True)
class KVDownsample:
    """ToDo: keys/values of the image tokens are resampled on their 2D grid by `factor`.

    Image tokens occupy `[start, start + grid[0] * grid[1])` of the key sequence, row-major; the
    tokens before and after (text) are kept. The output grid is ceil(h / fh) x ceil(w / fw).
    `mode`: "nearest" (first token of each cell), "nearest-exact" (token f//2 of each cell
    along each axis: torch's `interpolate(mode="nearest-exact")` wherever f divides the grid; a
    partial border cell reads its last token if f//2 falls outside it), "avg" (mean of the cell,
    partial cells at the border averaged over their valid tokens), "bilinear".
    """

    grid: tuple[int, int]
    factor: tuple[int, int]
    mode: str = "nearest-exact"
    start: int = 0

    @property
    def out_grid(self) -> tuple[int, int]:
        h, w = self.grid
        fh, fw = self.factor
        return (-(-h // fh), -(-w // fw))


@dataclass(frozen=True)
class LocalWindow:
    """CLEAR: image query (y, x) sees image keys with (dy^2 + dx^2) < radius^2; text is global.

    The sequence is `[text (text_len) | image (grid, row-major)]` when `text_first`, else
    `[image | text]`. Text queries see every key, every query sees every text key.
    """

    grid: tuple[int, int]
    radius: float
    text_len: int = 0
    text_first: bool = True
