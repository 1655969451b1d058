"""ToMe-style bipartite soft matching on a 2-D token grid (used by Agent Attention and ToDo's options).

Token Merging for Stable Diffusion (Bolya & Hoffman, arXiv 2303.17604; repo dbolya/tomesd) splits the
tokens of a block into destinations (one per sy x sx cell) and sources, lets every source pick its most
similar destination (cosine similarity), and merges the r most similar sources into their destination
by averaging; "unmerge" copies each destination's output back to the sources merged into it.
attnedit writes the same algorithm from scratch (no tomesd dependency) with three differences:
grids come from the layer registry, so odd and non-square grids work (destinations are placed per
*full* cell, tokens of partial border cells stay sources); one random partition is drawn per call
for the whole batch from the caller's generator (cond and uncond rows always share it, whatever the
batch size), and several merge sizes can be planned from that one partition and ranking; and
callers validate their token counts beforehand (Agent Attention refuses more agents
than tokens instead of clipping silently).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__: list[str] = []  # helpers only; the controls using them are exported by their own files


def grid_partition(
    grid: tuple[int, int],
    sy: int,
    sx: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dst, src) flat token indices of a row-major `grid` split into sy x sx cells.

    Each full cell holds one destination (top-left, or a random position per cell when a
    `generator` is given); every other token, partial border cells included, is a source.

    >>> dst, src = grid_partition((3, 5), 2, 2)
    >>> dst.tolist()
    [0, 2]
    """
    h, w = grid
    if sy < 1 or sx < 1:
        raise ValueError(f"cell size must be >= 1, got sy={sy}, sx={sx}")
    ch, cw = h // sy, w // sx
    if generator is not None and ch * cw > 0:
        off = torch.randint(0, sy * sx, (ch, cw), generator=generator, device=generator.device)
        off = off.to(device)
        oy, ox = off // sx, off % sx
    else:
        oy = torch.zeros(ch, cw, dtype=torch.long, device=device)
        ox = torch.zeros(ch, cw, dtype=torch.long, device=device)
    cy = torch.arange(ch, device=device)[:, None] * sy
    cx = torch.arange(cw, device=device)[None, :] * sx
    dst = ((cy + oy) * w + (cx + ox)).flatten()
    is_dst = torch.zeros(h * w, dtype=torch.bool, device=device)
    is_dst[dst] = True
    src = torch.nonzero(~is_dst).flatten()
    return dst, src


@dataclass
class Merge:
    """One bipartite matching: `merge` (B, N, ...) -> (B, N - r, ...), `unmerge` back to N tokens.

    Merged order is [unmerged sources | destinations]. Index tensors are (B, .) because every batch
    row matches its own tokens (only the partition is shared).
    """

    n: int
    dst: torch.Tensor  # (Nd,) flat positions of destinations
    src: torch.Tensor  # (Ns,) flat positions of sources
    unm: torch.Tensor  # (B, Ns - r) indices into src of the sources kept
    merged: torch.Tensor  # (B, r) indices into src of the sources merged away
    target: torch.Tensor  # (B, r) index into dst each merged source goes to

    @property
    def r(self) -> int:
        return int(self.merged.shape[1])

    @property
    def out_len(self) -> int:
        return self.n - self.r

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """Average every merged source into its destination (B, N, *F) -> (B, N - r, *F)."""
        b = x.shape[0]
        feat = x.shape[2:]
        flat = x.reshape(b, self.n, -1)
        c = flat.shape[-1]
        src = flat[:, self.src]
        dst = flat[:, self.dst]
        keep = src.gather(1, self.unm.unsqueeze(-1).expand(-1, -1, c))
        if self.r:
            moved = src.gather(1, self.merged.unsqueeze(-1).expand(-1, -1, c))
            idx = self.target.unsqueeze(-1).expand(-1, -1, c)
            dst = dst.scatter_reduce(1, idx, moved, reduce="mean", include_self=True)
        return torch.cat([keep, dst], dim=1).reshape(b, self.out_len, *feat)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N - r, *F) -> (B, N, *F): each merged source receives its destination's value."""
        b = y.shape[0]
        feat = y.shape[2:]
        flat = y.reshape(b, self.out_len, -1)
        c = flat.shape[-1]
        n_unm = self.unm.shape[1]
        keep, dst = flat[:, :n_unm], flat[:, n_unm:]
        out = flat.new_zeros(b, self.n, c)
        out[:, self.dst] = dst
        src_pos = self.src[self.unm]  # (B, Ns - r)
        out.scatter_(1, src_pos.unsqueeze(-1).expand(-1, -1, c), keep)
        if self.r:
            moved = dst.gather(1, self.target.unsqueeze(-1).expand(-1, -1, c))
            pos = self.src[self.merged]
            out.scatter_(1, pos.unsqueeze(-1).expand(-1, -1, c), moved)
        return out.reshape(b, self.n, *feat)


def bipartite_soft_matching(
    metric: torch.Tensor,
    grid: tuple[int, int],
    sy: int,
    sx: int,
    r: int | Sequence[int],
    *,
    generator: torch.Generator | None = None,
) -> Merge | list[Merge]:
    """Match `metric` (B, N, C) tokens on `grid` and plan merging r of them.

    `r` is capped at the number of sources (tomesd's behaviour); callers that need an exact count
    validate it beforehand (Agent Attention does). Cosine similarity in float32. A sequence of r
    gives one plan per value from *one* partition and one ranking of the sources (AgentSD merges
    its tokens and its agents that way: the agents' merged sources are a superset of the tokens').
    """
    b, n, _ = metric.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
    many = not isinstance(r, int)
    rs = list(r) if many else [r]
    if any(x < 0 for x in rs):
        raise ValueError(f"the number of tokens to merge must be >= 0, got {r}")
    dst, src = grid_partition(grid, sy, sx, generator=generator, device=metric.device)
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, src] @ m[:, dst].transpose(1, 2)  # (B, Ns, Nd)
    if dst.numel():
        best, best_idx = scores.max(dim=-1)
    else:
        best = scores.new_zeros(b, src.numel())
        best_idx = torch.zeros(b, src.numel(), dtype=torch.long, device=metric.device)
    order = best.argsort(dim=-1, descending=True, stable=True)
    plans = []
    for x in rs:
        x = min(x, src.numel()) if dst.numel() else 0
        merged, unm = order[:, :x], order[:, x:]
        plans.append(Merge(n=n, dst=dst, src=src, unm=unm, merged=merged, target=best_idx.gather(1, merged)))
    return plans if many else plans[0]
