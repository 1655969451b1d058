"""The testbed world, its detector, its tokenizer and its training recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from attnedit.testbed.detector import (
    Detection,
    all_present,
    attribute_binding,
    box_mask,
    detect,
    layout_iou,
    match,
    object_recall,
    relations_hold,
)
from attnedit.testbed.world import VOCABULARY, SceneObject, World, caption_for, parse_prompt, render


def test_generator_is_deterministic():
    a, b = World(seed=5), World(seed=5)
    for i in (0, 7, 123):
        assert a.scene(i).caption == b.scene(i).caption
        assert np.array_equal(a.image(i), b.image(i))
    assert not np.array_equal(World(seed=6).image(0), a.image(0))


def test_detector_agrees_with_ground_truth_on_a_sample():
    world = World(seed=2024)
    n = 150
    ok = sum(match(world.scene(i).objects, detect(world.image(i))) for i in range(n))
    assert ok / n >= 0.98, ok / n


def test_caption_parser_round_trip():
    world = World(seed=1)
    for i in range(60):
        scene = world.scene(i)
        parsed = parse_prompt(scene.caption)
        assert sorted(parsed.objects) == sorted(o.label for o in scene.objects)
    assert caption_for([(1, "red", "circle"), (1, "blue", "square")], "left of") == "a red circle left of a blue square"
    with pytest.raises(ValueError):
        parse_prompt("a purple elephant")


def test_metrics_on_hand_built_detections():
    red_circle = Detection("circle", "red", (0.1, 0.1, 0.4, 0.4), 0.05)
    blue_circle = Detection("circle", "blue", (0.6, 0.1, 0.9, 0.4), 0.05)
    blue_square = Detection("square", "blue", (0.6, 0.6, 0.9, 0.9), 0.05)
    prompt = "a red circle and a blue square"
    assert object_recall(prompt, [red_circle, blue_square]) == 1.0
    assert object_recall(prompt, [red_circle]) == 0.5
    assert all_present(prompt, [blue_square, red_circle])
    # colour leaking: the square is missing, the circle came out blue -> binding 0 of 1 judged shapes
    assert attribute_binding(prompt, [blue_circle]) == 0.0
    assert attribute_binding(prompt, [red_circle, blue_square]) == 1.0
    assert attribute_binding(prompt, []) is None
    boxes = [(0.1, 0.1, 0.4, 0.4), (0.6, 0.6, 0.9, 0.9)]
    assert layout_iou(prompt, boxes, [red_circle, blue_square]) == pytest.approx(1.0)
    assert layout_iou(prompt, boxes, [red_circle]) == pytest.approx(0.5)
    assert relations_hold("a red circle left of a blue square", [red_circle, blue_square]) is True
    assert relations_hold("a blue square left of a red circle", [red_circle, blue_square]) is False


def test_detector_reads_each_shape_and_colour():
    for shape in ("circle", "square", "triangle", "star", "ring"):
        for colour in ("red", "green", "magenta"):
            from attnedit.testbed.world import Scene

            obj = SceneObject(shape, colour, (0.2, 0.25, 0.6, 0.65))
            img = render(Scene([obj], "", "single", (0.5, 0.5, 0.5)))
            found = detect(img)
            assert [d.label for d in found] == [(shape, colour)], (shape, colour, found)


def test_tokenizer_makes_each_vocabulary_word_one_token():
    from attnedit.testbed.train import build_tokenizer

    tok = build_tokenizer()
    for word in VOCABULARY:
        assert tok.tokenize(word) == [word + "</w>"], word
    # unknown text still tokenizes (character by character), never <unk>
    assert tok.tokenize("zebra") == ["z", "e", "b", "r", "a</w>"]


def test_training_smoke_saves_a_loadable_pipeline(tmp_path):
    import attnedit
    from attnedit.testbed.train import main

    out = tmp_path / "model"
    assert main(["--out", str(out), "--work", str(tmp_path / "work"), "--data", "32", "--vae-steps", "2",
                 "--steps", "2", "--every", "2", "--batch", "4", "--threads", "1", "--vae-whiten",
                 "--min-snr", "5"]) == 0
    assert (tmp_path / "work" / "samples_000002.png").exists()
    pipe = attnedit.load(out)
    assert pipe.family.name == "sd" and pipe.default_size() == (64, 64)
    image = pipe("a red circle", steps=2, seed=0).image
    assert image.size == (64, 64)
    # saved as float16, configs asking for float32 (plain diffusers loads it in one dtype), settings kept
    import json

    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    settings = out / "attnedit.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "attencraft": {"num_class_images": 3}}))
    from attnedit.testbed.train import write_pipeline

    write_pipeline(pipe.pipe, out, {"steps": 7})
    assert json.loads(settings.read_text())["attencraft"] == {"num_class_images": 3}


def test_dit_training_smoke_saves_a_loadable_flux_pipeline(tmp_path):
    """The shared-VAE recipe: `train --vae-only`, then `train_dit` on that VAE; true CFG on load."""
    import attnedit
    from attnedit.testbed.train import main as train_main
    from attnedit.testbed.train_dit import main as dit_main

    work = tmp_path / "vae"
    assert train_main(["--work", str(work), "--data", "16", "--vae-steps", "2", "--vae-batch", "4",
                       "--threads", "1", "--vae-only"]) == 0
    out = tmp_path / "dit"
    assert dit_main(["--vae-init", str(work / "vae.pt"), "--out", str(out), "--work", str(tmp_path / "w"),
                     "--data", "16", "--steps", "2", "--every", "2", "--batch", "4", "--lr", "2.0"]) == 0
    assert (tmp_path / "w" / "samples_000002.png").exists()
    pipe = attnedit.load(out)
    assert pipe.family.name == "flux" and pipe.true_cfg and pipe.default_size() == (64, 64)
    assert pipe.call_defaults()["max_sequence_length"] == 24
    assert pipe.pipe.tokenizer_2.tokenize("a red circle") == ["\u2581a", "\u2581red", "\u2581circle"]
    result = pipe("a red circle", steps=2, seed=0)
    assert result.image.size == (64, 64)
    assert result.params["true_cfg_scale"] == pipe.recommended()["guidance"]
    # guidance 1 is one conditional pass: a different image from the guided one. adaLN-Zero starts the model at a
    # zero velocity and the warm-up lr of step 2 is lr / 200, hence the large --lr: else the text barely counts yet
    # and both images round to the same pixels
    plain = pipe("a red circle", steps=2, seed=0, guidance=1.0).image
    assert np.abs(np.asarray(plain, np.int16) - np.asarray(result.image, np.int16)).max() > 0

    # a decoder trained later drops in (same encoder); a VAE with another encoder is refused
    import torch

    from attnedit.testbed.train import build_vae, install_vae

    state = torch.load(work / "vae.pt", weights_only=False)
    state["vae"]["decoder.conv_out.bias"] = state["vae"]["decoder.conv_out.bias"] + 0.5
    torch.save(state, tmp_path / "sharper.pt")
    install_vae(out, tmp_path / "sharper.pt")
    assert np.asarray(attnedit.load(out)("a red circle", steps=2, seed=0).image).mean() > np.asarray(
        result.image).mean()
    torch.manual_seed(1)
    torch.save({"vae": build_vae().state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another encoder"):
        install_vae(out, tmp_path / "other.pt")


def test_whitening_folds_per_channel_latent_statistics_into_the_vae_exactly():
    """Per-channel zero mean / unit std after whitening; decode(encode(x)) unchanged; posterior std scaled."""
    import torch

    from attnedit.testbed.train import Dataset, build_vae, encode_all, whiten_vae

    torch.manual_seed(0)
    vae = build_vae().eval()
    with torch.no_grad():  # make the channels very unlike each other, as a trained encoder's are
        vae.quant_conv.weight[:4] *= torch.tensor([0.2, 1.0, 3.0, 0.5]).view(-1, 1, 1, 1)
        vae.quant_conv.bias[:4] += torch.tensor([2.0, -1.0, 5.0, 0.0])
    data = Dataset(3, 48)
    x, _ = data.batch(torch.arange(8))
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        rec_before = vae.decode(before.mean).sample
    latents = encode_all(vae, data)
    mapped = whiten_vae(vae, latents)
    assert torch.allclose(mapped.mean((0, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(mapped.std((0, 2, 3)), torch.ones(4), atol=1e-5)
    with torch.no_grad():
        after = vae.encode(x).latent_dist
        rec_after = vae.decode(after.mean).sample
    std, mean = latents.std((0, 2, 3)).view(1, -1, 1, 1), latents.mean((0, 2, 3)).view(1, -1, 1, 1)
    assert torch.allclose(after.mean, (before.mean - mean) / std, atol=1e-4)
    assert torch.allclose(after.std, before.std / std, rtol=1e-4)
    assert torch.allclose(rec_after, rec_before, atol=1e-4)


def test_text_encoder_without_layers_keeps_each_token_its_own_word():
    """--text-layers 0: changing one word changes that token's state only (2 layers: later tokens too)."""
    import torch

    from attnedit.testbed.train import build_models, build_tokenizer, tokenize

    tok = build_tokenizer()
    ids = tokenize(tok, ["a red circle and a blue square", "a green circle and a blue square"])
    for layers, later_changes in ((0, False), (2, True)):
        _, text, _ = build_models(len(tok), 0, text_layers=layers)
        with torch.no_grad():
            h = text(ids)[0]
        diff = (h[0] - h[1]).abs().amax(-1)
        assert diff[2] > 1e-3  # the changed word ("red" -> "green", position 2)
        assert bool((diff[3:] > 1e-5).any()) == later_changes
        assert float(diff[:2].max()) < 1e-6  # causal: earlier tokens never change


