"""MasaCtrl: inactive = plain pipeline, sources untouched, K/V swap formula, masks, defaults, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnedit
from attnedit.controls import CallContext
from attnedit.families import build_registry
from attnedit.kernels import RegionMask, attention
from attnedit.layers import LayerInfo
from attnedit.layout import BatchLayout
from attnedit.methods.masactrl import MasaCtrl, consistent
from attnedit.selectors import Select, Steps

PROMPTS = ["a cat sitting", "a cat running", "a dog jumping"]


@pytest.fixture(scope="module")
def sd():
    return attnedit.load("tiny-sd")


def _arr(im) -> np.ndarray:
    return np.asarray(im).astype(np.int16)


def _same(a, b) -> bool:
    return bool((_arr(a) == _arr(b)).all())


def _layout3(cfg: bool = True) -> BatchLayout:
    return BatchLayout.standard(3, cfg, groups=[0, 0, 0], roles=["source", "target", "target"])


def test_inactive_control_is_bit_identical_to_plain_and_stock(sd):
    plain = sd.generate(PROMPTS, seed=[5] * 3, layout=_layout3())
    off = sd.generate(PROMPTS, seed=[5] * 3, layout=_layout3(), controls=[MasaCtrl(start_step=100)])
    assert all(_same(a, b) for a, b in zip(plain.images, off.images))
    latents = sd.initial_latents(3, 64, 64, [torch.Generator().manual_seed(5) for _ in range(3)])
    stock = sd.pipe(PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=7.5, output_type="pil")
    assert all(_same(a, b) for a, b in zip(plain.images, stock.images))


def test_sources_identical_targets_changed(sd):
    plain = sd.generate(PROMPTS, seed=[5] * 3, layout=_layout3())
    on = consistent(sd, PROMPTS[0], PROMPTS[1:], seed=5, control=MasaCtrl(start_step=0, start_layer=0))
    assert _same(on.images[0], plain.images[0])
    alone = sd.generate(PROMPTS[0], seed=5).images[0]  # alone: other batch size, CPU kernels may round differently
    assert np.abs(_arr(on.images[0]) - _arr(alone)).max() <= 2
    assert all(not _same(a, b) for a, b in zip(on.images[1:], plain.images[1:]))  # the control acts
    assert on.records["masactrl"]["reads_from"] == {1: 0, 2: 0}  # images 1 and 2 read image 0 (both CFG halves)


def test_identical_prompts_target_equals_source(sd):
    res = consistent(sd, "a cat", ["a cat", "a cat"], seed=1, control=MasaCtrl(start_step=0, start_layer=0))
    assert _same(res.images[0], res.images[1]) and _same(res.images[0], res.images[2])


def test_no_cfg_and_several_groups(sd):
    res = consistent(sd, ["a cat", "a dog"], [["a cat running"], ["a dog running", "a dog sitting"]], seed=3,
                     control=MasaCtrl(start_step=0, start_layer=0), guidance=1.0)
    plain = sd.generate(["a cat", "a dog"], seed=[3, 4], guidance=1.0)
    assert _same(res.images[0], plain.images[0]) and _same(res.images[2], plain.images[1])
    assert res.records["masactrl"]["reads_from"] == {1: 0, 3: 2, 4: 2}


def _ctx(layout: BatchLayout, grid=(2, 3), kind="self", text: slice | None = None, image: slice | None = None):
    info = LayerInfo("up_blocks.1.attentions.0.transformer_blocks.0.attn1", kind, "up", 1, 0, 0, 10, 0, "attn1")
    n = grid[0] * grid[1]
    return CallContext(layer=info, attn=None, step=0, num_steps=4, t=1.0, phase="denoise", layout=layout,
                       grid=grid, image=image or slice(0, n), text=text, hidden_states=torch.zeros(layout.size, n, 4))


def _bound(control: MasaCtrl, name: str) -> MasaCtrl:
    control.reset()
    control._selected = frozenset({name})
    control._masks, control._capture, control._map_layers = None, None, frozenset()
    return control


def test_kv_swap_formula_per_cfg_half():
    layout = BatchLayout.standard(3, True, groups=[0, 0, 1], roles=["source", "target", "plain"])
    ctx = _ctx(layout)
    c = _bound(MasaCtrl(), ctx.layer.name)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 6, 2, 4, generator=g) for _ in range(3))
    q2, k2, v2 = c.qkv(ctx, q, k, v)
    out = attention(q2, k2, v2)
    for row, src in {0: 0, 1: 0, 2: 2, 3: 3, 4: 3, 5: 5}.items():
        ref = attention(q[row : row + 1], k[src : src + 1], v[src : src + 1])
        torch.testing.assert_close(out[row : row + 1], ref)
    assert torch.equal(k2[0], k[0]) and torch.equal(k2[4], k[3]) and torch.equal(v2[1], v[0])


def test_joint_layers_swap_image_tokens_only():
    layout = BatchLayout.standard(2, False, roles=["source", "target"])
    grid, n_txt = (2, 2), 3
    ctx = _ctx(layout, grid, kind="joint", text=slice(0, n_txt), image=slice(n_txt, n_txt + 4))  # FLUX order
    c = _bound(MasaCtrl(), ctx.layer.name)
    k = torch.randn(2, 7, 2, 4)
    v = torch.randn(2, 7, 2, 4)
    _, k2, v2 = c.qkv(ctx, k, k, v)
    assert torch.equal(k2[1, :n_txt], k[1, :n_txt]) and torch.equal(k2[1, n_txt:], k[0, n_txt:])
    assert torch.equal(v2[1, :n_txt], v[1, :n_txt]) and torch.equal(v2[0], v[0])


def test_batch_without_roles_reads_sample_zero():
    c = MasaCtrl()
    c.reset()
    assert c.sources(BatchLayout.standard(3, True)) == [0, 0, 0, 3, 3, 3]


def test_mask_guided_regions_match_two_pass_formula():
    layout = BatchLayout.standard(2, False, roles=["source", "target"])
    ctx = _ctx(layout, (2, 3))
    c = _bound(MasaCtrl(masks=[np.ones((4, 6)), np.ones((4, 6))]), ctx.layer.name)
    c._masks = [None, None]  # explicit-mask mode; the masks themselves are set on the grid below
    m_s = torch.tensor([1, 1, 0, 0, 0, 1], dtype=torch.bool)
    m_t = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    c._mask = lambda sample, grid, device: m_s if sample == 0 else m_t
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 6, 2, 4, generator=g) for _ in range(3))
    q2, k2, v2 = c.qkv(ctx, q, k, v)
    regions = c.regions(ctx)
    assert isinstance(regions, RegionMask)
    out = attention(q2, k2, v2, regions=regions)
    torch.testing.assert_close(out[0], attention(q, k, v)[0])  # source unmasked
    f_fg = attention(q[1:], k[:1, m_s], v[:1, m_s])
    f_bg = attention(q[1:], k[:1, ~m_s], v[:1, ~m_s])
    expect = torch.where(m_t[None, :, None, None], f_fg, f_bg)
    torch.testing.assert_close(out[1:], expect)
    # empty source mask: foreground queries fall back to the unmasked pass (no NaN, no zeros)
    empty = torch.zeros(6, dtype=torch.bool)
    c._mask = lambda sample, grid, device: empty if sample == 0 else m_t
    out = attention(q2, k2, v2, regions=c.regions(ctx))
    torch.testing.assert_close(out[1:], attention(q[1:], k[:1], v[:1]))


def test_mask_guided_and_auto_masks_run(sd):
    m_src = np.zeros((64, 64))
    m_src[16:48, 8:40] = 1
    m_tgt = np.zeros((64, 64))
    m_tgt[8:40, 24:56] = 1
    base = consistent(sd, PROMPTS[0], PROMPTS[1:], seed=2, control=MasaCtrl(start_step=0))
    masked = consistent(sd, PROMPTS[0], PROMPTS[1:], seed=2,
                        control=MasaCtrl(start_step=0, masks=[m_src, m_tgt, m_tgt]))
    assert _same(masked.images[0], base.images[0])
    assert not _same(masked.images[1], base.images[1])
    auto = MasaCtrl(start_step=0, mask_words=["cat", "cat", "dog"])
    res = consistent(sd, PROMPTS[0], PROMPTS[1:], seed=2, control=auto)
    assert _same(res.images[0], base.images[0])
    masks = res.records["masactrl"]["auto_masks"]
    assert set(masks) == {0, 1, 2} and all(m.dtype == torch.bool for m in masks.values())
    # maps come from the coarsest cross-attention level at or below latent/4 (level 1 on the tiny UNet)
    reg = build_registry(sd.denoiser, "sd")
    assert auto._map_layers and {reg[n].level for n in auto._map_layers} == {1}


def test_auto_masks_on_sdxl_are_not_silently_skipped():
    xl = attnedit.load("tiny-sdxl")
    auto = MasaCtrl(start_step=0, mask_words="cat")
    res = consistent(xl, "a cat", ["a cat running"], seed=0, control=auto)
    assert set(res.records["masactrl"]["auto_masks"]) == {0, 1}


def _sd15_like_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 8, 8, 8), layers_per_block=2, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )


def _sdxl_like_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 8, 8), layers_per_block=2, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=2, sample_size=8, transformer_layers_per_block=(1, 2, 10),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


def test_default_layers_reproduce_official_start_layers():
    from attnedit.families import FAMILIES
    from attnedit.methods.masactrl import default_layers

    reg = build_registry(_sd15_like_unet(), "sd")
    picked = {i.name for i in default_layers(FAMILIES["sd"], reg).pick(reg)}
    assert picked == {i.name for i in Select(kind="self", min_index=10).pick(reg)}
    assert len(picked) == 6 and all(n.startswith(("up_blocks.2.", "up_blocks.3.")) for n in picked)
    reg = build_registry(_sdxl_like_unet(), "sdxl")
    assert len(reg.layers) == 140
    picked = {i.name for i in default_layers(FAMILIES["sdxl"], reg).pick(reg)}
    assert picked == {i.name for i in Select(kind="self", min_index=44).pick(reg)}
    assert len(picked) == 26


def test_auto_mask_maps_come_from_the_latent4_level_before_the_controlled_layers():
    from types import SimpleNamespace

    from attnedit.families import FAMILIES

    reg = build_registry(_sd15_like_unet(), "sd")
    layers = MasaCtrl(mask_words="cat")._mask_source_layers(SimpleNamespace(family=FAMILIES["sd"], registry=reg))
    assert {i.index for i in layers} == {4, 5, 7, 8, 9} and {i.kind for i in layers} == {"cross"}  # official set
    reg = build_registry(_sdxl_like_unet(), "sdxl")
    layers = MasaCtrl(mask_words="cat")._mask_source_layers(SimpleNamespace(family=FAMILIES["sdxl"], registry=reg))
    assert {i.level for i in layers} == {2} and min(i.index for i in layers) < 44  # maps exist before L = 44


def test_step_window_fraction_and_ints():
    c = MasaCtrl()
    assert not c.steps.active(3, 50) and c.steps.active(4, 50) and c.steps.active(49, 50)
    # round(0.08 * T): T=4 -> 0, T=10 -> 1, T=20 -> 2
    assert c.steps.active(0, 4) and not c.steps.active(0, 10) and c.steps.active(1, 10)
    assert not c.steps.active(1, 20) and c.steps.active(2, 20)
    assert MasaCtrl(start_step=2, end_step=3).steps == Steps(2, 3)


def test_masks_from_png_files_equal_the_same_masks_as_arrays(sd, tmp_path):
    """A hand-drawn mask saved as a PNG (how the app and batch job files carry it) acts exactly
    like the array it was saved from; bad files are refused before denoising, by name."""
    from PIL import Image

    fg = np.zeros((64, 64), dtype=np.uint8)
    fg[8:40, 16:56] = 255
    Image.fromarray(fg, "L").save(tmp_path / "mask.png")
    Image.fromarray(fg[:32], "L").save(tmp_path / "small.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    masks = [fg / 255.0] * 3
    files = [str(tmp_path / "mask.png")] * 3
    plain = consistent(sd, PROMPTS[0], PROMPTS[1:], seed=3, control=MasaCtrl(start_step=0))
    arrays = consistent(sd, PROMPTS[0], PROMPTS[1:], seed=3, control=MasaCtrl(start_step=0, masks=masks))
    paths = consistent(sd, PROMPTS[0], PROMPTS[1:], seed=3, control=MasaCtrl(start_step=0, masks=files))
    assert all(_same(a, b) for a, b in zip(arrays.images, paths.images))
    assert not _same(paths.images[1], plain.images[1])  # the mask did act on the target
    assert MasaCtrl(masks=files).options()["masks"] == files  # JSON-able: the sidecar can replay it
    with pytest.raises(ValueError, match="mask 1 has size \\(32, 64\\)"):
        consistent(sd, PROMPTS[0], PROMPTS[1:], control=MasaCtrl(masks=[files[0], str(tmp_path / "small.png"),
                                                                        files[0]]))
    with pytest.raises(ValueError, match="mask file .*nothing.png' does not exist"):
        consistent(sd, PROMPTS[0], PROMPTS[1:], control=MasaCtrl(masks=[str(tmp_path / "nothing.png")] * 3))
    with pytest.raises(ValueError, match="junk.png' is not an image"):
        consistent(sd, PROMPTS[0], PROMPTS[1:], control=MasaCtrl(masks=[str(tmp_path / "junk.png")] * 3))
    with pytest.raises(ValueError, match="one mask per image"):
        MasaCtrl(masks=files[0])


def test_bad_input_raises_before_denoising(sd):
    calls = []
    handle = sd.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        bad_layout = BatchLayout.standard(2, True, groups=[0, 1], roles=["source", "target"])
        with pytest.raises(ValueError, match="no source"):
            sd.generate(PROMPTS[:2], controls=[MasaCtrl()], layout=bad_layout)
        with pytest.raises(ValueError, match="at least one target"):
            consistent(sd, "a cat", [])
        with pytest.raises(ValueError, match="one list of target prompts"):
            consistent(sd, ["a cat", "a dog"], ["a cat running"])
        with pytest.raises(ValueError, match="one mask per image"):
            consistent(sd, "a cat", ["a dog"], control=MasaCtrl(masks=[np.ones((64, 64))]))
        with pytest.raises(ValueError, match="image is 64x64"):
            consistent(sd, "a cat", ["a dog"], control=MasaCtrl(masks=[np.ones((64, 64)), np.ones((32, 64))]))
        with pytest.raises(ValueError, match="not in the prompt"):
            consistent(sd, "a cat", ["a dog"], control=MasaCtrl(mask_words="cat"))
        with pytest.raises(ValueError, match="no self-attention layer"):
            consistent(sd, "a cat", ["a dog"], control=MasaCtrl(start_layer=99))
        with pytest.raises(ValueError, match="layout has 4 rows"):
            sd.generate(PROMPTS, controls=[MasaCtrl()], layout=BatchLayout.standard(2, True))
    finally:
        handle.remove()
    assert not calls
    with pytest.raises(ValueError, match="not both"):
        MasaCtrl(masks=[1], mask_words="cat")
    with pytest.raises(ValueError, match="mask_threshold"):
        MasaCtrl(mask_threshold=2.0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_sources_identical(family):
    pipe = attnedit.load(f"tiny-{family}")
    c = MasaCtrl(start_step=0)
    res = consistent(pipe, "a cat sitting", ["a cat running"], seed=2, control=c)
    plain = pipe.generate(["a cat sitting", "a cat running"], seed=[2, 2])
    assert _same(res.images[0], plain.images[0])
    assert c.selected_layers  # second half of the blocks by default


def test_union_variant_formula():
    layout = BatchLayout.standard(2, True, roles=["source", "target"])
    ctx = _ctx(layout)
    c = _bound(MasaCtrl(union=True), ctx.layer.name)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4, 6, 2, 4, generator=g) for _ in range(3))
    q2, k2, v2 = c.qkv(ctx, q, k, v)
    out = attention(q2, k2, v2, regions=c.regions(ctx))
    for tgt, src in ((1, 0), (3, 2)):
        kk = torch.cat([k[src : src + 1], k[tgt : tgt + 1]], 1)
        vv = torch.cat([v[src : src + 1], v[tgt : tgt + 1]], 1)
        torch.testing.assert_close(out[tgt : tgt + 1], attention(q[tgt : tgt + 1], kk, vv))
        torch.testing.assert_close(out[src : src + 1], attention(q[src : src + 1], k[src : src + 1], v[src : src + 1]))
    with pytest.raises(ValueError, match="union"):
        MasaCtrl(union=True, mask_words="cat")


def test_stock_pipeline_sample_zero_is_the_source(sd):
    latents = sd.initial_latents(1, 64, 64, [torch.Generator().manual_seed(3)]).repeat(2, 1, 1, 1)
    control = MasaCtrl(start_step=0)
    with attnedit.controlled(sd.pipe, control):
        out = sd.pipe(["a cat", "a cat running"], latents=latents, num_inference_steps=4).images
    plain = sd.pipe(["a cat", "a cat running"], latents=latents, num_inference_steps=4).images
    assert _same(out[0], plain[0]) and not _same(out[1], plain[1])
    assert control.records()["reads_from"] == {1: 0}
