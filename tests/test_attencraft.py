"""AttenCraft: mask mathematics on hand-built maps, training on a tiny SD model, resume, reload, bad input."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from attnedit.methods.attencraft import (
    extract_masks,
    jsd,
    load_concepts,
    margin_masks,
    match_masks,
    propagate,
    read_concepts,
    ssim,
)
from attnedit.train.attencraft import (
    AttenCraftConfig,
    AttenCraftTrainer,
    MaskSeparationError,
    attencraft,
    load_image,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two OpenMP threads on a shared, busy 2-core machine run the tiny convolutions ~20x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FAST = dict(steps=4, num_class_images=1, class_steps=1, checkpoint_every=2, refresh_every=2, margin=0.05,
            progress=False)


# ------------------------------------------------------------------------------------------ hand-built maps
def _regions(h: int, w: int) -> torch.Tensor:
    """Label grid: 0 = blob A (top-left), 1 = blob B (bottom-right), 2 = background."""
    lab = torch.full((h, w), 2)
    lab[1:4, 1:4] = 0
    lab[h - 4 : h - 1, w - 4 : w - 1] = 1
    return lab


def _affinity(labels: torch.Tensor, leak: float = 0.02) -> torch.Tensor:
    """Self-attention that stays inside each region (rows sum to one), with a small leak everywhere."""
    flat = labels.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    aff = same / same.sum(1, keepdim=True) + leak / flat.numel()
    return aff / aff.sum(1, keepdim=True)


def test_propagation_and_margin_on_hand_built_maps():
    h, w = 8, 8
    lab = _regions(h, w)
    cross = torch.full((h * w, 3), 0.05)
    cross[2 * w + 2, 0] = 1.0  # concept A: one hot pixel inside blob A
    cross[6 * w + 6, 1] = 1.0  # concept B: one hot pixel inside blob B
    cross[0, 2] = 1.0  # start token: a background pixel
    scores = propagate(cross, _affinity(lab), power=4)
    masks = margin_masks(scores, margin=0.1)
    for c in range(3):
        assert torch.equal(masks[c], lab.flatten() == c), f"class {c}"
    assert match_masks(scores, masks) == [0, 1, 2]
    # nothing beats the others by more than the largest possible margin
    assert not margin_masks(scores, margin=1.0).any()


def test_margin_rule_and_matching_formulas():
    scores = torch.tensor([[0.9, 0.7, 0.0], [0.9, 0.85, 0.1], [0.1, 0.2, 0.9]])
    m = margin_masks(scores, margin=0.1)  # pixel 0: 0.9 - 0.7 > 0.1 -> A; pixel 1: tie-ish -> none; pixel 2 -> bg
    assert m.int().tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]
    # two masks sitting where class 0 is strongest both match class 0
    both = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)
    assert match_masks(scores, both) == [0, 0, 2]


def test_extract_masks_two_blobs_from_a_synthetic_image():
    """Colour-similarity self-attention and coarse peaks as cross maps recover the two blobs exactly."""
    h, w = 16, 16
    img = np.zeros((h, w, 3), np.float32) + 0.5
    img[2:7, 2:7] = [0.9, 0.1, 0.1]
    img[9:14, 9:14] = [0.1, 0.1, 0.9]
    truth = np.full((h, w), 2)
    truth[2:7, 2:7] = 0
    truth[9:14, 9:14] = 1
    pix = torch.from_numpy(img.reshape(-1, 3))
    aff = torch.softmax(-torch.cdist(pix, pix) ** 2 / 0.01, dim=1)
    coarse = torch.zeros(4, 4, 3)  # cross maps at a quarter of the grid: a peak near each blob's centre
    coarse[1, 1, 0] = 1.0
    coarse[2, 2, 1] = 1.0
    coarse[0, 3, 2] = coarse[3, 0, 2] = 1.0
    res = extract_masks(coarse, aff, (h, w), power=4, margin=0.1)
    assert res.ok, res.problem
    for c in range(3):
        assert np.array_equal(res.masks[c].numpy() > 0.5, truth == c), f"class {c}"


def test_extract_masks_reports_collisions_instead_of_raising():
    lab = _regions(8, 8)
    cross = torch.full((8, 8, 3), 0.05)
    cross[2, 2, 0] = cross[2, 2, 1] = 1.0  # both concepts look at blob A
    cross[0, 0, 2] = 1.0
    res = extract_masks(cross, _affinity(lab), (8, 8), margin=0.1, names=["<dog>", "<cat>", "background"])
    assert not res.ok and "<dog>" in res.problem and "<cat>" in res.problem


def test_map_levels_follow_the_recipe_and_stay_usable_on_small_latents():
    from attnedit.layers import LayerInfo
    from attnedit.methods.attencraft import map_levels

    def layer(level):
        return LayerInfo(f"l{level}", "cross", "down", 0, 0, 0, 0, level, "attn2")

    sd = [layer(0), layer(1), layer(2)]
    assert map_levels(sd, (64, 64)) == (2, 1)  # SD at 512: cross 16x16, self 32x32 (official)
    assert map_levels(sd, (32, 32)) == (1, 1)  # 256 px: both 16x16 (latent/4 would be 8x8)
    assert map_levels(sd, (16, 16)) == (0, 0)  # 64 px testbed: both 16x16, never the blurred 8x8
    assert map_levels([layer(0), layer(1)], (8, 8)) == (0, 0)  # tiny: both 8x8, never 4x4 or 2x2


def test_ssim_and_jsd_formulas():
    a = torch.zeros(8, 8)
    a[2:5, 2:5] = 1.0
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    shifted = torch.roll(a, 2, dims=1)
    assert ssim(a, shifted) < 0.8
    assert ssim(a, shifted) == pytest.approx(ssim(shifted, a), abs=1e-6)
    c1 = 0.01**2  # constant 0 vs constant 1: SSIM = c1 / (1 + c1)
    assert ssim(torch.zeros(7, 7), torch.ones(7, 7)) == pytest.approx(c1 / (1 + c1), rel=1e-5)
    assert ssim(torch.ones(3, 3), torch.ones(3, 3)) == pytest.approx(1.0)  # window shrinks to fit
    p = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert float(jsd(p, p)) == pytest.approx(0.0, abs=1e-6)
    hard = float(jsd(torch.tensor([100.0, 0.0]), torch.tensor([0.0, 100.0])))
    assert hard == pytest.approx(math.log(2), abs=1e-4)


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    root = tmp_path_factory.mktemp("attencraft")
    img = np.full((64, 64, 3), 128, np.uint8)
    img[6:28, 6:28] = [230, 30, 30]
    img[36:60, 36:60] = [30, 30, 230]
    path = root / "two.png"
    Image.fromarray(img).save(path)
    return root, path


@pytest.fixture(scope="module")
def trained(blobs):
    root, image = blobs
    from attnedit.train import attencraft as recipe  # the module itself is callable

    return recipe(image, "dog,cat", root / "full", model="tiny-sd", **FAST)


def test_training_run_saves_concepts_and_notes_multi_token_words(trained):
    meta, tensors = read_concepts(trained.output)
    assert meta["tokens"] == ["<dog>", "<cat>"] and meta["steps_done"] == 4
    assert tensors["token_embeddings"].shape == (2, 32)
    assert any("'dog' is 3 tokens" in n for n in trained.notes)  # the byte-level tokenizer splits words
    assert (trained.output / "checkpoints" / "step-000004" / "state.pt").is_file()
    assert (trained.output / "masks.png").is_file()
    assert trained.masks.shape[0] == 3 and all(float(m.sum()) > 0 for m in trained.masks)


def test_saved_concepts_reload_and_change_the_output(trained):
    import attnedit

    base = attnedit.load("tiny-sd")
    pipe = attnedit.load("tiny-sd", concepts=trained.output)
    tok = pipe.pipe.tokenizer
    ids = tok("<dog>", add_special_tokens=False).input_ids
    assert len(ids) == 1
    _, tensors = read_concepts(trained.output)
    row = pipe.pipe.text_encoder.get_input_embeddings().weight[ids[0]]
    assert torch.allclose(row, tensors["token_embeddings"][0])
    a = np.asarray(pipe("a photo of <dog>", seed=0).images[0], dtype=np.float32)
    b = np.asarray(base("a photo of <dog>", seed=0).images[0], dtype=np.float32)
    assert np.abs(a - b).mean() > 0.5
    store = attnedit.AttentionStore(words=["<dog>"])  # other controls see the new token as one word
    pipe("a photo of <dog>", controls=[store], seed=0)
    assert store.word_map("<dog>").shape == (8, 8)
    with pytest.raises(ValueError, match="already in the tokenizer"):
        load_concepts(pipe, trained.output)
    from attnedit.pipeline import EditPipeline
    from attnedit.tiny import build_tiny

    other = EditPipeline(build_tiny("sd", seed=1), model_name="other")
    with pytest.raises(ValueError, match="another model"):
        load_concepts(other, trained.output)
    assert len(other.pipe.tokenizer) == 514  # refused files change nothing


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(blobs):
    root, image = blobs
    cfg = AttenCraftConfig(concepts=["dog", "cat"], prior_weight=0.0, lr=5e-3, margin=0.05, refresh_every=0)
    trainer = AttenCraftTrainer(image, root / "fixed", cfg, model="tiny-sd", progress=False).prepare()
    try:
        batch = trainer.sample_batch(1)
        before = trainer.compute_loss(batch)[1]
        for _ in range(8):
            trainer.optimize(batch)
        after = trainer.compute_loss(batch)[1]
    finally:
        trainer.close()
    assert after["loss"] < 0.9 * before["loss"]
    assert after["attention"] < before["attention"] and after["denoise"] < before["denoise"]


def test_resume_gives_the_same_state_as_an_uninterrupted_run(blobs, trained):
    from attnedit.cli import main

    root, image = blobs
    part = root / "part"
    rc = main(["train", "attencraft", "--image", str(image), "--concepts", "dog,cat", "--output", str(part),
               "--model", "tiny-sd", "--steps", "2", "--num-class-images", "1", "--class-steps", "1",
               "--checkpoint-every", "2", "--refresh-every", "2", "--margin", "0.05", "--no-progress"])
    assert rc == 0
    with pytest.raises(ValueError, match="already holds"):
        attencraft(image, "dog,cat", part, model="tiny-sd", **FAST)
    resumed = attencraft(image, "dog,cat", part, model="tiny-sd", resume="latest", **FAST)
    _, a = read_concepts(trained.output)
    _, b = read_concepts(resumed.output)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [h.get("loss") for h in trained.history] == [h.get("loss") for h in resumed.history]


def test_masks_that_cannot_separate_stop_clearly_and_keep_what_was_saved(blobs):
    root, image = blobs
    with pytest.raises(MaskSeparationError, match="cannot separate the concepts dog, cat"):
        attencraft(image, "dog,cat", root / "never", model="tiny-sd", **{**FAST, "margin": 1.0, "mask_retries": 1})
    assert not (root / "never" / "concepts.safetensors").exists()
    # a run whose refreshed masks collapse stops, and its checkpoint and concepts stay as they were
    run = root / "collapse"
    attencraft(image, "dog,cat", run, model="tiny-sd", **{**FAST, "steps": 2})
    saved = (run / "concepts.safetensors").read_bytes()
    ckpt = (run / "checkpoints" / "step-000002" / "state.pt").read_bytes()
    with pytest.raises(MaskSeparationError, match="last checkpoint is kept"):
        attencraft(image, "dog,cat", run, model="tiny-sd", resume="latest",
                   **{**FAST, "margin": 1.0, "refresh_every": 1, "refresh_patience": 1})
    assert (run / "concepts.safetensors").read_bytes() == saved
    assert (run / "checkpoints" / "step-000002" / "state.pt").read_bytes() == ckpt
    assert not (run / "checkpoints" / "step-000003").exists()


def test_lora_option_trains_small_adapters_that_reload(blobs):
    pytest.importorskip("peft")
    import attnedit

    root, image = blobs
    res = attencraft(image, "dog,cat", root / "lora", model="tiny-sd", train="lora", lora_rank=2, prior_weight=0.0,
                     lr=1e-2, **{**FAST, "steps": 2})
    meta, tensors = read_concepts(res.output)
    assert meta["train"] == "lora" and any(k.endswith("lora_A") for k in tensors)
    assert all(t.shape[0] == 2 or t.shape[1] == 2 for k, t in tensors.items() if "lora" in k)
    base = attnedit.load("tiny-sd")
    pipe = attnedit.load("tiny-sd", concepts=res.output)
    a = np.asarray(pipe("a photo of <cat>", seed=0).images[0], dtype=np.float32)
    b = np.asarray(base("a photo of <cat>", seed=0).images[0], dtype=np.float32)
    assert np.abs(a - b).mean() > 0.5


def test_reweighted_sampling_favours_the_slow_concept(blobs):
    root, image = blobs
    cfg = AttenCraftConfig(concepts=["a", "b", "c"], sampling="reweighted")
    trainer = AttenCraftTrainer(image, root / "rw", cfg, progress=False)
    trainer.ema = torch.tensor([0.1, 0.2, 0.2])
    p = trainer.sampling_probs()
    assert p.tolist() == pytest.approx([1 / 3, 1 / 6, 1 / 6, 1 / 3])
    trainer.cfg.sampling = "uniform"
    assert trainer.sampling_probs().tolist() == pytest.approx([0.25] * 4)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_images(tmp_path):
    with pytest.raises(ValueError, match="image not found"):
        load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(junk)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((16, 16), 90, np.uint8)).save(grey)
    notes: list[str] = []
    with pytest.warns(UserWarning, match="converted to RGB"):
        img = load_image(grey, notes)
    assert img.mode == "RGB" and notes


def test_bad_options(blobs, tmp_path):
    _, image = blobs
    with pytest.raises(ValueError, match="at least two concepts"):
        attencraft(image, "dog", tmp_path / "one")
    with pytest.raises(ValueError, match="must be different"):
        attencraft(image, "dog,dog", tmp_path / "same")
    with pytest.raises(ValueError, match="sampling 'often'"):
        attencraft(image, "dog,cat", tmp_path / "s", sampling="often")
    with pytest.raises(ValueError, match="unknown AttenCraft option 'epochs'"):
        attencraft(image, "dog,cat", tmp_path / "s", epochs=3)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        attencraft(image, "dog,cat", tmp_path / "nothing", resume="latest")


def test_cli_reports_bad_input(tmp_path, capsys):
    from attnedit.cli import main

    rc = main(["train", "attencraft", "--image", str(tmp_path / "no.png"), "--concepts", "dog,cat",
               "--output", str(tmp_path / "o")])
    assert rc == 2 and "image not found" in capsys.readouterr().err


def test_three_concepts_train_and_reload(tmp_path):
    import attnedit

    img = np.full((64, 64, 3), 128, np.uint8)
    img[4:22, 4:22] = [230, 30, 30]
    img[4:22, 42:60] = [30, 200, 30]
    img[42:60, 22:40] = [30, 30, 230]
    path = tmp_path / "three.png"
    Image.fromarray(img).save(path)
    res = attencraft(path, ["red", "green", "blue"], tmp_path / "run", model="tiny-sd", steps=2, prior_weight=0.0,
                     margin=0.02, refresh_every=0, checkpoint_every=0, progress=False)
    assert res.masks.shape == (4, 8, 8) and all(float(m.sum()) > 0 for m in res.masks)
    assert res.tokens == ["<red>", "<green>", "<blue>"]
    pipe = attnedit.load("tiny-sd", concepts=res.output)
    assert all(len(pipe.pipe.tokenizer(t, add_special_tokens=False).input_ids) == 1 for t in res.tokens)


def test_sdxl_trains_both_text_encoders_and_reloads(blobs):
    import attnedit

    root, image = blobs
    res = attencraft(image, "dog,cat", root / "sdxl", model="tiny-sdxl", steps=2, num_class_images=1, class_steps=1,
                     margin=0.02, refresh_every=0, checkpoint_every=0, progress=False)
    meta, tensors = read_concepts(res.output)
    assert meta["family"] == "sdxl" and tensors["token_embeddings"].shape == (2, 32)
    assert tensors["token_embeddings_2"].shape == (2, 32)
    base = attnedit.load("tiny-sdxl")
    pipe = attnedit.load("tiny-sdxl", concepts=res.output)
    for tok in (pipe.pipe.tokenizer, pipe.pipe.tokenizer_2):
        assert len(tok("<cat>", add_special_tokens=False).input_ids) == 1
    a = np.asarray(pipe("a photo of <cat>", seed=0).images[0], dtype=np.float32)
    b = np.asarray(base("a photo of <cat>", seed=0).images[0], dtype=np.float32)
    assert np.abs(a - b).mean() > 0.5
    with pytest.raises(ValueError, match="'sdxl' model"):
        load_concepts(attnedit.load("tiny-sd"), res.output)


# ----------------------------------------------------------------------------- defaults, progress, command line
def _model_folder(tmp_path, block):
    """A copy of the tiny SD pipeline saved as a folder whose attnedit.json carries an "attencraft" block."""
    import json

    from attnedit.tiny import build_tiny

    folder = tmp_path / "model"
    build_tiny("sd").save_pretrained(folder)
    (folder / "attnedit.json").write_text(json.dumps({"steps": 2, "attencraft": block}))
    return folder


def test_model_defaults_come_from_attnedit_json_and_explicit_options_win(blobs, tmp_path, capsys):
    from attnedit.train.attencraft import model_defaults

    _, image = blobs
    assert model_defaults("tiny-sd") == ({}, None)
    block, where = model_defaults("shapes-sd")  # the bundled model renders few class images
    assert block == {"num_class_images": 16} and where.endswith("attnedit.json")
    folder = _model_folder(tmp_path, {"num_class_images": 2, "class_steps": 1})
    common = dict(steps=1, refresh_every=0, checkpoint_every=0, margin=0.05)
    res = attencraft(image, "dog,cat", tmp_path / "from-model", model=str(folder), progress=True, **common)
    meta, _ = read_concepts(res.output)
    assert meta["settings"]["num_class_images"] == 2 and meta["settings"]["class_steps"] == 1
    assert len(list((res.output / "class_images").glob("*.png"))) == 2
    assert any("num_class_images=2 (official 200)" in n for n in res.notes)
    err = capsys.readouterr().err
    assert "num_class_images=2 (official 200)" in err  # printed when the run starts
    assert "rendering 2 class images" in err and "slow part" in err
    # an explicit option wins over the model's value, on the API and on the command line
    res = attencraft(image, "dog,cat", tmp_path / "explicit", model=str(folder), num_class_images=3, progress=False,
                     **common)
    assert read_concepts(res.output)[0]["settings"]["num_class_images"] == 3
    assert any("class_steps=1" in n and "num_class_images" not in n for n in res.notes[:1])
    from attnedit.cli import main

    rc = main(["train", "attencraft", "--image", str(image), "--concepts", "dog,cat", "--output",
               str(tmp_path / "cli"), "--model", str(folder), "--steps", "1", "--refresh-every", "0",
               "--checkpoint-every", "0", "--margin", "0.05", "--num-class-images", "1", "--no-progress"])
    assert rc == 0
    meta, _ = read_concepts(tmp_path / "cli")
    assert meta["settings"]["num_class_images"] == 1 and meta["settings"]["class_steps"] == 1
    out = capsys.readouterr().out
    assert "note: defaults from" in out and "class_steps=1" in out and "rendered 1 class images" in out
    # a block with an unknown option is refused, naming the file
    bad = _model_folder(tmp_path / "bad", {"class_images": 2})
    with pytest.raises(ValueError, match="unknown AttenCraft option 'class_images'"):
        attencraft(image, "dog,cat", tmp_path / "bad-run", model=str(bad), progress=False)


def test_progress_shows_the_class_image_phase_then_training(blobs, tmp_path, monkeypatch):
    import tqdm.auto

    _, image = blobs
    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    attencraft(image, "dog,cat", tmp_path / "run", model="tiny-sd", steps=2, num_class_images=9, class_steps=1,
               refresh_every=0, checkpoint_every=0, margin=0.05, progress=True)
    phases = [(b.desc, b.total, b.n) for b in bars if b.desc.startswith("attencraft")]
    assert phases == [("attencraft: class images (prior preservation)", 9, 9), ("attencraft: training", 2, 2)]


def test_train_help_imports_neither_torch_nor_diffusers():
    """`attnedit train <recipe> --help` builds its parser without the recipe modules (they import torch)."""
    import subprocess
    import sys

    code = ("import argparse, sys; import attnedit.train.cli as c; p = argparse.ArgumentParser(); "
            "c.add_parser(p.add_subparsers()); "
            "a = p.parse_args(['train', 'attencraft', '--image', 'x.png', '--concepts', 'a,b', '--steps', '3']); "
            "assert a.steps == 3 and a.num_class_images is None and callable(a.func); "
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr
    for recipe in ("attencraft", "clear"):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "attnedit", "train", recipe, "--help"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and f"usage: attnedit train {recipe}" in res.stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import")}
        assert not {"torch", "diffusers"} & imported, f"`attnedit train {recipe} --help` imports torch or diffusers"


def test_cli_options_match_the_config_and_the_documentation():
    import dataclasses
    import re
    from pathlib import Path

    from attnedit.train.cli import ATTENCRAFT_OPTIONS

    fields = {f.name: f.default for f in dataclasses.fields(AttenCraftConfig) if f.name != "concepts"}
    assert {name: default for name, _, default, _ in ATTENCRAFT_OPTIONS} == fields
    doc = (Path(__file__).resolve().parents[1] / "docs" / "methods" / "attencraft.md").read_text()
    rows = {m.group(2): m.group(3).strip() for m in re.finditer(r"^\| `--([\w-]+)`[^|]*\| `(\w+)` \| ([^|]+) \|",
                                                                doc, re.M)}
    assert set(rows) == set(fields)
    for name, default in fields.items():
        if default is not None:
            assert rows[name] == f"`{default}`", name


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_trainable_condition_is_the_pipelines_with_gradients(family):
    """What AttenCraft trains through equals what the pipeline encodes, and reaches the token embeddings."""
    from attnedit.families import family_of
    from attnedit.tiny import build_tiny

    fam = family_of(build_tiny(family))
    cond = fam.trainable_condition(["a red cube"], 64, 64)
    ref = fam.encode_condition(["a red cube"], 1, height=64, width=64, image_grid=None, max_sequence_length=None)
    assert torch.allclose(cond["encoder_hidden_states"], ref["encoder_hidden_states"], atol=1e-6)
    if family == "sdxl":
        for key in ("text_embeds", "time_ids"):
            assert torch.allclose(cond["added_cond_kwargs"][key], ref["added_cond_kwargs"][key], atol=1e-6)
        assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]
    cond["encoder_hidden_states"].sum().backward()
    table = fam.text_encoders()[0][1].get_input_embeddings().weight
    assert table.grad is not None and table.grad.abs().sum() > 0