def test_min_snr_weights_on_hand_computed_values():
    import torch

    from attnedit.testbed.train import min_snr_weights

    alphas = torch.tensor([0.9, 0.5, 0.1])  # SNR 9, 1, 1/9
    w = min_snr_weights(alphas, torch.tensor([0, 1, 2]), 5.0)
    assert torch.allclose(w, torch.tensor([5 / 9, 1.0, 1.0]))
    assert torch.equal(min_snr_weights(alphas, torch.tensor([0, 2]), 0.0), torch.ones(2))


def test_bundled_shapes_sd_draws_the_requested_objects():
    """Real assertion on the trained weights (plain diffusers, 25 DDIM steps, CFG 5, seed 0).

    Measured (assets/models/README.md): 91.7% of single-object samples right over 8 seeds; on these ten
    prompts with seed 0 it gets all ten, so the check asks for at least 8; random weights find almost none.
    """
    from pathlib import Path

    import torch
    from diffusers import StableDiffusionPipeline

    folder = Path(__file__).resolve().parents[1] / "assets" / "models" / "shapes-sd"
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.tokenizer.tokenize("a red circle")) == 3
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a magenta ring",
               "a cyan circle", "a red square", "a blue ring", "a green star", "a yellow triangle"]
    gens = [torch.Generator().manual_seed(0) for _ in prompts]
    images = pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=gens, output_type="np").images
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    hits = [all_present(p, detect(im)) for p, im in zip(prompts, images)]
    assert sum(hits) >= 8, list(zip(prompts, hits))


