"""Bounded Attention: masks element by element on hand-built boxes, loss values, refinement, input checks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import attnedit
from attnedit.guidance import LayerMaps
from attnedit.layout import BatchLayout
from attnedit.losses import bounded_iou_loss
from attnedit.methods.bounded import box_masks, cross_table, kmeans, self_table, subject_bits

PROMPT = "a cat and a dog on grass"
BOXES = [[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0]]  # overlapping


@pytest.fixture(scope="module")
def sd():
    return attnedit.load("tiny-sd")


@pytest.fixture(scope="module")
def ran(sd):
    """A control after one short run (its per-run state is filled in)."""
    ba = attnedit.BoundedAttention(boxes=BOXES, words=["cat", "dog"], refine=False)
    sd(PROMPT, seed=0, steps=1, controls=[ba])
    return ba


def test_box_masks_by_hand():
    m = box_masks([[0.0, 0.0, 0.5, 0.5]], (4, 4))[0]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(m, expected)
    m = box_masks([[0.25, 0.0, 0.75, 0.5]], (4, 6))[0]  # non-square: rows 0:2, columns round(1.5):round(4.5)
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[0:2, 2:4] = True
    assert torch.equal(m, expected)
    thin = box_masks([[0.1, 0.6, 0.12, 0.62]], (4, 4))[0]  # thinner than a cell: the centre cell
    assert thin.sum() == 1 and bool(thin[2, 0])


def test_subject_bits_and_tables():
    masks = torch.tensor([[[1, 1, 0, 0], [0, 1, 1, 0]]], dtype=torch.bool)  # (1, S=2, N=4)
    assert subject_bits(masks).tolist() == [[1, 3, 2, 0]]
    t = self_table(2)
    for a in range(4):
        for b in range(4):
            assert bool(t[a, b]) == (a == 0 or b == 0 or (a & b) != 0)
    assert not bool(t[1, 2]) and bool(t[3, 2])


def _expected_cross(bits, labels, guidance, mask_eos=True):
    """Official rules written out per (pixel, token)."""
    n, m = len(bits), len(labels)
    out = torch.ones(n, m, dtype=torch.bool)
    for p in range(n):
        for t in range(m):
            lab = int(labels[t])
            if lab == 1:
                out[p, t] = False
            elif lab == 2:
                out[p, t] = not (mask_eos and bits[p] == 0 and not guidance)
            elif lab >= 3:
                out[p, t] = (bits[p] & (lab - 3)) != 0 or (guidance and bits[p] == 0)
    return out


@pytest.mark.parametrize("grid", [(8, 8), (4, 6)])
@pytest.mark.parametrize("phase", ["denoise", "guidance"])
def test_region_masks_element_by_element(ran, grid, phase):
    layout = BatchLayout.standard(1, cfg=phase == "denoise")
    smp = ran.state.samples[0]
    labels = smp["labels"]
    # token classes by hand: subject tokens, filler words (a, and, a, on), EOS
    assert all(int(labels[p]) == 3 + 1 for p in smp["subjects"][0])
    assert all(int(labels[p]) == 3 + 2 for p in smp["subjects"][1])
    assert int(labels[smp["eos"]]) == 2
    assert sorted(p for p in range(len(labels)) if int(labels[p]) == 1) == smp["filter"]
    assert len(smp["filter"]) == 1 + 3 + 1 + 2  # byte-level tokens of "a", "and", "a", "on"
    boxes = box_masks(BOXES, grid).flatten(1)
    bits = [int(boxes[0, p]) + 2 * int(boxes[1, p]) for p in range(boxes.shape[1])]
    hs = torch.zeros(1)
    ctx = SimpleNamespace(phase=phase, text=slice(0, len(labels)), grid=grid, layout=layout, hidden_states=hs)
    cross = ran.regions(ctx).dense()[:, 0]
    expected = _expected_cross(bits, labels, guidance=phase == "guidance")
    cond = layout.cond_rows()[0]
    assert torch.equal(cross[cond], expected)
    if phase == "denoise":
        assert bool(cross[layout.indices(cfg="uncond")[0]].all())  # uncond half: no cross mask
    ctx.text = None
    selfm = ran.regions(ctx).dense()[:, 0]
    n = len(bits)
    exp_self = torch.tensor([[bits[q] == 0 or bits[k] == 0 or (bits[q] & bits[k]) != 0 for k in range(n)]
                             for q in range(n)])
    for row in range(layout.size):
        assert torch.equal(selfm[row], exp_self)  # both CFG halves
    assert bool(selfm.any(-1).all()) and bool(cross.any(-1).all())  # no empty row


def test_cross_table_without_eos_masking():
    t = cross_table(1, guidance=False, mask_eos=False)
    assert bool(t[0, 2])  # background pixel sees EOS
    assert not bool(cross_table(1, guidance=False, mask_eos=True)[0, 2])


def test_filter_words_override(sd):
    ba = attnedit.BoundedAttention(boxes=BOXES, words=["cat", "dog"], filter_words=["grass"], refine=False,
                                   steps=(0, 0))
    sd(PROMPT, seed=0, steps=1, controls=[ba])
    smp = ba.state.samples[0]
    tokens = ba.state.run.tokens_of_sample(0)
    assert smp["filter"] == tokens.find("grass")


def test_iou_loss_by_hand():
    fg = torch.tensor([[1.0, 0.0, 1.0]])
    bg = torch.tensor([[0.0, 0.0, 1.0]])
    assert torch.allclose(bounded_iou_loss(fg, bg), torch.tensor([[0.0, 1.0, 0.5625]]))


def test_control_loss_on_synthetic_maps(ran):
    grid = (4, 4)
    boxes = box_masks([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], grid).flatten(1)
    saved = ran.boxes
    ran.boxes = [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)]
    try:
        cols = ran.state.text_cols
        c = len(cols)
        uniform = LayerMaps(torch.full((1, 16, c), 1.0 / c), grid, "cross", cols)
        inside = torch.nonzero(boxes.any(0)).flatten()
        self_uniform = LayerMaps(torch.full((1, 16, len(inside)), 1.0 / 16), grid, "self", inside)
        # |B_i| = 4, |Bg| = 8, S = 2: IoU = 4 / (4 + 2 * 8) = 0.2, (1 - 0.2)^2 = 0.64 per subject
        loss = ran.loss({"c": uniform, "s": self_uniform}, 0, 0)
        assert float(loss) == pytest.approx(1.5 * 1.28 + 0.5 * 1.28, rel=1e-5)
        # all subject attention inside its own box, none on the background: loss 0
        col = {int(q): i for i, q in enumerate(cols.tolist())}
        probs = torch.zeros(1, 16, c)
        smp = ran.state.samples[0]
        for i, pos in enumerate(smp["subjects"]):
            for p in torch.nonzero(boxes[i]).flatten().tolist():
                probs[0, p, [col[q] for q in pos]] = 1.0 / len(pos)
        assert float(ran.loss({"c": LayerMaps(probs, grid, "cross", cols)}, 0, 0)) == pytest.approx(0.0, abs=1e-6)
    finally:
        ran.boxes = saved


def test_official_schedule(ran):
    assert ran.plan(0, 50).step_size == pytest.approx(8.0)
    assert ran.state.guide_window == (0, 15)  # 30 % of 50 steps: the official 15
    assert ran.plan(14, 50).step_size == pytest.approx(8.0 - 6.0 * 14 / 15)
    p = ran.plan(3, 50)
    assert (p.iterations, p.target, p.check, p.final_update) == (5, pytest.approx(0.4), "after", False)
    assert ran.state.refine_steps == []  # refine=False
    on = attnedit.BoundedAttention(boxes=BOXES, words=["cat", "dog"])
    on.reset()
    on._schedule(50)
    assert on.state.refine_steps == list(range(15, 50, 5))  # official: 15, 20, ..., 45
    ran._schedule(1)


def test_kmeans_separates_blobs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 3, generator=g) * 0.05
    b = torch.randn(20, 3, generator=g) * 0.05 + 5.0
    x = torch.cat([a, b])[None]
    labels, centers = kmeans(x, 2, n_init=5, generator=g)
    assert len(set(labels[0, :20].tolist())) == 1 and len(set(labels[0, 20:].tolist())) == 1
    assert labels[0, 0] != labels[0, 20]
    warm, _ = kmeans(x, 2, centers=centers)
    assert torch.equal(warm, labels)


def test_guidance_and_refinement_end_to_end(sd):
    ba = attnedit.BoundedAttention(boxes=[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], words=["cat", "dog"],
                                   refine_start=2, refine_every=1, kmeans_inits=3, steps=(0, 1))
    res = sd(PROMPT, seed=0, steps=3, controls=[ba])
    log = res.records["bounded"]["guidance"]
    assert [e["step"] for e in log] == [0]
    assert log[0]["forwards"] >= 1 and log[0]["last_loss"][0] <= log[0]["loss"][0]
    masks = res.records["bounded"]["masks"]
    assert masks.shape[:2] == (1, 2) and bool(masks.flatten(2).any(-1).all())
    plain = sd(PROMPT, seed=0, steps=3)
    assert res.images[0].tobytes() != plain.images[0].tobytes()


def test_guidance_lowers_the_bounded_loss(sd):
    ba = attnedit.BoundedAttention(boxes=[[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]], words=["cat", "dog"],
                                   refine=False, steps=(0, 1), loss_threshold=0.0, iterations=4)
    res = sd(PROMPT, seed=4, steps=2, controls=[ba])
    entry = res.records["bounded"]["guidance"][0]
    assert entry["forwards"] == 4 and entry["last_loss"][0] < entry["loss"][0]


@pytest.mark.parametrize(
    ("boxes", "words", "match"),
    [
        ([[0.0, 0.0, 1.2, 0.5]], ["cat"], "outside the image"),
        ([[-0.1, 0.0, 0.5, 0.5]], ["cat"], "outside the image"),
        ([[0.3, 0.0, 0.3, 0.5]], ["cat"], "zero area"),
        ([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], ["cat"], "more boxes than words"),
        ([[0, 0, 0.5, 0.5]], ["cat", "dog"], "more words than boxes"),
    ],
)
def test_bad_boxes(boxes, words, match):
    with pytest.raises(ValueError, match=match):
        attnedit.BoundedAttention(boxes=boxes, words=words)


def test_bad_words_and_models_fail_before_denoising(sd):
    calls: list[int] = []
    handle = sd.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="zebra.*a, cat, and, a, dog, on, grass"):
            sd(PROMPT, seed=0, steps=1, controls=[attnedit.BoundedAttention(boxes=BOXES, words=["cat", "zebra"])])
        with pytest.raises(ValueError, match="filler word"):
            sd(PROMPT, seed=0, steps=1, controls=[attnedit.BoundedAttention(boxes=BOXES, words=["cat", "on"])])
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(ValueError, match="BoundedAttention does not run on Stable Diffusion 3: .*UNet"):
        attnedit.load("tiny-sd3")(PROMPT, seed=0, steps=1, controls=[attnedit.BoundedAttention(
            boxes=BOXES, words=["cat", "dog"])])


def _layout_unet(sdxl: bool):
    import diffusers as d

    if sdxl:
        return d.UNet2DConditionModel(
            block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=32, sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
            transformer_layers_per_block=(1, 2, 10), norm_num_groups=8)
    return d.UNet2DConditionModel(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=2,
                                  layers_per_block=2, sample_size=64, norm_num_groups=8)


def test_official_layers_on_real_layouts():
    from attnedit.families import FAMILIES, build_registry
    from attnedit.guidance import default_map_layers, map_level
    from attnedit.methods.bounded import _official_layers

    reg = build_registry(_layout_unet(False), "sd")
    loss, mask = _official_layers(reg.ordered(), map_level(reg, 64), FAMILIES["sd"].method_defaults["bounded"])
    names = [i.name.replace(".transformer_blocks.0", "") for i in loss]
    assert names == ["mid_block.attentions.0.attn1", "mid_block.attentions.0.attn2"] + [
        f"up_blocks.1.attentions.{a}.attn{k}" for a in range(3) for k in (1, 2)]  # official module idx 12-19
    assert mask == loss[2:]  # 14-19
    ae = [i.name for i in default_map_layers(reg, 64)]
    assert ae == [f"down_blocks.2.attentions.{a}.transformer_blocks.0.attn2" for a in range(2)] + [
        f"up_blocks.1.attentions.{a}.transformer_blocks.0.attn2" for a in range(3)]  # the A&E 16x16 layers
    reg = build_registry(_layout_unet(True), "sdxl")
    loss, mask = _official_layers(reg.ordered(), map_level(reg, 128), FAMILIES["sdxl"].method_defaults["bounded"])
    assert [i.name for i in loss] == [f"up_blocks.0.attentions.0.transformer_blocks.{t}.attn{k}"
                                      for t in range(1, 7) for k in (1, 2)]  # official 70-81
    assert mask == loss


def test_stock_pipeline_run_learns_the_schedule_late(sd):
    ba = attnedit.BoundedAttention(boxes=[[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], words=["cat", "dog"],
                                   refine_start=1, refine_every=1, kmeans_inits=2, steps=(0, 3))
    attnedit.apply(sd.pipe, ba)
    try:
        sd.pipe("a cat and a dog", num_inference_steps=3)
    finally:
        attnedit.remove(sd.pipe)
    rec = ba.records()
    assert [e["step"] for e in rec["guidance"]] == [0, 1, 2]
    assert rec["masks"].shape == (1, 2, 8, 8)


def test_masks_instead_of_boxes():
    full = np.zeros((16, 16))
    full[:8, :8] = 1.0
    ring = np.zeros((16, 16))
    ring[4:16, 4:16] = 1.0
    by_mask = attnedit.BoundedAttention(masks=[full, ring], words=["cat", "dog"])
    by_box = attnedit.BoundedAttention(boxes=[[0, 0, 0.5, 0.5], [0.25, 0.25, 1, 1]], words=["cat", "dog"])
    for grid in ((8, 8), (4, 4), (16, 16)):
        assert torch.equal(by_mask.region_masks(grid), by_box.region_masks(grid))
    dot = np.zeros((64, 64))
    dot[40, 10] = 1.0  # smaller than a cell of a 4x4 grid: keeps the cell of its centroid
    tiny = attnedit.BoundedAttention(masks=[dot], words=["cat"]).region_masks((4, 4))[0]
    assert tiny.sum() == 1 and bool(tiny[2, 0])
    with pytest.raises(ValueError, match="either boxes"):
        attnedit.BoundedAttention(boxes=[[0, 0, 1, 1]], masks=[full], words=["cat"])
    with pytest.raises(ValueError, match="mask 0 is empty"):
        attnedit.BoundedAttention(masks=[np.zeros((4, 4))], words=["cat"])
    with pytest.raises(ValueError, match="more masks than words"):
        attnedit.BoundedAttention(masks=[full, ring], words=["cat"])
