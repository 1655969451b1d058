"""CLEAR: whole-grid radius = plain, window masks on hand-built grids, flex = dense, distillation, adapters."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import attnedit
from attnedit.methods.clear import (
    CLEAR,
    ClearWeights,
    block_mask,
    clear_mask,
    flex_attention,
    pool_image,
    tile_order,
)
from attnedit.tiny import build_tiny, tiny_call_kwargs
from attnedit.train.clear import attention_loss_layers, distill_clear

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


@pytest.fixture(scope="module")
def pipes():
    return {fam: build_tiny(fam) for fam in ("sd", "sd3", "flux", "pixart")}


def _latents(pipe, family, controls=(), h=64, w=64, steps=2):
    gen = torch.Generator().manual_seed(0)
    with attnedit.controlled(pipe, *controls):
        return pipe("a red circle", num_inference_steps=steps, guidance_scale=5.0, height=h, width=w,
                    generator=gen, output_type="latent", **tiny_call_kwargs(family)).images


# --------------------------------------------------------------------------------------- masks
def _hand_mask(grid, r, text, text_first, n_pool):
    h, w = grid
    img = [(y, x) for y in range(h) for x in range(w)]
    image, prefix = [("i", p) for p in img], [("t", None)] * text
    seq = prefix + image if text_first else image + prefix
    keys = seq + [("p", None)] * n_pool
    out = torch.zeros(len(seq), len(keys), dtype=torch.bool)
    for a, (kq, pq) in enumerate(seq):
        for b, (kk, pk) in enumerate(keys):
            if kq == "t":
                out[a, b] = kk != "p"
            elif kk in ("t", "p"):
                out[a, b] = True
            else:
                out[a, b] = (pq[0] - pk[0]) ** 2 + (pq[1] - pk[1]) ** 2 < r * r
    return out


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (5, 2), (1, 7)])
@pytest.mark.parametrize("r,text,text_first,n_pool", [(1, 0, True, 0), (1.5, 3, True, 0), (2, 2, False, 0),
                                                     (2.5, 3, True, 4)])
def test_window_mask_on_hand_built_grids(grid, r, text, text_first, n_pool):
    got = clear_mask(grid, r, text, text_first=text_first, n_pool=n_pool)
    assert torch.equal(got, _hand_mask(grid, r, text, text_first, n_pool))


def test_radius_one_is_the_token_itself_and_strict_inequality():
    m = clear_mask((3, 3), 1)
    assert torch.equal(m, torch.eye(9, dtype=torch.bool))  # d^2 < 1 only at distance 0
    m2 = clear_mask((3, 3), 2)
    assert m2[4].sum() == 9 and not m2[0, 8]  # the centre sees its 3x3 (d^2 <= 2 < 4); opposite corners do not
    assert m2[0].tolist() == [True, True, False, True, True, False, False, False, False]  # d^2 = 4 excluded


def test_pool_image_weights_and_odd_grid_padding():
    x = torch.arange(15.0).reshape(1, 15, 1, 1)  # grid 3x5, values = flat index
    avg = pool_image(x, (3, 5), torch.full((2, 2), 0.25))
    # cells (rows 0-1): [0,1,5,6] [2,3,7,8] [4,4,9,9](replicated col) ; row 2 replicated: [10,11,10,11] ...
    expected = [3.0, 5.0, 6.5, 10.5, 12.5, 14.0]
    assert avg.flatten().tolist() == expected
    pick = pool_image(x, (3, 5), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))  # bottom-right token of each cell
    assert pick.flatten().tolist() == [6.0, 8.0, 9.0, 11.0, 13.0, 14.0]


@pytest.mark.parametrize("grid,text,text_first,df", [((4, 4), 3, True, None), ((3, 5), 2, False, None),
                                                     ((5, 3), 4, True, 2)])
def test_flex_block_mask_equals_dense_reference(grid, text, text_first, df):
    n_img = grid[0] * grid[1]
    n = n_img + text
    q, k, v = (torch.randn(2, n, 2, 8) for _ in range(3))
    n_pool = 0
    if df:
        pk = pool_image(k[:, text:] if text_first else k[:, :n_img], grid, torch.full((df, df), 1 / df**2))
        pv = pool_image(v[:, text:] if text_first else v[:, :n_img], grid, torch.full((df, df), 1 / df**2))
        k, v = torch.cat([k, pk], 1), torch.cat([v, pv], 1)
        n_pool = pk.shape[1]
    dense = clear_mask(grid, 1.5, text, text_first=text_first, n_pool=n_pool)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=dense).transpose(1, 2)
    bm = block_mask(grid, 1.5, text, text_first, n_pool, torch.device("cpu"))
    got = flex_attention(q, k, v, bm, None)
    assert torch.allclose(got, ref, atol=1e-5)


def test_tile_order_on_an_odd_grid():
    # 3x5 grid in 2x2 tiles: tile (0,0) = 0 1 5 6, tile (0,1) = 2 3 7 8, tile (0,2) = 4 9, then row 2
    assert tile_order((3, 5), (2, 2)).tolist() == [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]
    assert tile_order((3, 5), None).tolist() == list(range(15))


@pytest.mark.parametrize("grid,tile,df", [((5, 7), (2, 3), None), ((6, 4), (8, 16), 2), ((3, 5), (1, 1), None)])
def test_tiled_flex_equals_dense_in_the_control(grid, tile, df):
    """The control's FlexAttention path with tokens re-ordered into tiles returns the dense reference's output."""
    from attnedit.controls import CallContext
    from attnedit.layers import LayerInfo
    from attnedit.layout import BatchLayout

    text, n_img = 3, grid[0] * grid[1]
    info = LayerInfo(name="single_transformer_blocks.0.attn", kind="joint", block="single", block_index=0,
                     attention_index=0, transformer_index=0, index=1, level=0, attn_name="attn")
    ctx = CallContext(layer=info, attn=None, step=0, num_steps=1, t=1.0, phase="denoise",
                      layout=BatchLayout.standard(1, False), grid=grid, image=slice(text, text + n_img),
                      text=slice(0, text))
    q, k, v = (torch.randn(2, text + n_img, 2, 8) for _ in range(3))
    weights = ClearWeights([info.name], df) if df else None
    with torch.no_grad():  # FlexAttention has no backward on the CPU (the spatial weights require grad)
        dense = CLEAR(radius=2, down_factor=df, backend="dense", weights=weights).attend(ctx, q, k, v, None)
        flex = CLEAR(radius=2, down_factor=df, backend="flex", tile=tile, weights=weights).attend(ctx, q, k, v, None)
    assert torch.allclose(flex, dense, atol=1e-5)


# ------------------------------------------------------------------------------------ pipelines
@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
@pytest.mark.parametrize("backend", ["auto", "dense", "flex"])
def test_whole_grid_radius_equals_plain(pipes, family, backend):
    pipe = pipes[family]
    plain = _latents(pipe, family)
    wide = _latents(pipe, family, [CLEAR(radius=100, backend=backend)])
    assert (plain - wide).abs().max().item() <= 1e-5
    local = _latents(pipe, family, [CLEAR(radius=1.5, backend=backend)])
    assert (plain - local).abs().max().item() > 1e-4


def test_backends_agree_on_a_small_window_and_non_square_image(pipes):
    pipe = pipes["flux"]
    outs = [_latents(pipe, "flux", [CLEAR(radius=2, backend=b)], h=48, w=80) for b in ("auto", "dense", "flex")]
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
    assert (outs[0] - outs[2]).abs().max().item() <= 1e-5
    pooled = [_latents(pipe, "flux", [CLEAR(radius=2, down_factor=2, backend=b)], h=48, w=80)
              for b in ("dense", "flex")]
    assert (pooled[0] - pooled[1]).abs().max().item() <= 1e-5


def test_spatial_weights_are_a_module_that_moves_and_trains():
    w = ClearWeights(["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"], 2)
    assert [p.shape for p in w.parameters()] == [torch.Size([2, 2])] * 2
    assert torch.allclose(w.of("transformer_blocks.0.attn"), torch.full((2, 2), 0.25))
    host = torch.nn.Linear(2, 2)
    w.attach(host)
    host.to(torch.float64)
    assert w.of("transformer_blocks.0.attn").dtype == torch.float64
    with pytest.raises(ValueError, match="no spatial weight"):
        w.of("transformer_blocks.7.attn")


@pytest.mark.parametrize("kwargs", [dict(radius=0), dict(radius=-3), dict(radius="16"), dict(radius=float("inf")),
                                    dict(radius=True), dict(down_factor=1), dict(down_factor=2.5),
                                    dict(backend="cuda"), dict(train_len=1), dict(tile=(0, 4)), dict(tile=(8,))])
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        CLEAR(**kwargs)


def test_clear_on_a_unet_fails_before_denoising():
    ep = attnedit.load("tiny-sd")
    calls = []
    handle = ep.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="CLEAR does not run on Stable Diffusion 1.x / 2.x: .*a DiT"):
            ep.generate("a red circle", controls=[CLEAR(radius=4)], steps=2)
    finally:
        handle.remove()
    assert calls == []


# ---------------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A few distillation steps on the tiny FLUX, on one fixed batch (loss must go down)."""
    out = tmp_path_factory.mktemp("clear") / "student.safetensors"
    res = distill_clear("tiny-flux", out, radius=1, down_factor=2, num_samples=2, max_steps=12, lr=2e-3,
                        fixed_batch=True, progress=False, device="cpu")
    return res