def test_box_mask_on_hand_built_boxes():
    m = box_mask((0.25, 0.5, 0.5, 1.0), (4, 4))
    assert m.tolist() == [[False] * 4, [False] * 4, [False, True, False, False], [False, True, False, False]]
    assert box_mask((0.1, 0.1, 0.11, 0.11), (4, 4)).sum() == 1  # a sliver still marks its cell
    assert box_mask((0.1, 0.3, 0.6, 0.4), (8, 16)).sum() == 2 * 9  # rows 2-3, columns 1-9


def test_bundled_shapes_sd_word_maps_mark_their_objects():
    """The property attention methods rely on: a word's cross-attention is higher on its own object.

    shapes-sd's text encoder has no token mixing (`--text-layers 0`); with the 2-layer encoder the map
    of "circle" was lower inside the circle than outside (assets/models/README.md).
    """
    import attnedit

    pipe = attnedit.load("shapes-sd")
    store = attnedit.AttentionStore(words=["circle", "square", "red", "blue"])
    res = pipe("a red circle and a blue square", controls=[store], seed=0)
    found = {d.label: d.box for d in detect(np.asarray(res.image))}
    assert ("circle", "red") in found and ("square", "blue") in found, found
    maps = store.word_maps(grid=(16, 16))
    for label in (("circle", "red"), ("square", "blue")):
        box = box_mask(found[label], (16, 16))
        for w in label:
            m = maps[w].numpy()
            assert m[box].mean() > 1.2 * m[~box].mean(), (w, m[box].mean(), m[~box].mean())


