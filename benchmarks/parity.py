"""attnedit's hooks against the published formulas, on the same random tensors: max abs difference per method.

    python benchmarks/parity.py            # the table (CPU, fp32, a few seconds)
    python benchmarks/parity.py --with-diffusers-ae   # also diffusers' A&E pipeline (benchmarks/ae_parity.py)

Each row runs one control's hooks exactly as the attention processor runs them
(`attnedit.processor.run_controls`, the control bound to a tiny model of the family it needs) on
random q, k, v, and computes the same attention from the paper's formula, written here with dense
masks and explicit softmaxes in fp64. The attention arithmetic is independent of attnedit's code;
where attnedit makes a documented choice of geometry, the reference takes the same one from
attnedit's helpers (which grid cells a mask or box covers: `masks.mask_cells`, `subject_labels`;
AgentSD's merge plan: `merge.bipartite_soft_matching`, checked against the official partition rule
in tests/test_agent.py; a word's token positions), so these rows check the attention, not those
choices:

- AttentionStore: mean over heads of softmax(Q K^T / sqrt(d)) at the captured keys;
- MasaCtrl: the target rows read softmax(Q_t K_s^T) V_s of their source (each CFG half its own);
  mask-guided: M_t * softmax(Q_t K_s^T + log M_s) V_s + (1 - M_t) * softmax(Q_t K_s^T + log(1 - M_s)) V_s;
- ToDo: softmax(Q K'^T) V' with K', V' = F.interpolate(., size=(h/2, w/2), mode="nearest-exact");
- Agent Attention: softmax(Q A^T d^(-k2/2)) softmax(A K^T d^-1/2) V + k_s V on ToMe-merged tokens;
- CLEAR: image query (y, x) sees image keys with dy^2 + dx^2 < r^2, text keys always, text queries all;
- IR-Diffusion isolation: a pixel of subject i never attends a pixel of subject j != i;
- Attend-and-Excite: max_s max(0, 1 - max(G * softmax(100 A[:, :, 1:-1])[s])) with the official
  3x3 kernel weights [e^-1, 1, e^-1] / (1 + 2 e^-1) per axis and reflect padding;
- A-STAR segregation (Eq. 2): sum_{i<j} sum_p min(A_i, A_j) / sum_p (A_i + A_j) of min-max scaled maps.

The tests assert every row below its tolerance (`tests/test_parity.py`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

import attnedit
from attnedit.controller import Controller
from attnedit.controls import CallContext
from attnedit.layout import BatchLayout
from attnedit.processor import run_controls

TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------ helpers
def softmax_attention(q, k, v, allowed=None, scale=None):
    """softmax(Q K^T * scale + log allowed) V on BSHD tensors, fp64 (the reference)."""
    q, k, v = q.double(), k.double(), v.double()
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(logits, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), p


def _bound(family: str, control, prompts: list[str], layout: BatchLayout | None = None, steps: int = 4):
    """Bind `control` to a run on the tiny model of `family`: what the controller does before denoising."""
    edit_pipe = attnedit.load(f"tiny-{family}")
    ctrl = Controller(edit_pipe.pipe, [control])
    cfg = layout is not None and any(r.cfg == "uncond" for r in layout.rows)
    run = ctrl.begin_run(prompts, num_steps=steps, height=64, width=64, cfg=cfg, layout=layout)
    return ctrl, run


def _ctx(ctrl, run, name: str, grid, layout, *, image: slice, text: slice | None, hidden=None, step: int = 1):
    return CallContext(layer=ctrl.registry[name], attn=None, step=step, num_steps=run.num_steps, t=0.5,
                       phase="denoise", layout=layout, grid=grid, image=image, text=text, hidden_states=hidden,
                       run=run)


def _self_layer(ctrl, level: int = 0) -> str:
    return next(i.name for i in ctrl.registry.ordered() if i.kind == "self" and i.level == level)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------------------------- checks
def check_store(gen: torch.Generator) -> float:
    store = attnedit.AttentionStore()
    ctrl, run = _bound("sd", store, ["a cat and a dog"])
    name = next(i.name for i in ctrl.registry.ordered() if i.kind == "cross" and i.level == 0)
    layout = BatchLayout.standard(1, cfg=False)
    q = torch.randn(1, 64, 2, 8, generator=gen)
    k, v = torch.randn(1, 77, 2, 8, generator=gen), torch.randn(1, 77, 2, 8, generator=gen)
    run_controls([store], _ctx(ctrl, run, name, (8, 8), layout, image=slice(0, 64), text=slice(0, 77)), q, k, v, None)
    _, p = softmax_attention(q, k, v)
    cols = store.positions
    return _diff(store.state.cross[name][0][0], p.mean(1)[0][:, cols])


def _masactrl_case(gen, masks=None):
    layout = BatchLayout.standard(2, cfg=True, groups=[0, 0], roles=["source", "target"])
    control = attnedit.MasaCtrl(steps=(0, None), masks=masks)
    ctrl, run = _bound("sd", control, ["a cat", "a cat running"], layout)
    name = sorted(control.selected_layers)[0]
    q, k, v = (torch.randn(4, 64, 2, 8, generator=gen) for _ in range(3))
    out = run_controls([control], _ctx(ctrl, run, name, (8, 8), layout, image=slice(0, 64), text=None), q, k, v, None)
    return out, (q, k, v)


def check_masactrl(gen: torch.Generator) -> float:
    out, (q, k, v) = _masactrl_case(gen)
    # rows: [uncond src, uncond tgt, cond src, cond tgt]; targets read their own half's source
    src = torch.tensor([0, 0, 2, 2])
    ref, _ = softmax_attention(q, k[src], v[src])
    return _diff(out, ref)


def check_masactrl_masks(gen: torch.Generator) -> float:
    from attnedit.masks import mask_cells

    m_src = np.zeros((64, 64))
    m_src[8:40, 8:48] = 1.0
    m_tgt = np.zeros((64, 64))
    m_tgt[24:56, 16:60] = 1.0
    out, (q, k, v) = _masactrl_case(gen, masks=[m_src, m_tgt])
    cells_s = mask_cells(torch.tensor(m_src), (8, 8)).flatten()
    cells_t = mask_cells(torch.tensor(m_tgt), (8, 8)).flatten()
    ref = out.double().clone()
    for tgt, s in ((1, 0), (3, 2)):
        fg, _ = softmax_attention(q[tgt:tgt + 1], k[s:s + 1], v[s:s + 1], cells_s[None, None, None, :])
        bg, _ = softmax_attention(q[tgt:tgt + 1], k[s:s + 1], v[s:s + 1], ~cells_s[None, None, None, :])
        m = cells_t.double()[None, :, None, None]
        ref[tgt] = (m * fg + (1 - m) * bg)[0]
    for s in (0, 2):
        ref[s], _ = softmax_attention(q[s:s + 1], k[s:s + 1], v[s:s + 1])
    return _diff(out, ref)


def check_todo(gen: torch.Generator) -> float:
    todo = attnedit.ToDo(factor=2)
    ctrl, run = _bound("sd", todo, ["a cat"])
    layout = BatchLayout.standard(1, cfg=False)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=gen) for _ in range(3))
    ctx = _ctx(ctrl, run, _self_layer(ctrl), (8, 8), layout, image=slice(0, 64), text=None)
    out = run_controls([todo], ctx, q, k, v, None)

    def small(x):
        img = x.reshape(1, 8, 8, 16).permute(0, 3, 1, 2)
        return F.interpolate(img, size=(4, 4), mode="nearest-exact").permute(0, 2, 3, 1).reshape(1, 16, 2, 8)

    ref, _ = softmax_attention(q, small(k), small(v))
    return _diff(out, ref)


def check_agent(gen: torch.Generator) -> float:
    from attnedit.methods.merge import bipartite_soft_matching

    agent = attnedit.AgentAttention(ratio=0.4, agent_ratio=0.72, sx=2, sy=2, steps=(0, None))
    ctrl, run = _bound("sd", agent, ["a cat"])
    layout = BatchLayout.standard(1, cfg=False)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=gen) for _ in range(3))
    hidden = torch.randn(1, 64, 16, generator=gen)
    ctx = _ctx(ctrl, run, _self_layer(ctrl), (8, 8), layout, image=slice(0, 64), text=None, hidden=hidden)
    out = run_controls([agent], ctx, q, k, v, None)
    feat, agents = bipartite_soft_matching(hidden, (8, 8), 2, 2, [int(64 * 0.4), int(64 * 0.72)],
                                           generator=agent._generator(ctx))
    a, qf, kf, vf = (x.double() for x in (agents.merge(q), feat.merge(q), feat.merge(k), feat.merge(v)))
    agent_v, _ = softmax_attention(a, kf, vf, scale=8**-0.5)
    merged, _ = softmax_attention(qf, a, agent_v, scale=8 ** (-0.5 * 0.3))
    ref = feat.unmerge((merged + 0.075 * vf).float())
    return _diff(out, ref)


def check_clear(gen: torch.Generator) -> float:
    clear = attnedit.CLEAR(radius=2)
    ctrl, run = _bound("flux", clear, ["a cat"])
    name = next(i.name for i in ctrl.registry.ordered() if i.block == "single")
    layout = BatchLayout.standard(1, cfg=False)
    t, (h, w) = 5, (4, 6)
    n = t + h * w
    q, k, v = (torch.randn(1, n, 2, 8, generator=gen) for _ in range(3))
    out = run_controls([clear], _ctx(ctrl, run, name, (h, w), layout, image=slice(t, n), text=slice(0, t)),
                       q, k, v, None)
    allowed = torch.ones(n, n, dtype=torch.bool)
    for i in range(h * w):
        for j in range(h * w):
            dy, dx = i // w - j // w, i % w - j % w
            allowed[t + i, t + j] = dy * dy + dx * dx < 2**2
    ref, _ = softmax_attention(q, k, v, allowed[None, None])
    return _diff(out, ref)


def check_isolation(gen: torch.Generator) -> float:
    from attnedit.masks import subject_labels

    boxes = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    iso = attnedit.IsolationAttention(boxes=boxes)
    ctrl, run = _bound("sd", iso, ["a cat and a dog"])
    layout = BatchLayout.standard(1, cfg=False)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=gen) for _ in range(3))
    ctx = _ctx(ctrl, run, _self_layer(ctrl), (8, 8), layout, image=slice(0, 64), text=None)
    out = run_controls([iso], ctx, q, k, v, None)
    lab = subject_labels((8, 8), boxes=boxes)
    allowed = ~((lab[:, None] > 0) & (lab[None, :] > 0) & (lab[:, None] != lab[None, :]))
    ref, _ = softmax_attention(q, k, v, allowed[None, None])
    return _diff(out, ref)


def check_attend_excite(gen: torch.Generator) -> float:
    from attnedit.guidance import LayerMaps

    ae = attnedit.AttendExcite(words=["cat", "dog"], token_mode="ae")
    _, run = _bound("sd", ae, ["a cat and a dog"])
    grid = (16, 16)
    full = torch.softmax(torch.randn(1, 256, 77, generator=gen) * 3, -1)  # head-mean maps over 77 keys
    cols = ae.state.text_cols
    maps = {n: LayerMaps(full[:, :, cols], grid, "cross", cols) for n in ae.state.layer_names}
    ours = ae.loss(maps, 0, 0)
    # the official computation, written from the paper / official code
    a = full.reshape(1, 16, 16, 77)[..., 1:-1] * 100
    a = torch.softmax(a, -1)
    e = math.exp(-1)
    w = torch.tensor([e, 1.0, e]) / (1 + 2 * e)
    kernel = torch.outer(w, w)[None, None]
    peaks = []
    for word in ("cat", "dog"):  # the tiny tokenizer spells words by character: a word's peak is its best token's
        per_token = []
        for pos in run.tokens[0].find(word):
            img = F.pad(a[..., pos - 1][None], (1, 1, 1, 1), mode="reflect")
            per_token.append(float(F.conv2d(img, kernel).max()))
        peaks.append(max(per_token))
    ref = max(max(0.0, 1.0 - p) for p in peaks)
    return abs(float(ours[0]) - ref)


def check_astar_segregation(gen: torch.Generator) -> float:
    from attnedit.losses import minmax, segregation_loss

    maps = torch.rand(2, 3, 16, 16, generator=gen)
    ours = segregation_loss(minmax(maps))
    ref = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        m = []
        for s in range(3):
            x = maps[b, s].double()
            m.append((x - x.min()) / (x.max() - x.min()))
        for i in range(3):
            for j in range(i + 1, 3):
                ref[b] += torch.minimum(m[i], m[j]).sum() / (m[i] + m[j]).sum()
    return _diff(ours, ref)


CHECKS: dict[str, Callable[[torch.Generator], float]] = {
    "AttentionStore (captured maps)": check_store,
    "MasaCtrl (mutual self-attention)": check_masactrl,
    "MasaCtrl (mask-guided)": check_masactrl_masks,
    "ToDo (nearest-exact K/V)": check_todo,
    "Agent Attention (agents + ToMe)": check_agent,
    "CLEAR (local window, text global)": check_clear,
    "IR-Diffusion (isolation)": check_isolation,
    "Attend-and-Excite (loss)": check_attend_excite,
    "A-STAR (segregation loss)": check_astar_segregation,
}


def run_all(seed: int = 0) -> dict[str, float]:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    return {name: fn(gen) for name, fn in CHECKS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-diffusers-ae", action="store_true", help="also run benchmarks/ae_parity.py (seed 0)")
    args = parser.parse_args(argv)
    print("| method | max abs difference vs the published formula (fp32 vs fp64 reference) |")
    print("|---|---|")
    for name, value in run_all(args.seed).items():
        print(f"| {name} | {value:.2e} |")
    if args.with_diffusers_ae:
        from ae_parity import compare

        r = compare()
        print(f"| Attend-and-Excite vs diffusers' pipeline (final latents, shapes-sd, 10 steps) | "
              f"{r['max_abs_diff']:.2e} (latent scale {r['latent_scale']:.2f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
