"""IR-Diffusion: isolation masks element by element, reposition geometry and labels, runs, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnedit
from attnedit.controls import CallContext
from attnedit.kernels import attention
from attnedit.layers import LayerInfo
from attnedit.layout import BatchLayout
from attnedit.masks import box_cells, otsu_threshold, subject_labels
from attnedit.methods.ir_diffusion import IsolationAttention, RepositionAttention, ir_diffusion

BOXES = [(0.0, 0.0, 0.5, 1.0), (0.25, 0.25, 1.0, 0.75)]  # A touches three borders; B overlaps A, is smaller
# grid (4, 6): cell centres x = .083 .25 .417 .583 .75 .917, y = .125 .375 .625 .875
EXPECTED = torch.tensor([
    [1, 1, 1, 0, 0, 0],
    [1, 2, 2, 2, 2, 2],
    [1, 2, 2, 2, 2, 2],
    [1, 1, 1, 0, 0, 0],
]).flatten()


@pytest.fixture(scope="module")
def sd():
    return attnedit.load("tiny-sd")


def _ctx(layout: BatchLayout, grid=(4, 6), kind="self", name="up_blocks.1.attentions.0.transformer_blocks.0.attn1",
         text: slice | None = None, hidden=None, attn=None):
    info = LayerInfo(name, kind, "up", 1, 0, 0, 5, 0, name[-5:])
    n = grid[0] * grid[1]
    image = slice(0, n) if text is None else slice(text.stop, text.stop + n)
    return CallContext(layer=info, attn=attn, step=0, num_steps=4, t=1.0, phase="denoise", layout=layout,
                       grid=grid, image=image, text=text, hidden_states=hidden)


def _expected_allowed(lab: torch.Tensor) -> torch.Tensor:
    q, k = lab[:, None], lab[None, :]
    return ~((q >= 1) & (k >= 1) & (q != k))


def test_labels_border_and_overlap_rule():
    assert torch.equal(subject_labels((4, 6), BOXES), EXPECTED)
    # the same subjects as pixel masks give the same labels (centre sampling, smaller wins)
    masks = []
    for x0, y0, x1, y1 in BOXES:
        m = np.zeros((40, 60))
        m[round(y0 * 40) : round(y1 * 40), round(x0 * 60) : round(x1 * 60)] = 1
        masks.append(m)
    assert torch.equal(subject_labels((4, 6), masks=[torch.tensor(m) for m in masks]), EXPECTED)
    # a box smaller than a cell, in the corner, keeps the cell holding its centre
    cells = box_cells((0.9, 0.9, 1.0, 1.0), (4, 6))
    assert cells.sum() == 1 and bool(cells[3, 5])
    # ties: equal areas -> the subject listed first wins
    tie = subject_labels((2, 2), [(0, 0, 1, 0.5), (0, 0, 1, 0.5)])
    assert tie.tolist() == [1, 1, 0, 0]


def test_isolation_mask_element_by_element():
    layout = BatchLayout.standard(2, True, roles=["source", "target"])
    iso = IsolationAttention(boxes=BOXES)
    ctx = _ctx(layout)
    dense = iso.regions(ctx).dense()[:, 0]  # (B, N, N)
    expect = _expected_allowed(EXPECTED)
    for row in range(4):
        if layout.rows[row].role == "target":
            assert torch.equal(dense[row], expect)
        else:
            assert bool(dense[row].all())
    assert int((~expect).sum()) == 2 * int(((EXPECTED == 1).sum()) * ((EXPECTED == 2).sum()))
    # the attention output equals a softmax with exactly those entries removed
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 24, 2, 4, generator=g) for _ in range(3))
    out = attention(q, k, v, regions=iso.regions(ctx))
    logits = torch.einsum("qhd,khd->hqk", q[1], k[1]) / 2.0
    logits = logits.masked_fill(~expect[None], float("-inf"))
    manual = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v[1])
    torch.testing.assert_close(out[1], manual)


def test_isolation_joint_layers_keep_text_global():
    layout = BatchLayout.standard(1, False)
    iso = IsolationAttention(boxes=BOXES)
    ctx = _ctx(layout, kind="joint", text=slice(0, 3))  # FLUX order [text | image]
    dense = iso.regions(ctx).dense()[0, 0]
    assert bool(dense[:3].all()) and bool(dense[:, :3].all())
    assert torch.equal(dense[3:, 3:], _expected_allowed(EXPECTED))


def _repo(**kw) -> RepositionAttention:
    c = RepositionAttention(target_boxes=[(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)],
                            reference_boxes=[(0.25, 0.25, 0.75, 0.75), (0.0, 0.0, 1.0, 1.0)],
                            mask_dropout=0.0, **kw)
    c.reset()
    return c


def test_reposition_geometry_and_labels():
    from diffusers.models.attention_processor import Attention

    layout = BatchLayout.standard(3, False, roles=["source", "source", "target"])
    c = _repo()
    name = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    c._mutual, c._iso, c._cross = frozenset({name}), frozenset({name}), frozenset()
    c._ref_rows = {"cond": [0, 1]}
    grid = (4, 4)
    # subject 0: reference cells rows/cols 1..2 (centre 2x2) move to the scene's top-left 2x2
    src, fg = c._move(0, grid)
    scene_tl = [0, 1, 4, 5]
    assert src[scene_tl].tolist() == [5, 6, 9, 10] and bool(fg[scene_tl].all()) and int(fg.sum()) == 4
    # subject 1: the whole 4x4 reference squeezed into the bottom-right 2x2 (sampled at cell centres)
    src, fg = c._move(1, grid)
    assert src[[10, 11, 14, 15]].tolist() == [5, 7, 13, 15] and int(fg.sum()) == 4
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4).eval()
    hidden = torch.randn(3, 16, 8)
    ctx = _ctx(layout, grid, hidden=hidden, attn=attn)
    q = attn.to_q(hidden).view(3, 16, 2, 4)
    k = attn.to_k(hidden).view(3, 16, 2, 4)
    v = attn.to_v(hidden).view(3, 16, 2, 4)
    _, k2, v2 = c.qkv(ctx, q, k, v)
    assert k2.shape == (3, 48, 2, 4)
    with torch.no_grad():
        torch.testing.assert_close(k2[2, 0], attn.to_k(hidden[0, 5]).view(2, 4))  # ref 0 cell 5 at scene cell 0
        torch.testing.assert_close(k2[2, 16 + 15], attn.to_k(hidden[1, 15]).view(2, 4))
    assert torch.equal(k2[:, 32:], k)
    dense = c.regions(ctx).dense()[:, 0]  # (B, 16, 48)
    lab = subject_labels(grid, c._targets.boxes)
    fg0, fg1 = c._move(0, grid)[1], c._move(1, grid)[1]
    for qi in range(16):
        s = int(lab[qi])
        assert torch.equal(dense[2, qi, :16], fg0 if s == 1 else torch.zeros(16, dtype=torch.bool))
        assert torch.equal(dense[2, qi, 16:32], fg1 if s == 2 else torch.zeros(16, dtype=torch.bool))
        assert torch.equal(dense[2, qi, 32:], _expected_allowed(lab)[qi])
    for ref in (0, 1):  # references: ordinary self-attention
        assert not bool(dense[ref, :, :32].any()) and bool(dense[ref, :, 32:].all())
    out = attention(q, k2, v2, regions=c.regions(ctx))
    torch.testing.assert_close(out[:2], attention(q[:2], k[:2], v[:2]))


def test_mask_dropout_is_seeded_and_never_empties_a_subject():
    c = _repo()
    c.mask_dropout = 0.9
    c.state.step = 3
    a = c._dropped((8, 8), torch.device("cpu"))
    c.state.dropped = {}
    b = c._dropped((8, 8), torch.device("cpu"))
    assert torch.equal(a, b) and bool(a.any(-1).all())
    lab = subject_labels((8, 8), c._targets.boxes)
    assert bool((a[0] <= (lab == 1)).all()) and int(a[0].sum()) < int((lab == 1).sum())


def test_isolation_and_ir_diffusion_run(sd):
    plain = sd.generate("a cat and a dog", seed=0)
    iso = sd.generate("a cat and a dog", seed=0, controls=[IsolationAttention(boxes=BOXES)])
    assert np.asarray(iso.images[0]).shape == np.asarray(plain.images[0]).shape
    assert not np.array_equal(np.asarray(iso.images[0]), np.asarray(plain.images[0]))
    off = sd.generate("a cat and a dog", seed=0, controls=[IsolationAttention(boxes=BOXES, steps=(0, 0))])
    assert np.array_equal(np.asarray(off.images[0]), np.asarray(plain.images[0]))
    res = ir_diffusion(sd, ["a cat", "a dog"], "a cat and a dog", ["cat", "dog"],
                       target_boxes=[(0.0, 0.2, 0.5, 0.9), (0.5, 0.2, 1.0, 0.9)], seed=1)
    assert len(res.images) == 3 and res.records["reposition"]["subjects"] == 2
    refs = sd.generate(["a cat", "a dog"], seed=[1001, 1001])
    for a, b in zip(res.images[:2], refs.images):  # references: ordinary attention (masked SDPA rounding)
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 2
    ref_masks = res.records["ir_diffusion"]["reference_masks"]  # the attention route
    assert len(ref_masks) == 2 and all(m.shape == (64, 64) and 0 < float(m.mean()) < 1 for m in ref_masks)


def test_otsu_threshold_splits_two_modes():
    x = torch.cat([torch.full((100,), 0.1), torch.full((50,), 0.8)])
    t = otsu_threshold(x)
    assert 0.1 < t < 0.8


def test_bad_input_raises_before_denoising(sd):
    calls = []
    handle = sd.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="outside"):
            IsolationAttention(boxes=[(0.0, 0.0, 1.2, 0.5)])
        with pytest.raises(ValueError, match="zero area"):
            IsolationAttention(boxes=[(0.3, 0.3, 0.3, 0.5)])
        with pytest.raises(ValueError, match="exactly one of boxes"):
            IsolationAttention()
        with pytest.raises(ValueError, match="image is 64x64"):
            sd.generate("a cat", controls=[IsolationAttention(masks=[np.ones((32, 32))])])
        with pytest.raises(ValueError, match="not in the prompt"):
            ir_diffusion(sd, ["a cat", "a dog"], "a cat and a dog", ["cat", "bird"])
        with pytest.raises(ValueError, match="one subject word each"):
            ir_diffusion(sd, ["a cat", "a dog"], "a cat and a dog", ["cat"])
        with pytest.raises(ValueError, match="2 reference image"):
            layout = BatchLayout.standard(3, True, roles=["source", "source", "target"])
            sd.generate(["a cat", "a dog", "a cat and a dog"], layout=layout, controls=[
                RepositionAttention(target_boxes=[(0, 0, 1, 1)], reference_boxes=[(0, 0, 1, 1)])])
        with pytest.raises(ValueError, match="reference rows"):
            sd.generate("a cat", controls=[
                RepositionAttention(target_boxes=[(0, 0, 1, 1)], reference_boxes=[(0, 0, 1, 1)])])
        with pytest.raises(ValueError, match="already isolates"):
            layout = BatchLayout.standard(2, True, roles=["source", "target"])
            sd.generate(["a cat", "a cat"], layout=layout, controls=[
                RepositionAttention(target_boxes=[(0, 0, 1, 1)], reference_boxes=[(0, 0, 1, 1)]),
                IsolationAttention(boxes=[(0, 0, 1, 1)])])
        with pytest.raises(ValueError, match="2 target subjects but 1"):
            RepositionAttention(target_boxes=BOXES, reference_boxes=[(0, 0, 1, 1)])
    finally:
        handle.remove()
    assert not calls


def test_real_reference_photos_follow_their_inversion(sd):
    from attnedit.inversion import encode_image

    photos = sd.generate(["a cat", "a dog"], seed=[7, 8]).images
    res = ir_diffusion(sd, ["a cat", "a dog"], "a cat and a dog", ["cat", "dog"], reference_images=photos,
                       target_boxes=[(0.0, 0.2, 0.5, 0.9), (0.5, 0.2, 1.0, 0.9)], seed=1, steps=3)
    assert res.records["ir_diffusion"]["real_references"] and len(res.images) == 3
    vae = sd.pipe.vae
    for photo, out in zip(photos, res.images[:2]):  # each reference ends on its VAE round trip
        rec = vae.decode(encode_image(sd, photo) / vae.config.scaling_factor).sample[0]
        rec = ((rec.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).detach().numpy()
        assert np.abs(np.asarray(out).astype(float) - rec).max() <= 1.0
    with pytest.raises(ValueError, match="reference images for"):
        ir_diffusion(sd, ["a cat", "a dog"], "a cat and a dog", ["cat", "dog"], reference_images=photos[:1])


def test_isolation_from_attention_maps_of_words(sd):
    iso = IsolationAttention(words=["cat", "dog"])
    iso.reset()
    # previous step's maps of sample 0 on a 2x2 grid: "cat" top row, "dog" bottom row
    iso.state.prev_maps = {(2, 2): [{0: torch.tensor([[1.0, 0.9, 0.0, 0.1], [0.0, 0.1, 1.0, 0.8]])}, 1]}
    ctx = _ctx(BatchLayout.standard(1, False), (4, 4))
    assert iso._labels(ctx, 0, torch.device("cpu")).reshape(4, 4).tolist() == [[1] * 4] * 2 + [[2] * 4] * 2
    # the first step has no previous maps: a one-step run equals the plain pipeline
    plain = sd.generate("a cat and a dog", seed=0, steps=1)
    one = sd.generate("a cat and a dog", seed=0, steps=1, controls=[IsolationAttention(words=["cat", "dog"])])
    assert np.array_equal(np.asarray(one.images[0]), np.asarray(plain.images[0]))
    control = IsolationAttention(words=["cat", "dog"])
    sd.generate(["a cat and a dog", "a dog and a cat"], seed=0, controls=[control])
    assert {tuple(m.shape) for m in next(iter(control.state.prev_maps.values()))[0].values()} == {(2, 16)}
    with pytest.raises(ValueError, match="not in the prompt"):
        sd.generate(["a cat and a dog", "a bird"], controls=[IsolationAttention(words=["cat", "dog"])])
    with pytest.raises(ValueError, match="exactly one of boxes / masks / words"):
        IsolationAttention(boxes=BOXES, words=["cat"])