def test_bundled_shapes_sd_clip_text_attention_behaves_like_sd():
    """shapes-sd-clip (issue 21): the start token takes the largest share of cross-attention, and a noun's map
    sits on its own object. Measured over 216 images (benchmarks/results/text_attention-shapes-sd-clip.md):
    start 0.75 of the mass, noun in/out-box ratio far above the 3x target; here one image, asked for >= 3x."""
    import attnedit

    pipe = attnedit.load("shapes-sd-clip")
    assert pipe.pipe.text_encoder.config.num_hidden_layers == 2  # causal, CLIP-pretrained, frozen
    store = attnedit.AttentionStore(words=["circle", "square"])
    res = pipe("a red circle and a blue square", controls=[store], seed=0)
    found = {}  # the largest detection per shape (a second, small blob of the same shape is no object of a noun)
    for d in sorted(detect(np.asarray(res.image)), key=lambda d: d.area):
        found[d.shape] = d.box
    maps = store.word_maps(grid=(16, 16))
    seen = [w for w in ("circle", "square") if w in found]
    assert seen, found
    for w in seen:
        box = box_mask(found[w], (16, 16))
        m = maps[w].numpy()
        assert m[box].mean() > 3 * m[~box].mean(), (w, m[box].mean(), m[~box].mean())
    raw = store.token_maps(0, grid=(16, 16)).reshape(-1, len(store.positions)).mean(0)
    start = store.positions.index(store.token_index(0).bos[0])
    assert raw[start] == raw.max() and raw[start] > 0.3, raw


def test_bundled_shapes_dit_draws_the_requested_colours_and_shapes():
    """Real assertion on the trained FLUX-architecture weights through attnedit (20 steps, true CFG 4, seed 0).

    Measured (assets/models/README.md): the colour is right on 100% of single-object samples and the
    shape too on 96.2%; here all 10 colours and 9 of 10 shapes (one of margin for other CPUs' float
    rounding). Random weights draw neither.
    """
    import attnedit

    pipe = attnedit.load("shapes-dit")
    assert pipe.family.name == "flux" and pipe.true_cfg
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a magenta ring",
               "a cyan circle", "a red square", "a blue ring", "a green star", "a yellow triangle"]
    images = pipe(prompts, seed=[0] * len(prompts)).images
    found = [detect(np.asarray(im)) for im in images]
    colours = [any(d.colour == p.split()[1] for d in f) for p, f in zip(prompts, found)]
    assert all(colours), list(zip(prompts, colours))
    hits = [all_present(p, f) for p, f in zip(prompts, found)]
    assert sum(hits) >= 8, list(zip(prompts, hits))


