"""A-STAR: segregation and retention losses on hand-built maps, masks across steps, layout mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnedit
from attnedit.losses import minmax, retention_loss, segregation_loss, soft_overlap

PROMPT = "a cat and a dog"


@pytest.fixture(scope="module")
def sd():
    return attnedit.load("tiny-sd")


def _pair(a, b) -> torch.Tensor:
    return torch.stack([torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)])[None]


def test_segregation_on_synthetic_maps():
    blob = torch.zeros(4, 4)
    blob[:2] = 1.0
    other = torch.zeros(4, 4)
    other[2:] = 1.0
    assert float(segregation_loss(_pair(blob, other))) == 0.0  # disjoint
    assert float(segregation_loss(_pair(blob, blob))) == pytest.approx(0.5)  # identical
    assert float(segregation_loss(_pair(blob, torch.zeros(4, 4)))) == 0.0  # empty map
    assert float(segregation_loss(_pair(torch.zeros(4, 4), torch.zeros(4, 4)))) == 0.0  # both empty: 0, not NaN
    one, two = torch.zeros(4, 4), torch.zeros(4, 4)
    one[1, 1], two[1, 1] = 1.0, 1.0
    assert float(segregation_loss(_pair(one, two))) == pytest.approx(0.5)  # one pixel, same place
    two = torch.zeros(4, 4)
    two[3, 0] = 1.0
    assert float(segregation_loss(_pair(one, two))) == 0.0  # one pixel, elsewhere
    # hand-computed: sum min = 0.5 + 0.5 = 1, sum of both = 1.5 + 1.5 = 3
    a = torch.tensor([[1.0, 0.5], [0.0, 0.0]])
    b = torch.tensor([[0.5, 0.5], [0.5, 0.0]])
    assert float(segregation_loss(_pair(a, b))) == pytest.approx(1 / 3)
    three = torch.stack([blob, blob, blob])[None]
    assert float(segregation_loss(three)) == pytest.approx(1.5)  # three pairs


def test_retention_on_synthetic_maps():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0
    assert float(retention_loss(mask.clone(), mask)) == pytest.approx(0.5)  # map equals the mask
    off = torch.zeros(1, 1, 4, 4)
    off[..., 3, 3] = 1.0
    assert float(retention_loss(off, mask)) == pytest.approx(1.0)  # disjoint
    assert float(retention_loss(torch.zeros(1, 1, 4, 4), mask)) == pytest.approx(1.0)  # empty map
    half = mask * 0.5  # sum min = 4 * 0.5 = 2, sum = 2 + 4 = 6
    assert float(retention_loss(half, mask)) == pytest.approx(1 - 2 / 6)
    two = torch.cat([half, off], 1)
    assert float(retention_loss(two, torch.cat([mask, mask], 1), torch.tensor([1.0, 0.0]))) == pytest.approx(2 / 3)


def test_gradients_are_finite_even_for_empty_maps():
    for maps in (torch.zeros(1, 2, 3, 3), torch.rand(1, 2, 3, 3), torch.ones(1, 2, 3, 3)):
        x = maps.clone().requires_grad_(True)
        m = minmax(x)
        loss = segregation_loss(m) + retention_loss(m, (maps > 0.5).float())
        loss.sum().backward()
        assert bool(torch.isfinite(x.grad).all())


def test_minmax_and_overlap_ranges():
    x = torch.tensor([[[2.0, 4.0], [3.0, 2.0]]])
    assert torch.allclose(minmax(x), torch.tensor([[[0.0, 1.0], [0.5, 0.0]]]))
    assert torch.equal(minmax(torch.full((1, 2, 2), 3.0)), torch.zeros(1, 2, 2))
    r = torch.rand(10, 5, 5)
    s = soft_overlap(r, torch.rand(10, 5, 5))
    assert bool((s >= 0).all() and (s <= 0.5).all())


def test_retention_masks_follow_the_previous_step(sd):
    astar = attnedit.AStar(words=["cat", "dog"])
    res = sd(PROMPT, seed=1, steps=4, controls=[astar])
    log = res.records["astar"]["guidance"]
    assert [e["step"] for e in log] == [0, 1]
    seg_only = log[0]["loss"][0]
    assert 0.0 <= seg_only <= 0.5  # first step: no retention term, one pair
    assert log[1]["loss"][0] >= 1.0  # two retention terms in [0.5, 1] join
    masks = res.records["astar"]["retention_masks"]
    assert masks.shape == (1, 2, 8, 8) and masks.dtype == torch.bool
    assert bool(masks.flatten(2).any(-1).all())  # min-max maps always have pixels above 0.5
    history = res.records["astar"]["retention_masks_per_step"]
    assert sorted(history) == [0, 1] and torch.equal(history[1], masks)


def test_layout_masks_replace_retention_masks(sd):
    left = np.zeros((16, 16))
    left[:, :8] = 1.0
    astar = attnedit.AStar(words=["cat", "dog"], retention_masks={"cat": left, 1: 1.0 - left})
    res = sd(PROMPT, seed=1, steps=2, controls=[astar])
    first = res.records["astar"]["guidance"][0]["loss"][0]
    assert first >= 1.0  # both retention terms active from the first step
    plain = sd(PROMPT, seed=1, steps=2, controls=[attnedit.AStar(words=["cat", "dog"])])
    assert plain.records["astar"]["guidance"][0]["loss"][0] <= 0.5


def test_guidance_lowers_the_astar_loss(sd):
    astar = attnedit.AStar(words=["cat", "dog"], refine_target=0.0, max_refinement=3, scale_factor=200)
    res = sd(PROMPT, seed=2, steps=2, controls=[astar])
    entry = res.records["astar"]["guidance"][0]
    assert entry["last_loss"][0] < entry["loss"][0]


def test_bad_options():
    with pytest.raises(ValueError, match="not one of the words"):
        attnedit.AStar(words=["cat"], retention_masks={"dog": np.ones((4, 4))})
    with pytest.raises(ValueError, match="empty"):
        attnedit.AStar(words=["cat"], retention_masks={"cat": np.zeros((4, 4))})
    with pytest.raises(ValueError, match="threshold"):
        attnedit.AStar(words=["cat"], threshold=1.0)
