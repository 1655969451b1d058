"""Attend-and-Excite: loss and schedule against hand-computed values, words, sizes."""

from __future__ import annotations

import math

import pytest
import torch

import attnedit
from attnedit.losses import ae_step_size, attend_excite_loss, gaussian_kernel, gaussian_smooth

PROMPT = "a cat and a dog"


@pytest.fixture(scope="module")
def sd():
    return attnedit.load("tiny-sd")


def test_loss_is_driven_by_the_weakest_subject():
    peaks = torch.tensor([[0.3, 0.8], [1.2, 0.95], [1.0, 1.0]], requires_grad=True)
    loss = attend_excite_loss(peaks)
    assert torch.allclose(loss, torch.tensor([0.7, 0.05, 0.0]), atol=1e-6)
    loss.sum().backward()
    # only the weakest subject of each sample gets gradient (-1); satisfied samples none
    assert torch.equal(peaks.grad, torch.tensor([[-1.0, 0.0], [0.0, -1.0], [0.0, 0.0]]))


@pytest.mark.parametrize("case", ["one_pixel", "empty", "identical", "disjoint"])
def test_peaks_of_synthetic_maps(case):
    maps = torch.zeros(2, 6, 6)
    if case == "one_pixel":
        maps[0, 2, 2] = 1.0
        maps[1, 4, 1] = 1.0
    elif case == "identical":
        maps[:, 1:4, 1:4] = 1 / 9
    elif case == "disjoint":
        maps[0, :3] = 1 / 18
        maps[1, 3:] = 1 / 18
    peaks = gaussian_smooth(maps).flatten(1).amax(-1)
    centre = float(gaussian_kernel()[1, 1])
    expected = {"one_pixel": [centre, centre], "empty": [0.0, 0.0], "identical": [1 / 9, 1 / 9],
                "disjoint": [1 / 18, 1 / 18]}[case]
    assert torch.allclose(peaks, torch.tensor(expected), atol=1e-6)
    loss = attend_excite_loss(peaks[None])
    assert float(loss) == pytest.approx(1.0 - min(expected), abs=1e-6)


def test_gradient_of_the_smoothed_peak_is_finite():
    maps = torch.zeros(1, 2, 5, 5, requires_grad=True)
    loss = attend_excite_loss(gaussian_smooth(maps).flatten(2).amax(-1))
    loss.sum().backward()
    assert bool(torch.isfinite(maps.grad).all())


def test_official_step_sizes_and_refinement_schedule():
    assert ae_step_size(20, 0, 50) == pytest.approx(20.0)
    assert ae_step_size(20, 49, 50) == pytest.approx(20 * math.sqrt(0.5))
    assert ae_step_size(20, 10, 50) == pytest.approx(20 * math.sqrt(1 - 0.5 * 10 / 49))
    ae = attnedit.AttendExcite(words=["cat"])
    plans = {i: ae.plan(i, 50) for i in range(25)}
    refine = {i: p.target for i, p in plans.items() if p.iterations}
    assert refine == {0: pytest.approx(0.95), 10: pytest.approx(0.5), 20: pytest.approx(0.2)}
    assert plans[10].iterations == 20 and plans[10].final_update
    assert {i for i in range(25) if ae.plan(i, 25).iterations} == {0, 5, 10}  # scaled to 25 steps
    assert ae.steps.bounds(50) == (0, 25)


def test_multi_token_words_and_token_modes(sd):
    # the tiny tokenizer is byte-level: "cat" is three tokens
    ae = attnedit.AttendExcite(words=["cat", "dog"], thresholds={})
    sd(PROMPT, seed=0, steps=2, controls=[ae])
    subjects = ae.state.subjects[0]
    assert [len(s) for s in subjects] == [3, 3]
    tokens = sd.pipe.tokenizer(PROMPT)["input_ids"]
    eos = len(tokens) - 1
    assert ae.state.softmax_sets[0] == list(range(1, eos))  # prompt tokens only: no SOT, EOT, padding
    parity = attnedit.AttendExcite(words=["cat", "dog"], token_mode="ae", thresholds={})
    sd(PROMPT, seed=0, steps=2, controls=[parity])
    assert parity.state.softmax_sets[0] == list(range(1, 76))  # diffusers' 1:-1 slice
    own = attnedit.AttendExcite(words=["cat", "dog"], token_mode="subjects", thresholds={})
    sd(PROMPT, seed=0, steps=2, controls=[own])
    assert own.state.softmax_sets[0] == sorted(subjects[0] + subjects[1])  # only the subjects compete
    idx = attnedit.AttendExcite(words=[[subjects[0][0]], "dog"], thresholds={})
    sd(PROMPT, seed=0, steps=2, controls=[idx])
    assert idx.state.subjects[0][0] == [subjects[0][0]]


def test_non_square_size_uses_the_registry_grid(sd):
    ae = attnedit.AttendExcite(words=["cat"], thresholds={}, early_exit=False)
    grids = []
    orig = ae.observe

    def spy(ctx, probs):
        if ctx.phase == "guidance" and ctx.layer.name in ae.state.layer_set:
            grids.append((ctx.grid, probs.shape[1]))
        return orig(ctx, probs)

    ae.observe = spy
    sd(PROMPT, seed=0, steps=2, controls=[ae], height=64, width=96)
    assert grids and all(g == (8, 12) and n == 96 for g, n in grids)  # tiny SD maps at latent/1


def test_bad_options():
    with pytest.raises(ValueError, match="thresholds"):
        attnedit.AttendExcite(words=["cat"], thresholds={0: 1.5})
    with pytest.raises(ValueError, match="subject words"):
        attnedit.AttendExcite(words=[])
    with pytest.raises(ValueError, match="token_mode"):
        attnedit.AttendExcite(words=["cat"], token_mode="all")
    with pytest.raises(ValueError, match="at least two subject words"):
        attnedit.AttendExcite(words=["cat"], token_mode="subjects")