def test_training_options_are_checked_before_any_work(tmp_path):
    from attnedit.testbed.train import main as train_main
    from attnedit.testbed.train_dit import main as dit_main

    with pytest.raises(SystemExit, match=r"--batch 0 \(at least 1\); --cfg-drop 1.0 \(in \[0, 1\)\)"):
        train_main(["--work", str(tmp_path), "--batch", "0", "--cfg-drop", "1.0"])
    with pytest.raises(SystemExit, match="--vae-latent-noise -0.1"):
        train_main(["--work", str(tmp_path), "--vae-latent-noise", "-0.1"])
    with pytest.raises(SystemExit, match="--vae-init .*missing.pt: no such file"):
        dit_main(["--vae-init", str(tmp_path / "missing.pt"), "--work", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--text-layers -1 \(0 or more\); --min-snr -5.0 \(0 or more"):
        train_main(["--work", str(tmp_path), "--text-layers", "-1", "--min-snr", "-5"])
    with pytest.raises(SystemExit, match=r"--summary-drop 1.5 \(in \[0, 1\]; 0 = off\)"):
        train_main(["--work", str(tmp_path), "--summary-drop", "1.5"])
    with pytest.raises(SystemExit, match="--install-vae-into needs --vae-init"):
        train_main(["--install-vae-into", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing written


def test_testbed_train_is_on_the_command_line(capsys):
    from attnedit.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["testbed", "train", "--help"])
    assert exit_info.value.code == 0
    assert "--vae-steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["testbed", "train-dit", "--help"])
    assert exit_info.value.code == 0
    assert "--vae-init" in capsys.readouterr().out


def test_testbed_eval_rates_per_shape_on_rendered_images(monkeypatch, load_benchmark):
    """`testbed_eval.evaluate` on the world's own renders: one wrong caption counts against its shape only."""
    tbe = load_benchmark("testbed_eval")
    world = World(seed=3, style_probs={"single": 1.0})
    scenes = [world.scene(i) for i in range(6)]
    images = [world.image(i) for i in range(6)]
    monkeypatch.setattr(tbe, "generate", lambda *a, **k: images)
    prompts = [f"a {o.colour} {o.shape}" for s in scenes for o in s.objects]
    wrong = next(s for s in ("circle", "square") if s != scenes[0].objects[0].shape)
    prompts[0] = f"a {scenes[0].objects[0].colour} {wrong}"  # asks for a shape the image does not have
    res = tbe.evaluate(None, prompts, [0] * 6, 1, 1.0, 6)
    assert res["all_present"] == pytest.approx(5 / 6)
    expected = {}
    for i, p in enumerate(prompts):
        expected.setdefault(p.split()[2], []).append(i != 0)
    assert res["by_shape"] == pytest.approx({k: float(np.mean(v)) for k, v in expected.items()})
    res = tbe.evaluate(None, [prompts[0], "a red circle and a blue square", *prompts[2:]], [0] * 6, 1, 1.0, 6)
    assert res["by_shape"] is None  # a mixed set has no per-shape rate


@pytest.mark.parametrize("name", ["shapes-sd", "shapes-sd-clip", "shapes-dit"])
def test_bundled_models_run_in_plain_diffusers(name):
    """assets/models/README.md: the folders load with plain diffusers `from_pretrained`, no extra argument
    (their configs make every component float32), and generate."""
    import json

    import diffusers
    import torch

    folder = Path(__file__).resolve().parents[1] / "assets" / "models" / name
    cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    pipe = cls.from_pretrained(folder)
    dtypes = {next(c.parameters()).dtype for c in pipe.components.values() if isinstance(c, torch.nn.Module)}
    assert dtypes == {torch.float32}
    extra = {"max_sequence_length": 24} if name == "shapes-dit" else {}  # as assets/models/README.md says
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, **extra).images[0]
    assert image.size == (64, 64)


def test_varied_captions_name_the_scene_in_other_forms():
    """Every varied caption asks for the scene's shapes (colours may be left out), in the encoder's words."""
    from attnedit.testbed.clip import varied_caption, vocabulary
    from attnedit.testbed.world import World

    world, rng = World(seed=3), np.random.default_rng(0)
    forms = set()
    for i in range(200):
        scene = world.scene(i)
        caption = varied_caption(scene, rng, keep=0.0)
        words = caption.replace(",", "").split()
        assert set(words) <= set(vocabulary()), caption
        for obj in scene.objects:
            assert obj.shape in caption, (caption, scene.caption)
        if {o.colour for o in scene.objects} - set(words):
            forms.add("colour left out")
        if words[0] == "there":
            forms.add("there is")
        if "that" in words:
            forms.add("colour after the noun")
    assert forms == {"colour left out", "there is", "colour after the noun"}


def test_pretrained_text_encoder_is_frozen_into_the_unet_training(tmp_path):
    """pretrain-text, then train --text-init: the saved pipeline carries that encoder unchanged (its layers,
    its words), and its noun states know their colour where a layer-less encoder's cannot."""
    import torch

    import attnedit
    from attnedit.testbed.clip import build_text, probe, vocabulary
    from attnedit.testbed.clip import main as pretrain_main
    from attnedit.testbed.train import build_tokenizer, main

    ckpt = tmp_path / "text.pt"
    assert pretrain_main(["--out", str(ckpt), "--steps", "3", "--data", "64", "--batch", "16", "--threads", "1",
                          "--text-layers", "2", "--pad-weight", "1.0"]) == 0
    state = torch.load(ckpt, weights_only=False)
    assert state["layers"] == 2 and state["probe"]["noun_colour_probe_accuracy"] > 0.5
    tok = build_tokenizer(vocabulary())
    flat = probe(build_text(len(tok), 0), tok)  # each token its own word: the noun cannot know its colour
    assert flat["noun_colour_probe_accuracy"] < 0.4
    out = tmp_path / "model"
    assert main(["--out", str(out), "--work", str(tmp_path / "work"), "--data", "32", "--vae-steps", "2",
                 "--steps", "2", "--every", "2", "--batch", "4", "--threads", "1", "--text-init", str(ckpt),
                 "--caption-keep", "0.5"]) == 0
    pipe = attnedit.load(out)
    text = pipe.pipe.text_encoder
    assert text.config.num_hidden_layers == 2
    for name, value in text.state_dict().items():  # saved as float16
        assert torch.allclose(value.float(), state["text"][name].float(), atol=2e-3), name
    assert pipe.pipe.tokenizer.tokenize("there is a circle") == ["there</w>", "is</w>", "a</w>", "circle</w>"]


def test_padding_loss_is_zero_for_caption_free_padding_and_positive_otherwise():
    """The padding term: zero where the states after the end token equal the empty caption's."""
    import torch

    from attnedit.testbed.clip import build_text, padding_loss, vocabulary
    from attnedit.testbed.train import build_tokenizer, tokenize

    tok = build_tokenizer(vocabulary())
    ids = tokenize(tok, ["a red circle", "a blue square and a green star"])
    flat = build_text(len(tok), 0)  # no layers: every padding state is the same as the empty caption's
    with torch.no_grad():
        assert float(padding_loss(flat, tok, ids, flat(ids).last_hidden_state)) < 1e-10
        causal = build_text(len(tok), 2)  # padding sees the caption
        assert float(padding_loss(causal, tok, ids, causal(ids).last_hidden_state)) > 1e-4


def _grounding_scene():
    from attnedit.testbed.world import Scene, SceneObject

    objects = [SceneObject("circle", "red", (0.05, 0.05, 0.35, 0.35)),
               SceneObject("circle", "blue", (0.6, 0.05, 0.9, 0.35)),
               SceneObject("square", "green", (0.3, 0.55, 0.7, 0.95))]
    return Scene(objects, "a red circle, a blue circle and a green square", "triple", (0.5, 0.5, 0.5))


def test_grounding_targets_name_each_nouns_objects():
    """A noun names the objects of its shape, narrowed by its colour (before it, or 'that is COLOUR');
    word j sits at token j + 1; the background is what no object covers; an empty caption grounds nothing."""
    import torch

    from attnedit.testbed.grounding import noun_objects, object_masks, targets

    scene = _grounding_scene()
    assert noun_objects("a red circle and a square".split(), scene) == [(2, [0]), (5, [2])]
    assert noun_objects("two circles".split(), scene) == [(1, [0, 1])]
    assert noun_objects("a circle that is blue".split(), scene) == [(1, [1])]
    assert noun_objects("a star".split(), scene) == []
    masks = object_masks(scene)
    assert masks.shape == (3, 16, 16)
    assert masks[0, 2, 2] == 1.0 and masks[0, 12, 12] == 0.0 and masks[2, 12, 8] == 1.0
    tok, bg = targets(["a blue circle and a square", ""], [scene, scene], [masks, masks], length=24)
    assert tok.shape == (2, 24, 16, 16) and bg.shape == (2, 16, 16)
    assert torch.equal(tok[0, 3], torch.from_numpy(masks[1])) and torch.equal(tok[0, 6], torch.from_numpy(masks[2]))
    grounded = tok.flatten(2).sum(-1) > 0
    assert grounded[0].nonzero().flatten().tolist() == [3, 6] and not grounded[1].any()
    assert torch.allclose(bg[0], 1 - torch.from_numpy(masks.sum(0)).clamp(max=1))


def test_grounding_losses_on_hand_built_maps():
    """Token loss (1 - share inside)^2 and sink loss (1 - p_start)^2 on the background, checked by hand."""
    import torch

    from attnedit.testbed.grounding import losses

    tok = torch.zeros(1, 4, 4, 4)
    tok[0, 2, :2, :2] = 1.0  # token 2 names the top-left quarter
    bg = torch.ones(1, 4, 4)
    bg[0, :2, :2] = 0.0
    inside = torch.zeros(1, 16, 4)  # every position: start 0.5, token 2 0.5 inside its quarter only
    inside[..., 0] = 0.5
    quarter = tok[0, 2].flatten() > 0
    inside[0, quarter, 2] = 0.5
    inside[0, ~quarter, 1] = 0.5
    ground, sink = losses([inside], tok, bg)
    assert ground.item() == 0.0
    assert sink.item() == pytest.approx(0.25)  # (1 - 0.5)^2 on every background position
    flat = torch.full((1, 16, 4), 0.25)
    ground, sink = losses([flat], tok, bg)
    assert ground.item() == pytest.approx((1 - 0.25) ** 2)  # a flat map puts a quarter of its mass inside
    assert sink.item() == pytest.approx((1 - 0.25) ** 2)
    # a coarser layer reads the same targets averaged onto its grid
    ground, _ = losses([torch.full((1, 4, 4), 0.25)], tok, bg)
    assert ground.item() == pytest.approx((1 - 0.25) ** 2)


def test_grounding_probe_is_the_stock_attention_and_keeps_maps():
    """The training probe changes no output of the UNet and records one map per cross-attention layer."""
    import torch

    from attnedit.testbed.grounding import install
    from attnedit.testbed.train import build_models

    _, _, unet = build_models(40, seed=0)
    x, t, ehs = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 24, 64)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=ehs).sample
        probe = install(unet)
        after = unet(x, t, encoder_hidden_states=ehs).sample
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert len(probe.maps) == 7  # down blocks 1 + 1, mid 1, up blocks 2 + 2 (layers_per_block + 1)
    assert {m.shape[1] for m in probe.maps} == {256, 64, 16}
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in probe.maps)