def test_distillation_loss_goes_down_on_a_fixed_batch(adapter):
    """The recipe's loss (flow + 0.5 distill + 0.5 attention) falls step after step on one fixed batch."""
    losses = adapter.losses
    assert adapter.steps == 12 and len(losses) == 12
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert losses[-1] < losses[0] - 0.05
    assert all(set(p) == {"flow", "distill", "attention"} for p in adapter.parts)
    assert adapter.parts[0]["attention"] > 0  # the student's window really changes the attention outputs


def test_pure_distillation_pulls_the_student_to_the_teacher(tmp_path):
    """Without the flow term (the random tiny teacher does not fit its own samples), the student-teacher gap shrinks."""
    res = distill_clear("tiny-flux", tmp_path / "d.safetensors", radius=1, down_factor=2, num_samples=2, max_steps=10,
                        lr=2e-3, fixed_batch=True, progress=False, device="cpu", loss_weights=(0.0, 1.0, 1.0))
    gap = [p["distill"] + p["attention"] for p in res.parts]
    assert gap[-1] < 0.5 * gap[0]


def test_adapter_reloads_and_changes_the_output(adapter):
    from safetensors import safe_open

    with safe_open(adapter.adapter, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        trained = {k: f.get_tensor(k) for k in keys}
    assert meta["radius"] == "1" and meta["down_factor"] == "2"
    assert any(k.startswith("spatial.") for k in keys)
    assert all(".to_" in k for k in keys if not k.startswith("spatial."))
    assert not any("add_q_proj" in k or "norm" in k or "ff." in k for k in keys)  # text stream, norms, MLP frozen

    base = attnedit.load("tiny-flux")
    untrained = base.generate("a red circle", seed=0, steps=2, controls=[CLEAR(radius=1, down_factor=2)])
    student = attnedit.load("tiny-flux", clear=adapter.adapter)
    assert isinstance(student.default_controls[0], CLEAR) and student.default_controls[0].radius == 1
    params = dict(student.denoiser.named_parameters())
    name = next(k for k in keys if not k.startswith("spatial."))
    assert torch.equal(params[name], trained[name])
    assert isinstance(student.denoiser.attnedit_clear, ClearWeights)
    distilled = student.generate("a red circle", seed=0, steps=2)
    a = torch.tensor(list(untrained.image.getdata()), dtype=torch.float32)
    b = torch.tensor(list(distilled.image.getdata()), dtype=torch.float32)
    assert (a - b).abs().max() > 0
    # an explicit CLEAR() replaces the default one and, with default options, runs the adapter's window
    explicit = CLEAR()
    again = student.generate("a red circle", seed=0, steps=2, controls=[explicit])
    assert (explicit.radius, explicit.down_factor) == (1, 2)
    assert list(again.image.getdata()) == list(distilled.image.getdata())
    # the same control on a model without adapter falls back to its own defaults
    base.generate("a red circle", seed=0, steps=1, controls=[explicit])
    assert (explicit.radius, explicit.down_factor) == (16, None)


def test_adapter_for_another_model_is_refused(adapter):
    with pytest.raises(ValueError, match="UNet"):
        attnedit.load("tiny-sd", clear=adapter.adapter)
    with pytest.raises(ValueError, match="trained for a FluxTransformer2DModel"):
        attnedit.load("tiny-sd3", clear=adapter.adapter)
    from attnedit.methods.clear import load_adapter
    from attnedit.pipeline import EditPipeline

    other_weights = EditPipeline(build_tiny("flux", seed=1), model_name="tiny-flux")
    with pytest.raises(ValueError, match="frozen weights differ"):
        load_adapter(other_weights, adapter.adapter)
    with pytest.raises(ValueError, match="does not exist"):
        attnedit.load("tiny-flux", clear="/nonexistent/adapter.safetensors")


def test_checkpoint_resume_and_cli(tmp_path):
    from attnedit.cli import main

    out = tmp_path / "a.safetensors"
    first = distill_clear("tiny-flux", out, radius=2, num_samples=1, max_steps=2, checkpoint_every=2, grad_accum=2,
                          progress=False, device="cpu")
    assert first.steps == 2 and (tmp_path / "a-checkpoints" / "step-0000002").is_dir()
    more = distill_clear("tiny-flux", out, radius=2, num_samples=1, max_steps=3, resume="latest",
                         checkpoint_dir=tmp_path / "a-checkpoints", progress=False, device="cpu")
    assert more.steps == 3 and len(more.losses) == 1
    with pytest.raises(ValueError, match="radius"):
        distill_clear("tiny-flux", out, radius=0)
    with pytest.raises(ValueError, match="FLUX"):
        distill_clear("tiny-sd3", out, radius=2, max_steps=1, num_samples=1, device="cpu")
    mixed = distill_clear("tiny-flux", tmp_path / "bf16.safetensors", radius=2, down_factor=2, num_samples=1,
                          max_steps=2, dtype="bf16", mixed_precision="bf16", progress=False, device="cpu")
    assert mixed.steps == 2 and all(torch.isfinite(torch.tensor(mixed.losses)))
    cli_out = tmp_path / "cli.safetensors"
    assert main(["train", "clear", "--out", str(cli_out), "--radius", "2", "--max-steps", "1", "--num-samples", "1",
                 "--device", "cpu"]) == 0
    assert cli_out.is_file()


def test_attention_loss_layers_follow_the_official_indices():
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=10, attention_head_dim=4,
                                num_attention_heads=1, joint_attention_dim=8, pooled_projection_dim=8,
                                axes_dims_rope=(0, 2, 2))
    assert attention_loss_layers(tr) == [f"single_transformer_blocks.{i}.attn" for i in (1, 5, 9)]
    assert attention_loss_layers(tr, r"transformer_blocks\.0\.attn") == ["transformer_blocks.0.attn"]


def test_clear_with_todo_on_the_same_layers_is_refused_before_denoising():
    ep = attnedit.load("tiny-flux")
    for controls in ([attnedit.ToDo(), CLEAR(radius=2)], [CLEAR(radius=2), attnedit.ToDo()]):
        with pytest.raises(ValueError, match="both change the keys"):
            ep.generate("a red circle", controls=controls, steps=1)
    # disjoint layers are fine
    ep.generate("a red circle", steps=1, controls=[
        attnedit.ToDo(layers=attnedit.Select(block="double")), CLEAR(radius=2, layers=attnedit.Select(block="single"))])


def test_changed_step_windows_are_checked_again():
    """Disjoint steps may combine ToDo and CLEAR on one layer; a window changed between runs is checked again."""
    from attnedit.selectors import Steps

    pipe = build_tiny("flux")
    todo, clear = attnedit.ToDo(steps=Steps(0, 1)), CLEAR(radius=2, steps=Steps(1, 2))
    call = dict(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="latent",
                **tiny_call_kwargs("flux"))
    with attnedit.controlled(pipe, todo, clear):
        pipe(**call)
        todo.steps = Steps(0, 2)
        with pytest.raises(ValueError, match="both change the keys"):
            pipe(**call)
