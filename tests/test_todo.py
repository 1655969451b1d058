"""ToDo: factor 1 is the plain pipeline, K/V downsampling formulas on hand-built grids, layer choice, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnedit
from attnedit import kernels
from attnedit.controls import CallContext
from attnedit.families import FAMILIES as ADAPTERS
from attnedit.layers import LayerInfo
from attnedit.layout import BatchLayout
from attnedit.methods.todo import ToDo
from attnedit.tiny import build_tiny, tiny_call_kwargs

FAMILIES = tuple(ADAPTERS)


@pytest.fixture(scope="module")
def pipes():
    return {fam: build_tiny(fam) for fam in FAMILIES}


def _latents(pipe, family, controls=(), h=64, w=64, steps=2):
    gen = torch.Generator().manual_seed(0)
    with attnedit.controlled(pipe, *controls):
        return pipe(prompt="a red circle", num_inference_steps=steps, guidance_scale=5.0, height=h, width=w,
                    generator=gen, output_type="latent", **tiny_call_kwargs(family)).images


@pytest.mark.parametrize("family", FAMILIES)
def test_factor_one_equals_plain_and_factor_two_changes(pipes, family):
    pipe = pipes[family]
    plain = _latents(pipe, family)
    same = _latents(pipe, family, [ToDo(factor=1)])
    assert (plain - same).abs().max().item() <= 1e-5
    todo = ToDo(factor=2)
    changed = _latents(pipe, family, [todo])
    assert (plain - changed).abs().max().item() > 1e-4
    assert todo.records()["layers"], "ToDo never downsampled"


def _ctx(name: str, block: str, level: int, grid, image: slice, text: slice | None, t: float = 1.0) -> CallContext:
    kind = "joint" if text is not None else "self"
    info = LayerInfo(name=name, kind=kind, block=block, block_index=0, attention_index=0, transformer_index=0,
                     index=0, level=level, attn_name="attn1")
    return CallContext(layer=info, attn=None, step=0, num_steps=4, t=t, phase="denoise",
                       layout=BatchLayout.standard(1, False), grid=grid, image=image, text=text)


def _bound(todo: ToDo, levels=(0,), native=(64, 64)) -> ToDo:
    """A ToDo as `setup` would leave it on a UNet whose attention levels are `levels`."""
    todo._level_rank = {lvl: r for r, lvl in enumerate(levels)}
    todo._native_latent = native
    return todo


@pytest.mark.parametrize("grid", [(4, 4), (5, 3), (7, 9), (1, 6)])
@pytest.mark.parametrize("mode", ["nearest-exact", "nearest", "avg"])
def test_downsampled_attention_matches_hand_computation(grid, mode):
    """Queries stay full; keys/values are the hand-picked (or hand-averaged) tokens of each 2x2 cell."""
    h, w = grid
    n = h * w
    q, k, v = (torch.randn(2, n, 3, 8) for _ in range(3))
    spec = _bound(ToDo(factor=2, method=mode)).downsample(_ctx("down.attn1", "down", 0, grid, slice(0, n), None))
    assert spec.factor == (2, 2) and spec.out_grid == (-(-h // 2), -(-w // 2))
    rows, cols = [], []
    for y0 in range(0, h, 2):
        for x0 in range(0, w, 2):
            cell_y = list(range(y0, min(y0 + 2, h)))
            cell_x = list(range(x0, min(x0 + 2, w)))
            rows.append(cell_y)
            cols.append(cell_x)
    picked_k, picked_v = [], []
    for cy, cx in zip(rows, cols):
        if mode == "nearest":
            idx = [cy[0] * w + cx[0]]
        elif mode == "nearest-exact":  # token f//2 = 1 of the cell; a 1-token border cell reads its only token
            idx = [cy[min(1, len(cy) - 1)] * w + cx[min(1, len(cx) - 1)]]
        else:
            idx = [y * w + x for y in cy for x in cx]
        picked_k.append(k[:, idx].mean(1))
        picked_v.append(v[:, idx].mean(1))
    ks, vs = torch.stack(picked_k, 1), torch.stack(picked_v, 1)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)).transpose(1, 2)
    got = kernels.attention(q, k, v, downsample=spec)
    assert got.shape == q.shape
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["nearest-exact", "nearest"])
@pytest.mark.parametrize("grid, factor", [((8, 8), 2), ((12, 6), 3), ((16, 8), 4), ((6, 9), 3)])
def test_resampling_equals_the_official_interpolate(mode, grid, factor):
    """The official ToDo resamples with F.interpolate(size=(h // f, w // f), mode=...); where f divides the
    grid attnedit picks exactly the same tokens (at f = 2 nearest-exact is the lower-right token of each cell)."""
    from attnedit.kernels.dispatch import downsample_kv
    from attnedit.kernels.types import KVDownsample

    h, w = grid
    x = torch.randn(2, h * w, 3, 4)
    ours = downsample_kv(x, KVDownsample(grid, (factor, factor), mode))
    img = x.reshape(2, h, w, 12).permute(0, 3, 1, 2)
    official = F.interpolate(img, size=(h // factor, w // factor), mode=mode).permute(0, 2, 3, 1).reshape(2, -1, 3, 4)
    assert torch.equal(ours, official)


def test_dit_keeps_text_tokens():
    """FLUX order [text | image]: the image part starts after the text, text K/V are kept in full."""
    text, grid = 5, (3, 4)
    n = text + 12
    q, k, v = (torch.randn(1, n, 2, 4) for _ in range(3))
    ctx = _ctx("single_transformer_blocks.0.attn", "single", 0, grid, slice(text, n), slice(0, text))
    spec = _bound(ToDo(factor=2, method="nearest")).downsample(ctx)
    assert spec.start == text and spec.out_grid == (2, 2)
    keep = list(range(text)) + [text + y * 4 + x for y in (0, 2) for x in (0, 2)]
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k[:, keep].transpose(1, 2), v[:, keep].transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(kernels.attention(q, k, v, downsample=spec), expected, atol=1e-5)


def test_factor_per_level_auto_and_timestep_window():
    todo = _bound(ToDo(factor=(3, 2, "auto")), levels=(1, 2, 3), native=(64, 64))
    assert todo.factor_for(_ctx("a", "down", 1, (64, 64), slice(0, 4096), None)) == 3
    assert todo.factor_for(_ctx("b", "up", 2, (32, 32), slice(0, 1024), None)) == 2
    # "auto": grid side / native grid side at that level (native latent 64 -> level 3 grid 8)
    assert todo.factor_for(_ctx("c", "up", 3, (32, 32), slice(0, 1024), None)) == 4
    assert todo.factor_for(_ctx("d", "up", 0, (128, 128), slice(0, 1), None)) == 3  # unknown level -> rank 0
    windowed = _bound(ToDo(factor=2, t_range=(0.5, 1.0)))
    assert windowed.downsample(_ctx("e", "down", 0, (4, 4), slice(0, 16), None, t=0.9)) is not None
    assert windowed.downsample(_ctx("e", "down", 0, (4, 4), slice(0, 16), None, t=0.2)) is None


def test_top_attention_level_on_sd_and_sdxl(pipes):
    """SD: level 0 self-attention only; SDXL: its top attention level (latent/2), where the original does nothing."""
    sd = ToDo(factor=2)
    _latents(pipes["sd"], "sd", [sd])
    sd_layers = sd.records()["layers"]
    assert sd_layers and all(".attn1" in n for n in sd_layers)
    assert {tuple(v["grid"]) for v in sd_layers.values()} == {(8, 8)}
    xl = ToDo(factor=2)
    _latents(pipes["sdxl"], "sdxl", [xl])
    xl_layers = xl.records()["layers"]
    assert xl_layers and {tuple(v["grid"]) for v in xl_layers.values()} == {(4, 4)}
    top = ("down_blocks.1.", "mid_block.", "up_blocks.0.")  # tiny SDXL: its mid block is at level 1 too
    assert all(n.startswith(top) and n.endswith("attn1") for n in xl_layers)


def test_odd_non_square_image_and_auto(pipes):
    """72x40 px -> 9x5 latent: ToDo keeps a ceil(9/2) x ceil(5/2) K/V grid; 'auto' gives 2 at twice native."""
    todo = ToDo(factor=2)
    out = _latents(pipes["sd"], "sd", [todo], h=72, w=40)
    assert torch.isfinite(out).all()
    assert {tuple(v["kv_grid"]) for v in todo.records()["layers"].values()} == {(5, 3)}
    auto = ToDo(factor="auto")
    _latents(pipes["sd"], "sd", [auto], h=128, w=128, steps=1)
    assert {v["factor"] for v in auto.records()["layers"].values()} == {2}
    native = ToDo(factor="auto")
    _latents(pipes["sd"], "sd", [native], steps=1)
    assert native.records() == {}


@pytest.mark.parametrize(
    "kwargs", [dict(factor=0), dict(factor=-2), dict(factor=1.5), dict(factor=2.0), dict(factor="two"),
               dict(factor=True), dict(factor=()), dict(factor=(2, 0)), dict(method="lanczos"),
               dict(t_range=(0.8, 0.2))],
)
def test_bad_input(kwargs):
    with pytest.raises(ValueError):
        ToDo(**kwargs)


def test_registered_by_name_and_exported():
    from attnedit.controls import make_control

    assert isinstance(make_control("todo", {"factor": 3}), ToDo)
    assert attnedit.ToDo is ToDo
    with pytest.raises(ValueError, match="valid options"):
        make_control("todo", {"ratio": 2})
