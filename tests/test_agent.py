"""Agent Attention and the ToMe merging under it: equality when off, hand-built grids, formulas, errors."""

from __future__ import annotations

import pytest
import torch

import attnedit
from attnedit.controls import CallContext
from attnedit.layers import LayerInfo
from attnedit.layout import BatchLayout
from attnedit.methods.agent import AgentAttention
from attnedit.methods.merge import bipartite_soft_matching, grid_partition
from attnedit.selectors import Steps
from attnedit.tiny import build_tiny, tiny_call_kwargs


@pytest.fixture(scope="module")
def pipes():
    return {fam: build_tiny(fam) for fam in ("sd", "sdxl", "flux")}


def _latents(pipe, family, controls=(), steps=2):
    gen = torch.Generator().manual_seed(0)
    with attnedit.controlled(pipe, *controls):
        return pipe("a red circle", num_inference_steps=steps, guidance_scale=5.0, height=64, width=64,
                    generator=gen, output_type="latent", **tiny_call_kwargs(family)).images


# ------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("grid,cell", [((4, 4), (2, 2)), ((3, 5), (2, 2)), ((5, 3), (2, 2)), ((7, 9), (3, 4))])
def test_partition_one_destination_per_full_cell(grid, cell):
    h, w = grid
    sy, sx = cell
    for gen in (None, torch.Generator().manual_seed(3)):
        dst, src = grid_partition(grid, sy, sx, generator=gen)
        assert dst.numel() == (h // sy) * (w // sx)
        assert sorted(torch.cat([dst, src]).tolist()) == list(range(h * w))
        cells = sorted(((int(d) // w) // sy, (int(d) % w) // sx) for d in dst)
        assert cells == [(cy, cx) for cy in range(h // sy) for cx in range(w // sx)]
    dst, _ = grid_partition((3, 5), 2, 2)
    assert dst.tolist() == [0, 2]  # top-left of each full cell; row 2 and column 4 stay sources


def test_merge_averages_most_similar_sources_and_unmerge_copies_back():
    """Grid 3x5: token 1 duplicates destination 0 and token 3 duplicates destination 2 -> they merge first."""
    n, c = 15, 16
    x = torch.randn(1, n, c)
    x[0, 1] = x[0, 0] * 2.0  # same direction as destination 0 (cosine 1), different norm
    x[0, 3] = x[0, 2]
    m = bipartite_soft_matching(x, (3, 5), 2, 2, r=2)
    assert m.r == 2 and m.out_len == 13
    merged = m.merge(x)
    assert merged.shape == (1, 13, c)
    dst_out = merged[0, -2:]  # merged order: [unmerged sources | destinations 0, 2]
    assert torch.allclose(dst_out[0], (x[0, 0] + x[0, 1]) / 2)
    assert torch.allclose(dst_out[1], x[0, 2])
    back = m.unmerge(merged)
    assert torch.allclose(back[0, 1], back[0, 0]) and torch.allclose(back[0, 3], x[0, 2])
    keep = [i for i in range(n) if i not in (0, 1, 3)]
    assert torch.allclose(back[0, keep], x[0, keep])


def test_merge_caps_at_sources_and_zero_is_identity():
    x = torch.randn(2, 35, 4)
    none = bipartite_soft_matching(x, (5, 7), 2, 2, r=0)
    assert torch.equal(none.unmerge(none.merge(x)), x)
    capped = bipartite_soft_matching(x, (5, 7), 2, 2, r=1000)
    assert capped.r == 35 - 6 and capped.out_len == 6  # only the 6 destinations are left
    # each batch row matches its own tokens, rows never mix
    y = x.clone()
    y[1] = torch.randn(35, 4)
    a = bipartite_soft_matching(x, (5, 7), 2, 2, r=10).merge(x)
    b = bipartite_soft_matching(y, (5, 7), 2, 2, r=10).merge(y)
    assert torch.allclose(a[0], b[0])


# ------------------------------------------------------------------------------------ attention
def _ctx(grid, hidden):
    info = LayerInfo(name="down_blocks.0.attentions.0.transformer_blocks.0.attn1", kind="self", block="down",
                     block_index=0, attention_index=0, transformer_index=0, index=0, level=0, attn_name="attn1")
    n = grid[0] * grid[1]
    return CallContext(layer=info, attn=None, step=0, num_steps=4, t=1.0, phase="denoise",
                       layout=BatchLayout.standard(1, False), grid=grid, image=slice(0, n), text=None,
                       hidden_states=hidden)


def test_agent_formula_on_hand_built_tokens():
    """ratio 0 (no feature merge): out = softmax(Q A^T d^-0.5k2) softmax(A K^T d^-0.5) V + k_shortcut V."""
    grid = (5, 6)
    n, d = 30, 8
    q, k, v = (torch.randn(2, n, 2, d) for _ in range(3))
    hidden = torch.randn(2, n, 12)
    ctl = AgentAttention(ratio=0.0, agent_ratio=0.6, sx=2, sy=2, random=False, k_scale2=0.3, k_shortcut=0.075)
    out = ctl.attend(_ctx(grid, hidden), q, k, v, None)
    m = bipartite_soft_matching(hidden, grid, 2, 2, int(n * 0.6))
    agents = m.merge(q)  # (B, n_agents, H, d): means of queries = queries of mean tokens
    assert agents.shape[1] == n - 18
    a, qq, kk, vv = (t.transpose(1, 2) for t in (agents, q, k, v))
    p1 = torch.softmax(a @ kk.transpose(-1, -2) * d**-0.5, -1)
    p2 = torch.softmax(qq @ a.transpose(-1, -2) * d ** (-0.5 * 0.3), -1)
    expected = (p2 @ (p1 @ vv) + 0.075 * vv).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-5)


def test_tokens_and_agents_come_from_one_partition():
    """As in the official AgentSD (one `bipartite_soft_matching_random2d` call, two slices of one ranking):
    the agents merge every source the tokens merge, into the same destinations, with a random partition."""
    grid, n, d = (8, 8), 64, 4
    hidden = torch.randn(2, n, 12)
    gen = torch.Generator().manual_seed(3)
    feat, agents = bipartite_soft_matching(hidden, grid, 2, 2, [int(n * 0.4), int(n * 0.72)], generator=gen)
    assert torch.equal(feat.dst, agents.dst) and torch.equal(feat.src, agents.src)
    assert not torch.equal(feat.dst, grid_partition(grid, 2, 2)[0])  # the random partition, not the corners
    for b in range(2):
        assert set(feat.merged[b].tolist()) <= set(agents.merged[b].tolist())
        assert torch.equal(agents.target[b, : feat.r], feat.target[b])
    # the control uses exactly that: out = unmerge(softmax(Qf A^T) softmax(A Kf^T) Vf + s Vf)
    ctl = AgentAttention(ratio=0.4, agent_ratio=0.72, sx=2, sy=2, seed=5)
    q, k, v = (torch.randn(2, n, 2, d) for _ in range(3))
    ctx = _ctx(grid, hidden)
    ctl.state.paths = {}
    out = ctl.attend(ctx, q, k, v, None)
    assert ctl.state.paths[0][ctx.layer.name] == {"path": "agent", "agents": 18, "tokens": 39}
    feat, agents = bipartite_soft_matching(hidden, grid, 2, 2, [int(n * 0.4), int(n * 0.72)],
                                           generator=ctl._generator(ctx))
    a, qf, kf, vf = (t.transpose(1, 2) for t in (agents.merge(q), feat.merge(q), feat.merge(k), feat.merge(v)))
    p1 = torch.softmax(a @ kf.transpose(-1, -2) * d**-0.5, -1)
    p2 = torch.softmax(qf @ a.transpose(-1, -2) * d ** (-0.5 * 0.3), -1)
    expected = feat.unmerge((p2 @ (p1 @ vf) + 0.075 * vf).transpose(1, 2))
    assert torch.allclose(out, expected, atol=1e-5)


def test_falls_back_to_tome_when_agents_are_not_fewer():
    grid = (4, 4)
    q, k, v = (torch.randn(1, 16, 2, 4) for _ in range(3))
    ctl = AgentAttention(ratio=0.25, agent_ratio=0.25, sx=2, sy=2, random=False)
    ctl.state.paths = {}
    ctx = _ctx(grid, torch.randn(1, 16, 6))
    out = ctl.attend(ctx, q, k, v, None)
    assert ctl.state.paths[0][ctx.layer.name]["path"] == "tome"
    m = bipartite_soft_matching(ctx.hidden_states, grid, 2, 2, 4)
    qm, km, vm = (m.merge(t).transpose(1, 2) for t in (q, k, v))
    plain = torch.softmax(qm @ km.transpose(-1, -2) * 0.5, -1) @ vm
    assert torch.allclose(out, m.unmerge(plain.transpose(1, 2)), atol=1e-5)


# --------------------------------------------------------------------------------- pipelines
@pytest.mark.parametrize("family", ["sd", "flux"])
def test_schedule_disabled_or_nothing_merged_equals_plain(pipes, family):
    pipe = pipes[family]
    plain = _latents(pipe, family)
    off = _latents(pipe, family, [AgentAttention(steps=Steps(0, 0))])
    assert (plain - off).abs().max().item() <= 1e-5
    if family == "sd":  # N agents for N tokens: the ToMe fallback with nothing merged = plain attention
        unmerged = _latents(pipe, family, [AgentAttention(ratio=0.0, agent_ratio=0.0, steps=Steps(0, None))])
        assert (plain - unmerged).abs().max().item() <= 1e-4
    on = AgentAttention(ratio=0.2, agent_ratio=0.7, sx=2, sy=2, steps=Steps(0, None))
    changed = _latents(pipe, family, [on])
    assert (plain - changed).abs().max().item() > 1e-4
    paths = on.records()["steps"]
    assert {rec["path"] for step in paths.values() for rec in step.values()} == {"agent"}


def test_default_schedule_first_40_percent_and_top_level(pipes):
    ctl = AgentAttention(sx=2, sy=2, ratio=0.2, agent_ratio=0.7)
    _latents(pipes["sd"], "sd", [ctl], steps=5)
    steps = ctl.records()["steps"]
    assert sorted(steps) == [0, 1]  # round(0.4 * 5) = 2 steps
    assert all(name.endswith("attn1") for name in steps[0])
    xl = AgentAttention(sx=2, sy=2, ratio=0.2, agent_ratio=0.7)
    _latents(pipes["sdxl"], "sdxl", [xl], steps=3)
    assert xl.records()["steps"], "SDXL: the top attention level (latent/2) must be selected"


def test_same_seed_same_output_and_partition_shared_by_rows(pipes):
    ctl = dict(ratio=0.3, agent_ratio=0.7, sx=2, sy=2, steps=Steps(0, None))
    a = _latents(pipes["sd"], "sd", [AgentAttention(**ctl)])
    b = _latents(pipes["sd"], "sd", [AgentAttention(**ctl)])
    assert torch.equal(a, b)
    # identical rows stay identical (one partition per call for the whole batch)
    grid = (4, 4)
    q = torch.randn(1, 16, 2, 4).repeat(2, 1, 1, 1)
    hidden = torch.randn(1, 16, 6).repeat(2, 1, 1)
    out = AgentAttention(**ctl).attend(_ctx(grid, hidden), q, q, q, None)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize(
    "kwargs", [dict(ratio=1.0), dict(ratio=-0.1), dict(agent_ratio=1.2), dict(sx=0), dict(sy=1.5),
               dict(num_agents=0), dict(ratio="half")],
)
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        AgentAttention(**kwargs)


def test_more_agents_than_tokens_fails_before_denoising():
    ep = attnedit.load("tiny-sd")
    calls = []
    handle = ep.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="more than the 64 image tokens"):
            ep.generate("a red circle", controls=[AgentAttention(num_agents=100, sx=2, sy=2)], steps=2)
        with pytest.raises(ValueError, match="fewer than the 16 cells"):
            ep.generate("a red circle", controls=[AgentAttention(num_agents=8, sx=2, sy=2)], steps=2)
    finally:
        handle.remove()
    assert calls == []
    ok = AgentAttention(num_agents=20, sx=2, sy=2, steps=Steps(0, None))
    ep.generate("a red circle", controls=[ok], steps=1)
    assert {rec["agents"] for rec in ok.records()["steps"][0].values()} == {20}
