"""Agent Attention, training-free Stable Diffusion form (Han et al., ECCV 2024, arXiv 2312.08874).

AgentSD replaces the top-level self-attention of the UNet, in the early steps, by two softmax
attentions through n << N "agent" tokens obtained by ToMe merging: agents (in query space) first
aggregate the keys/values, then every query reads from the agents, with a sharper second
temperature d^(-0.5 k_scale2) and a value shortcut k_shortcut * V; the whole block runs on
ToMe-merged tokens and is unmerged afterwards. Differences from the official code
(LeapLabTHU/Agent-Attention `agentsd/`): it runs inside attnedit's attention processor instead of
swapping block classes, so other processors and flash attention keep working and diffusers
pipelines are supported; the matching metric is the post-norm hidden state the processor sees
(the official code uses the same, taken before the block's norm); the merging is attnedit's own
(`methods/merge.py`): as in the official code, the tokens and the agents come from one partition and
one ranking of the sources (two merge sizes), drawn once per call and layer for the whole batch and
seeded from (seed, step, layer name) so it never depends on call order; "top level" means the
highest-resolution level with attention (works on SDXL); after the schedule's window the layer
runs plain attention (the official late steps run pure ToMe, which `agent_ratio` <= 0.5 with a
second control reproduces); DiTs are supported on image tokens, text tokens staying ordinary
unmerged keys; impossible settings (more agents than tokens) raise instead of silently clipping.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

import torch

from .. import kernels
from ..controls import CallContext, Control, Example, register
from ..selectors import Select, Steps
from .merge import bipartite_soft_matching

if TYPE_CHECKING:
    from ..controller import Run

__all__ = ["AgentAttention"]


def _check_ratio(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_cell(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


@register
class AgentAttention(Control):
    """Agent attention on ToMe-merged tokens (published SD schedule by default).

    - `ratio`: share of tokens merged away before attention (ToMe), in [0, 1).
    - `agent_ratio`: share merged away to form the agents (n = N - int(N * agent_ratio), at least
      the number of sy x sx cells); or `num_agents` to ask for an exact count.
    - `sx`, `sy`: cell size of the bipartite partition; `random`: random destination per cell.
    - `k_scale2`, `k_shortcut`: second-softmax temperature exponent and value shortcut (official).
    - `fp32`: compute both attentions in float32 (needed on SD 2.x in half precision).
    - Default window: the first 40 % of the steps (the published 20 of 50), top attention level.
    - When 2 n >= N_f (agents not fewer than half the merged tokens) the layer runs ToMe attention
      only, as the official code; on DiTs N_f counts the text tokens too (they are keys of both softmaxes).

    >>> pipe = attnedit.load("tiny-sd")
    >>> result = pipe("a red circle", controls=[attnedit.AgentAttention()])
    """

    name = "agent"

    @classmethod
    def example(cls) -> Example:
        return Example()

    def __init__(
        self,
        ratio: float = 0.4,
        agent_ratio: float = 0.95,
        *,
        sx: int = 4,
        sy: int = 4,
        num_agents: int | None = None,
        k_scale2: float = 0.3,
        k_shortcut: float = 0.075,
        random: bool = True,
        seed: int = 0,
        fp32: bool = False,
        layers: Select | None = None,
        steps=None,
    ) -> None:
        super().__init__(layers=layers, steps=steps)
        self.ratio = _check_ratio(ratio, "ratio")
        self.agent_ratio = _check_ratio(agent_ratio, "agent_ratio")
        self.sx = _check_cell(sx, "sx")
        self.sy = _check_cell(sy, "sy")
        if num_agents is not None:
            num_agents = _check_cell(num_agents, "num_agents")
        self.num_agents = num_agents
        self.k_scale2 = float(k_scale2)
        self.k_shortcut = float(k_shortcut)
        self.random = bool(random)
        self.seed = int(seed)
        self.fp32 = bool(fp32)

    def default_layers(self) -> Select:
        return Select(kind=("self", "joint"), top=True)

    def default_steps(self) -> Steps:
        return Steps(0, 0.4)

    # ------------------------------------------------------------------------------ validation
    def setup(self, run: Run) -> None:
        if not self.selected_layers:
            raise ValueError("AgentAttention selected no self- or joint-attention layer on this model")
        self.state.paths = {}
        if self.num_agents is None or run.height is None or run.width is None:
            return
        f = int(getattr(run.pipe, "vae_scale_factor", 8))
        latent = (run.height // f, run.width // f)
        for name in sorted(self.selected_layers):
            info = run.registry[name]
            grid = info.grid(latent, run.registry.patch)
            self._check_agents(grid, name)

    def _check_agents(self, grid: tuple[int, int], layer: str) -> None:
        n = grid[0] * grid[1]
        n_dst = (grid[0] // self.sy) * (grid[1] // self.sx)
        if self.num_agents is not None and self.num_agents > n:
            raise ValueError(
                f"num_agents={self.num_agents} is more than the {n} image tokens of layer {layer} "
                f"(grid {grid[0]}x{grid[1]}); choose at most {n}"
            )
        if self.num_agents is not None and self.num_agents < max(n_dst, 1):
            raise ValueError(
                f"num_agents={self.num_agents} is fewer than the {n_dst} cells of {self.sy}x{self.sx} on layer "
                f"{layer} (grid {grid[0]}x{grid[1]}); merging keeps one destination per cell: choose between "
                f"{max(n_dst, 1)} and {n}, or larger sx/sy"
            )

    # ------------------------------------------------------------------------------- attention
    def _generator(self, ctx: CallContext) -> torch.Generator | None:
        if not self.random:
            return None
        key = f"{self.seed}|{ctx.phase}|{ctx.step}|{ctx.layer.name}".encode()
        return torch.Generator(device="cpu").manual_seed(zlib.crc32(key))

    def attend(
        self, ctx: CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        if k.shape[1] != q.shape[1]:
            return None  # cross-attention keeps plain attention (agents merge self/joint tokens)
        keep = _key_mask(mask, q.shape[1], ctx)
        img, grid = ctx.image, ctx.grid
        n = ctx.n_image
        if self.num_agents is not None:
            self._check_agents(grid, ctx.layer.name)
        hs = ctx.hidden_states
        if hs is not None and hs.dim() == 3 and hs.shape[1] == n:
            metric = hs
        elif hs is not None and hs.dim() == 3 and hs.shape[1] == q.shape[1]:
            metric = hs[:, img]
        else:
            metric = k[:, img].flatten(2)
        dtype = q.dtype
        if self.fp32:
            q, k, v = q.float(), k.float(), v.float()
        r_agent = n - self.num_agents if self.num_agents is not None else int(n * self.agent_ratio)
        feat, agents_m = bipartite_soft_matching(
            metric, grid, self.sy, self.sx, [int(n * self.ratio), r_agent], generator=self._generator(ctx)
        )
        other = torch.ones(q.shape[1], dtype=torch.bool, device=q.device)
        other[img] = False
        n_other = int(other.sum())

        def merged(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, other], feat.merge(x[:, img])], dim=1)

        qf, kf, vf = merged(q), merged(k), merged(v)
        # padded text keys (Qwen-Image batches) stay masked; merged image tokens are all valid
        key_mask = None if keep is None else torch.cat(
            [keep[..., other], keep.new_ones(*keep.shape[:-1], kf.shape[1] - n_other)], dim=-1)
        agents = agents_m.merge(q[:, img])
        n_agents, n_feat = agents.shape[1], qf.shape[1]
        d = q.shape[-1]
        if 2 * n_agents >= n_feat:
            path = "tome"
            out_f = kernels.attention(qf, kf, vf, scale=d**-0.5, mask=key_mask)
        else:
            path = "agent"
            agent_v = kernels.attention(agents, kf, vf, scale=d**-0.5, mask=key_mask)
            out_f = kernels.attention(qf, agents, agent_v, scale=d ** (-0.5 * self.k_scale2))
            out_f = out_f + self.k_shortcut * vf
        out = torch.empty_like(q)
        out[:, other] = out_f[:, :n_other]
        out[:, img] = feat.unmerge(out_f[:, n_other:])
        paths = getattr(self.state, "paths", None)
        if paths is not None and ctx.phase == "denoise":
            paths.setdefault(ctx.step, {})[ctx.layer.name] = {"path": path, "agents": n_agents, "tokens": n_feat}
        return out.to(dtype)

    def records(self) -> dict:
        paths = getattr(self.state, "paths", None)
        return {"steps": paths} if paths else {}


def _key_mask(mask: torch.Tensor | None, n_keys: int, ctx: CallContext) -> torch.Tensor | None:
    """The model's mask as a boolean keep-mask over keys (B or 1, 1, 1, n_keys), or a clear refusal.

    Agents are merged image tokens, so only a mask over keys (padded text, every image key kept) survives
    merging; a mask that depends on the query or masks image keys has no merged equivalent.
    """
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    img = ctx.image
    if keep.dim() != 4 or keep.shape[1] != 1 or keep.shape[2] != 1 or keep.shape[-1] != n_keys \
            or not bool(keep[..., img].all()):
        raise ValueError(
            f"AgentAttention keeps a model's attention mask only over text keys, but layer {ctx.layer.name} got a "
            f"mask of shape {tuple(mask.shape)}; leave this layer out (layers=...)"
        )
    return keep