def test_training_with_grounding_logs_both_terms(tmp_path):
    import json

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from attnedit.testbed.train import main

    shapes = Path(__file__).resolve().parents[1] / "assets" / "models" / "shapes-sd"
    assert main(["--out", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--data", "16",
                 "--vae-init", str(shapes), "--vae-steps", "0", "--unet-init", str(shapes), "--steps", "2",
                 "--every", "2", "--batch", "4", "--threads", "1", "--ground-weight", "0.1",
                 "--sink-weight", "0.05", "--summary-drop", "0.5"]) == 0
    # both started from the bundled model's weights (2 warm-up steps move the UNet by ~lr / 100)
    vae = AutoencoderKL.from_pretrained(tmp_path / "model", subfolder="vae")
    for name, value in AutoencoderKL.from_pretrained(shapes, subfolder="vae").state_dict().items():
        assert torch.equal(vae.state_dict()[name], value), name
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "model", subfolder="unet").state_dict()
    ref = UNet2DConditionModel.from_pretrained(shapes, subfolder="unet").state_dict()
    assert max((unet[k] - ref[k]).abs().max().item() for k in ref) < 1e-2
    rows = [json.loads(line) for line in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r.get("stage") == "unet")
    assert 0 < row["ground"] <= 1 and 0 < row["sink"] <= 1
    saved = json.loads((tmp_path / "model" / "attnedit.json").read_text())["trained"]
    assert saved["ground_weight"] == 0.1 and saved["sink_weight"] == 0.05 and saved["summary_drop"] == 0.5
    # the VAE's loss comes with it from the folder it was taken from (strict JSON: never NaN)
    shipped = json.loads((shapes / "attnedit.json").read_text())["trained"]
    assert saved["vae_loss"] == shipped["vae_loss"]


