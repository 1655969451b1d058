"""The latent-guidance engine: equality when inactive, loss decrease, guards, validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import attnedit
from attnedit.guidance import GuidanceControl, StepPlan, map_level, mean_map
from attnedit.losses import gaussian_kernel, gaussian_smooth, token_softmax

PROMPT = "a cat and a dog"


@pytest.fixture(scope="module")
def sd():
    return attnedit.load("tiny-sd")


def _img(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


# ------------------------------------------------------------------------------ pure helpers
def test_ae_gaussian_kernel_matches_official_quirk():
    k = gaussian_kernel(3, 0.5, "ae")
    e = math.exp(-1)
    w = torch.tensor([e, 1.0, e]) / (1 + 2 * e)
    assert torch.allclose(k, torch.outer(w, w), atol=1e-6)
    assert abs(float(k[1, 1]) - 0.3319) < 1e-3
    std = gaussian_kernel(3, 0.5, "standard")
    e2 = math.exp(-2)
    assert abs(float(std[1, 1]) - (1 / (1 + 2 * e2)) ** 2) < 1e-6
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(4)


def test_smoothing_a_one_pixel_map_gives_the_kernel():
    m = torch.zeros(5, 7)
    m[2, 3] = 1.0
    out = gaussian_smooth(m)
    assert torch.allclose(out[1:4, 2:5], gaussian_kernel(3, 0.5), atol=1e-6)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-6)


def test_token_softmax_excludes_columns():
    maps = torch.tensor([[[0.01, 0.02, 0.5]]])  # (1, 1, 3)
    keep = torch.tensor([True, True, False])
    p = token_softmax(maps, keep)
    assert float(p[0, 0, 2]) == 0.0
    expected = torch.softmax(torch.tensor([1.0, 2.0]), 0)
    assert torch.allclose(p[0, 0, :2], expected, atol=1e-6)


def test_mean_map_resizes_to_the_largest_grid():
    from attnedit.guidance import LayerMaps

    a = LayerMaps(torch.ones(1, 6, 2), (2, 3), "cross", torch.arange(2))
    b = LayerMaps(torch.full((1, 24, 2), 3.0), (4, 6), "cross", torch.arange(2))
    m = mean_map({"a": a, "b": b})
    assert m.shape == (1, 4, 6, 2)
    assert torch.allclose(m, torch.full_like(m, 2.0))


def test_map_level_follows_native_size():
    from attnedit.layers import LayerInfo, LayerRegistry

    reg = LayerRegistry("sd")
    for lv in (0, 1, 2, 3):
        reg.layers[f"l{lv}"] = LayerInfo(f"l{lv}", "cross", "down", lv, 0, 0, lv, lv, "attn2")
    assert map_level(reg, 64) == 2  # SD1.5 at 512 px: 16x16
    assert map_level(reg, 96) == 2  # SD2 at 768 px: 24x24
    assert map_level(reg, 8) == 0  # 64-px testbed: full latent grid
    selfonly = LayerRegistry("sd")
    selfonly.layers["s"] = LayerInfo("s", "self", "down", 0, 0, 0, 0, 0, "attn1")
    with pytest.raises(ValueError, match="no cross-attention layers"):
        map_level(selfonly, 64)


# ------------------------------------------------------------------------------ the engine
def test_zero_guided_steps_equal_the_plain_pipeline(sd):
    plain = sd(PROMPT, seed=3, steps=3)
    ae = attnedit.AttendExcite(words=["cat", "dog"], steps=(0, 0))
    st = attnedit.AStar(words=["cat", "dog"], steps=(0, 0))
    guided = sd(PROMPT, seed=3, steps=3, controls=[ae, st])
    assert np.array_equal(_img(plain), _img(guided))
    assert guided.records == {}


def test_guidance_changes_the_output_and_lowers_the_loss(sd):
    ae = attnedit.AttendExcite(words=["cat", "dog"], thresholds={0: 0.99}, max_refinement=3, scale_factor=200)
    res = sd(PROMPT, seed=0, steps=2, controls=[ae])
    log = res.records["attend_excite"]["guidance"]
    assert [e["step"] for e in log] == [0]  # Steps(0, 0.5) of 2 steps
    first, last = log[0]["loss"][0], log[0]["last_loss"][0]
    assert last < first
    assert log[0]["updates"] == [4]  # 3 refinement updates + the normal one
    assert not np.array_equal(_img(res), _img(sd(PROMPT, seed=0, steps=2)))


def test_early_exit_gives_the_same_gradient(sd):
    grads = []
    for early in (True, False):
        ae = attnedit.AttendExcite(words=["cat"], early_exit=early)
        ctrl = attnedit.Controller(sd.pipe, [ae]).install()
        try:
            sd.pipe.scheduler.set_timesteps(2)
            run = ctrl.begin_run([PROMPT], num_steps=2, height=64, width=64, cfg=True)
            z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            from attnedit.guidance import encode_condition

            ae.state.cond = encode_condition(run, z)
            loss, grad = ae._loss_grad(run, z, 0, 0)
        finally:
            ctrl.remove()
        grads.append((loss, grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-7)
    assert bool(grads[0][1].abs().sum() > 0)


class _NaNLoss(GuidanceControl):
    """A test control: A&E-like mass loss, NaN for sample 1."""

    name = "test_nan"

    def text_columns(self, run):
        return [1, 2]

    def loss(self, maps, step, iteration):
        a = mean_map(maps)
        loss = -a.flatten(1).sum(-1)
        return loss + torch.tensor([0.0, float("nan")])[: loss.shape[0]].to(loss.device)

    def plan(self, step, num_steps):
        return StepPlan(10.0)


def test_non_finite_update_is_skipped_with_a_warning(sd):
    ctl = _NaNLoss(steps=(0, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sd([PROMPT, PROMPT], seed=[5, 5], steps=2, controls=[ctl])
    assert any("non-finite" in str(w.message) for w in caught)
    plain = sd([PROMPT, PROMPT], seed=[5, 5], steps=2)
    a, b = (np.asarray(im, dtype=np.int16) for im in res.images)
    pa, pb = (np.asarray(im, dtype=np.int16) for im in plain.images)
    assert np.array_equal(b, pb)  # sample 1: update skipped, same as plain
    assert not np.array_equal(a, pa)  # sample 0: guided
    assert res.records["test_nan"]["guidance"][0] == {"step": 0, "skipped_non_finite": [1]}


def test_nan_gradient_keeps_the_latent():
    ctl = _NaNLoss()
    ctl.reset()
    z = torch.ones(2, 4, 2, 2)
    grad = torch.ones(2, 4, 2, 2)
    grad[1, 0, 0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        new = ctl._apply(z, torch.zeros(2), grad, 1.0, torch.ones(2, dtype=torch.bool), 7)
    assert torch.equal(new[1], z[1]) and torch.equal(new[0], torch.zeros(4, 2, 2))
    assert bool(torch.isfinite(new).all())


def test_gradient_clipping_bounds_each_sample_update():
    ctl = _NaNLoss(max_grad_norm=0.5)
    ctl.reset()
    z = torch.zeros(2, 4, 2, 2)
    grad = torch.stack([torch.full((4, 2, 2), 10.0), torch.full((4, 2, 2), 0.01)])
    new = ctl._apply(z, torch.zeros(2), grad, 2.0, torch.ones(2, dtype=torch.bool), 0)
    assert float((z - new)[0].norm()) == pytest.approx(1.0, rel=1e-5)  # alpha * 0.5
    assert torch.allclose((z - new)[1], 2.0 * grad[1])  # under the cap: untouched
    with pytest.raises(ValueError, match="max_grad_norm"):
        _NaNLoss(max_grad_norm=0.0)


def test_stock_pipeline_guides_every_step_like_edit_pipeline(sd):
    """A plain stock call under attnedit.apply gets the whole method, step 0 included; passing the
    old `callback_on_step_end=ctrl.step_callback` by hand changes nothing (no double update)."""
    ae = attnedit.AttendExcite(words=["cat", "dog"], thresholds={})
    latents = sd.initial_latents(1, 64, 64, [torch.Generator().manual_seed(0)])
    call = dict(num_inference_steps=4, guidance_scale=7.5, height=64, width=64, latents=latents, output_type="np")
    ctrl = attnedit.apply(sd.pipe, ae)
    try:
        stock = sd.pipe(PROMPT, **call).images
        by_hand = sd.pipe(PROMPT, callback_on_step_end=ctrl.step_callback,
                          callback_on_step_end_tensor_inputs=["latents"], **call).images
    finally:
        attnedit.remove(sd.pipe)
    assert [e["step"] for e in ae.records()["guidance"]] == [0, 1]
    assert not hasattr(sd.pipe, "_attnedit_controller")
    assert np.array_equal(stock, by_hand)
    ours = sd(PROMPT, seed=0, steps=4, guidance=7.5, controls=[attnedit.AttendExcite(words=["cat", "dog"],
                                                                                       thresholds={})])
    assert np.array_equal(np.asarray(ours.image), (stock[0] * 255).round().astype(np.uint8))
    plain = sd.pipe(PROMPT, **call).images
    assert not np.array_equal(stock, plain)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_guidance_runs_on_sdxl_sd3_flux(family):
    pipe = attnedit.load(f"tiny-{family}")
    ae = attnedit.AttendExcite(words=["cat", "dog"], thresholds={})
    res = pipe(PROMPT, seed=0, steps=2, controls=[ae], width=96 if family != "sd3" else 64)
    log = res.records["attend_excite"]["guidance"]
    assert log[0]["step"] == 0 and 0.0 < log[0]["loss"][0] <= 1.0


# ------------------------------------------------------------------------------ bad input
def test_pixart_is_refused_before_denoising():
    for family, match in (("pixart", "AttendExcite does not run on PixArt.*no step callback"),):
        pipe = attnedit.load(f"tiny-{family}")
        calls: list[int] = []
        handle = pipe.denoiser.register_forward_pre_hook(lambda *a, seen=calls: seen.append(1))
        try:
            with pytest.raises(ValueError, match=match):
                pipe(PROMPT, seed=0, steps=2, controls=[attnedit.AttendExcite(words=["cat"])])
        finally:
            handle.remove()
        assert calls == []


def test_absent_word_lists_the_prompt_words(sd):
    with pytest.raises(ValueError, match="zebra.*a, cat, and, a, dog"):
        sd(PROMPT, seed=0, steps=2, controls=[attnedit.AStar(words=["cat", "zebra"])])


def test_stop_word_subject_is_refused(sd):
    with pytest.raises(ValueError, match="filler word"):
        sd(PROMPT, seed=0, steps=2, controls=[attnedit.AttendExcite(words=["and"])])
    with pytest.raises(ValueError, match="start/end token"):
        sd(PROMPT, seed=0, steps=2, controls=[attnedit.AttendExcite(words=[0])])


def test_controls_are_built_by_name_with_options():
    ctl = attnedit.make_control("attend_excite", {"words": ["cat"], "scale_factor": 10})
    assert ctl.scale_factor == 10.0
    with pytest.raises(ValueError, match="unknown option 'scale'"):
        attnedit.make_control("astar", {"words": ["cat"], "scale": 1})
    assert attnedit.make_control("bounded", {"boxes": [[0, 0, 0.5, 0.5]], "words": ["cat"]}).name == "bounded"


class _StepRecorder(attnedit.Control):
    """Records the denoising steps other controls see (begin_step and attention calls)."""

    name = "test_steps"

    def reset(self):
        super().reset()
        self.state.begun = []
        self.state.seen = set()

    def begin_step(self, run, step):
        self.state.begun.append(step)

    def capture(self, ctx):
        self.state.seen.add((ctx.phase, ctx.step))
        return None


def test_guidance_passes_do_not_disturb_step_tracking(sd):
    rec = _StepRecorder()
    ae = attnedit.AttendExcite(words=["cat"], thresholds={}, steps=(0, 3))
    sd(PROMPT, seed=0, steps=4, controls=[ae, rec])
    assert rec.state.begun == [0, 1, 2, 3]  # every denoising step starts once, after its guidance pass
    assert rec.state.seen == {("denoise", i) for i in range(4)}