def test_summary_drop_gives_end_and_padding_the_empty_captions_states():
    import torch

    from attnedit.testbed.train import drop_summary

    bos, eos = 1, 2
    ids = torch.tensor([[bos, 5, 6, eos, eos, eos], [bos, 7, 8, 9, 10, eos], [bos, eos, eos, eos, eos, eos]])
    states = torch.arange(3 * 6 * 2, dtype=torch.float32).view(3, 6, 2) + 100
    empty = -torch.arange(6 * 2, dtype=torch.float32).view(1, 6, 2)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert drop_summary(states, ids, empty, eos, 0.0, gen) is states  # off: untouched, no random draw
    assert torch.equal(gen.get_state(), state)
    out = drop_summary(states, ids, empty, eos, 1.0, gen)
    assert torch.equal(out[0, :3], states[0, :3]) and torch.equal(out[0, 3:], empty[0, 3:])  # words kept
    assert torch.equal(out[1, :5], states[1, :5]) and torch.equal(out[1, 5:], empty[0, 5:])
    assert torch.equal(out[2, :1], states[2, :1]) and torch.equal(out[2, 1:], empty[0, 1:])
    no_end = torch.tensor([[bos, 5, 6, 7, 8, 9]])  # truncated, no end token: nothing to drop
    assert torch.equal(drop_summary(states[:1], no_end, empty, eos, 1.0, gen), states[:1])
    # p = 0.5: each caption either keeps all its states or drops its whole summary
    picks = [not torch.equal(drop_summary(states, ids, empty, eos, 0.5, gen)[0], states[0]) for _ in range(200)]
    assert 70 < sum(picks) < 130
