"""The Gradio app through gradio_client, against an app served on 127.0.0.1 by this test module.

Every tab is called with good input and with one bad input whose readable reason must come back;
several clients at once must get exactly the images they get one at a time.
"""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

if os.environ.get("CI") != "true":  # in CI the app extra is installed: a missing gradio must fail there
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_client")
from gradio_client import Client
from gradio_client.exceptions import AppError

from apps.app import AttnEditApp, ModelPool, launch

MODEL = "tiny-sd"
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# a model folder shipping its own settings (`attnedit.json`), as the bundled models do
FOLDER_SETTINGS = {"steps": 3, "guidance": 2.5, "height": 48, "width": 80}


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory) -> str:
    from attnedit.tiny import build_tiny

    folder = tmp_path_factory.mktemp("models") / "own-settings"
    build_tiny("sd").save_pretrained(folder)
    (folder / "attnedit.json").write_text(json.dumps(FOLDER_SETTINGS))
    return str(folder)


@pytest.fixture(scope="module")
def served(folder_model):
    pool = ModelPool([MODEL, folder_model])
    app = AttnEditApp(pool, concurrency=4)  # gradio may run 4 requests at once: the model lock must hold
    demo = app.build()
    url = launch(demo, "127.0.0.1", free_port(), block=False)
    yield app, url
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def replay(download: str, tmp_path: Path) -> list[dict]:
    """The app's parameters download through `attnedit batch --validate`, then `attnedit batch`
    (a fresh process-like run: it loads the model and any concepts itself); the made images'
    sidecars in job order, each with the path of its PNG."""
    import zipfile

    from attnedit.cli import main

    if download.endswith(".zip"):
        with zipfile.ZipFile(download) as zf:
            zf.extractall(tmp_path / "unzipped")
        (job,) = (tmp_path / "unzipped").glob("*/job.jsonl")
    else:
        job = Path(download)
    assert main(["batch", "--validate", str(job)]) == 0
    out = tmp_path / "replayed"
    assert main(["batch", str(job), "--out", str(out), "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return [{**json.loads((out / r["sidecar"]).read_text()), "path": str(out / r["image"])} for r in rows]


def painted(size: tuple[int, int], box: tuple[int, int, int, int] | None, folder: Path, name: str):
    """An ImageEditor value as a browser sends it: a blank background and one layer painted in `box`."""
    from gradio_client import handle_file
    from PIL import ImageDraw

    background = Image.new("RGB", size, (235, 235, 235))
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    if box is not None:
        ImageDraw.Draw(layer).rectangle(box, fill=(255, 32, 32, 255))
    background.save(folder / f"{name}-bg.png")
    layer.save(folder / f"{name}-layer.png")
    return {"background": handle_file(str(folder / f"{name}-bg.png")),
            "layers": [handle_file(str(folder / f"{name}-layer.png"))],
            "composite": handle_file(str(folder / f"{name}-bg.png"))}


def gen(client: Client, prompt: str = "a red circle and a blue square", seed: int = 0, size: int = 64,
        todo: bool = False, **kw):
    return client.predict(MODEL, prompt, "", seed, STEPS, 7.5, size, size, todo, 2, False, False,
                          api_name="/generate", **kw)


def test_generate_returns_image_png_and_a_job_the_batch_cli_reproduces(served, client, tmp_path):
    app, _ = served
    image, info, png, jobs = gen(client, seed=3)
    assert pixels(image).shape == (64, 64, 3)
    assert np.array_equal(pixels(image), pixels(png))
    assert Image.open(png).format == "PNG"
    assert "2 steps" in info and " s**" in info
    lines = [json.loads(line) for line in Path(jobs).read_text().splitlines()]
    assert lines[0] == {"defaults": {"model": MODEL}}
    assert lines[1]["seeds"] == [3] and lines[1]["steps"] == STEPS and lines[1]["controls"] == []

    from attnedit.batch import plan, run_batch

    with app.pool.use(MODEL) as pipe:
        checked = plan(jobs, pipe)
        assert not checked.problems and len(checked.units) == 1
        run_batch(jobs, tmp_path / "batch", pipe=pipe, model=MODEL, progress=False)
    made = [p for p in (tmp_path / "batch").glob("*.png")]
    assert len(made) == 1
    assert np.array_equal(pixels(str(made[0])), pixels(png))


def test_generate_bad_size_and_foreign_model_are_refused_with_the_reason(client):
    with pytest.raises(AppError, match="multiple of 8"):
        gen(client, size=60)
    with pytest.raises(AppError, match="empty"):
        gen(client, prompt="   ")
    with pytest.raises(AppError, match="not offered by this app"):
        client.predict("/etc/passwd", "a cat", "", 0, STEPS, 7.5, 64, 64, False, 2, False, False,
                       api_name="/generate")


def test_each_model_brings_its_recommended_settings(served, client, folder_model):
    """Steps, guidance and size come from `EditPipeline.recommended()`: a folder's attnedit.json wins
    over its family's defaults, on the page it opens with and whenever the model is chosen."""
    app, _ = served
    assert app.pool.get(folder_model).recommended() == FOLDER_SETTINGS
    assert app.pool.get(MODEL).recommended() == {"steps": 4, "guidance": 7.5, "height": 64, "width": 64}
    own = client.predict(folder_model, api_name="/model_defaults")
    assert list(own[:4]) == [3, 2.5, 48, 80]  # the first settings row: Generate's
    assert set(own) == {3, 2.5, 48, 80}  # every tab's row; the edit has steps and guidance only
    assert own.count(3) == own.count(2.5) == own.count(48) + ("masactrl" in app.controls) == own.count(80) + (
        "masactrl" in app.controls)
    assert list(client.predict(MODEL, api_name="/model_defaults")[:4]) == [4, 7.5, 64, 64]
    with pytest.raises(AppError, match="not offered by this app"):
        client.predict("/etc", api_name="/model_defaults")
    page = AttnEditApp(ModelPool([folder_model])).build()  # opened on that model
    values = {c["props"].get("elem_id"): c["props"].get("value") for c in page.config["components"]}
    assert [values[f"generate-{k}"] for k in ("steps", "guidance", "height", "width")] == [3, 2.5, 48, 80]
    if "masactrl" in app.controls:
        assert [values["edit-steps"], values["edit-guidance"]] == [3, 2.5]
    image, info, _, _ = client.predict(folder_model, "a red circle", "", 0, *own[:4], False, 2, False, False,
                                       api_name="/generate")
    assert Image.open(image).size == (80, 48) and "3 steps, 48x80" in info


def test_generate_speedup_toggles_build_their_controls(served, client):
    app, _ = served
    if "todo" not in app.controls:
        with pytest.raises(AppError, match="not available"):
            gen(client, todo=True)
        return
    agent = "agent" in app.controls
    image, info, _, jobs = client.predict(MODEL, "a red circle and a blue square", "", 0, STEPS, 7.5, 64, 64, True,
                                          2, agent, False, api_name="/generate")
    assert "todo" in info
    job = json.loads(Path(jobs).read_text().splitlines()[1])
    assert [c["name"] for c in job["controls"]] == ["todo", *(["agent"] if agent else [])]
    assert job["controls"][0]["factor"] == 2
    assert not np.array_equal(pixels(image), pixels(gen(client, seed=0)[0]))  # the toggles did act
    if "clear" in app.controls and "clear" not in app.speedups():  # CLEAR needs an adapter; tiny-sd has none
        with pytest.raises(AppError, match="CLEAR needs a trained adapter"):
            client.predict(MODEL, "a red circle", "", 0, STEPS, 7.5, 64, 64, False, 2, False, True,
                           api_name="/generate")


def test_attention_maps_tab_step_slider_and_pixel_self_attention(client):
    image, grid, slider, info, png, _jobs = client.predict(
        MODEL, "a red circle and a blue square", "red, square", 0, 3, 7.5, 64, 64, api_name="/maps")
    # shown 4x (pixel-exact, so clicks map back), downloaded as made
    assert pixels(png).shape == (64, 64, 3)
    assert np.array_equal(pixels(image), pixels(png).repeat(4, 0).repeat(4, 1))
    # image tile + one tile per chosen word, 192 px each, labels above
    assert Image.open(grid).size == (3 * 192, 192 + 24)  # tiles of 192 px, a 24 px label band under them
    assert slider["maximum"] == 2 and "3 steps" in info
    step0 = client.predict(0, api_name="/maps_step")
    step2 = client.predict(2, api_name="/maps_step")
    assert Image.open(step0).size == Image.open(grid).size
    assert not np.array_equal(pixels(step0), pixels(step2))
    a = client.predict(5, 5, api_name="/self_attention")
    b = client.predict(60, 60, api_name="/self_attention")
    assert pixels(a).shape == (256, 256, 3)
    assert not np.array_equal(pixels(a), pixels(b))


def test_attention_maps_unknown_word_and_out_of_range_pixel_are_refused(client):
    with pytest.raises(AppError, match="word 'zebra' is not in the prompt; its words are: a, red, circle"):
        client.predict(MODEL, "a red circle", "zebra", 0, STEPS, 7.5, 64, 64, api_name="/maps")
    client.predict(MODEL, "a red circle", "", 0, STEPS, 7.5, 64, 64, api_name="/maps")
    with pytest.raises(AppError, match="x must be an integer from 0 to 63, got 64"):
        client.predict(64, 0, api_name="/self_attention")


def test_attention_maps_events_need_a_run_first(served):
    fresh = Client(served[1], verbose=False)  # a new session has no recorded maps
    with pytest.raises(AppError, match="run the Attention maps tab first"):
        fresh.predict(0, api_name="/maps_step")


def test_concurrent_clients_get_the_images_they_get_alone(served, client):
    app, url = served
    requests = [("a red circle", 1, False), ("a blue square", 2, "todo" in app.controls),
                ("a green triangle", 3, False), ("a red circle", 1, "todo" in app.controls)]
    alone = [pixels(gen(client, p, s, todo=t)[0]) for p, s, t in requests]
    clients = [Client(url, verbose=False) for _ in requests]
    with ThreadPoolExecutor(len(requests)) as ex:
        futures = [ex.submit(gen, c, p, s, 64, t) for c, (p, s, t) in zip(clients, requests)]
        together = [pixels(f.result()[0]) for f in futures]
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)
    assert not np.array_equal(alone[0], alone[1])


def needs(served, control: str) -> None:
    """The app builds a method's tab only when attnedit has its control; every method is in this build, so a
    missing one is a failure, not a skip."""
    app, _ = served
    assert control in app.controls, f"control {control!r} missing: its tab is left out of the app"


def test_multi_subject_plain_image_matches_generate_and_the_job_validates(served, client):
    needs(served, "astar")
    app, _ = served
    plain, controlled, grid, info, png, jobs = client.predict(
        MODEL, "a red circle and a blue square", "astar", "circle, square", "", 4, STEPS, 7.5, 64, 64,
        api_name="/multi_subject")
    alone = gen(client, seed=4)[0]
    assert np.array_equal(pixels(plain), pixels(alone))  # the plain side is exactly the Generate tab's image
    assert np.array_equal(pixels(controlled), pixels(png))
    assert Image.open(grid).size == (3 * 192, 192 + 24)  # tiles of 192 px, a 24 px label band under them
    assert "A-STAR" in info
    job = json.loads(Path(jobs).read_text().splitlines()[1])
    assert job["controls"][0]["name"] == "astar" and job["controls"][0]["words"] == ["circle", "square"]
    from attnedit.batch import plan

    with app.pool.use(MODEL) as pipe:
        assert not plan(jobs, pipe).problems


def test_multi_subject_bad_boxes_are_refused_with_the_reason(served, client):
    needs(served, "bounded")
    args = (MODEL, "a red circle and a blue square", "bounded", "circle, square")
    with pytest.raises(AppError, match=r"box 1 .* outside"):
        client.predict(*args, "0,0,0.5,1; 0.5,0,1.5,1", 0, STEPS, 7.5, 64, 64, api_name="/multi_subject")
    with pytest.raises(AppError, match="1 boxes for 2 subject words"):
        client.predict(*args, "0,0,0.5,1", 0, STEPS, 7.5, 64, 64, api_name="/multi_subject")
    with pytest.raises(AppError, match="not 4 numbers"):
        client.predict(*args, "0,0,0.5; 0.5,0,1,1", 0, STEPS, 7.5, 64, 64, api_name="/multi_subject")
    _, boxed, *_ = client.predict(*args, "0,0,0.5,1; 0.5,0,1,1", 0, STEPS, 7.5, 64, 64, api_name="/multi_subject")
    assert pixels(boxed)[32, 0].tolist() == [255, 0, 0]  # the first box is outlined in red


def test_consistent_source_is_the_plain_image_and_bad_mask_word_is_refused(served, client):
    needs(served, "masactrl")
    gallery, info, files, jobs = client.predict(
        MODEL, "a red circle", "a red circle on the left\na red circle on the right", "", 5, STEPS, 7.5, 64, 64,
        api_name="/consistent")
    assert [g["caption"] for g in gallery] == ["source: a red circle", "target: a red circle on the left",
                                               "target: a red circle on the right"]
    assert len(files) == 3 and "3 images" in info
    # MasaCtrl never touches the source row: it is the plain image of its prompt and seed (generated
    # alone here, in a batch of 3 there: CPU kernels may round differently by one or two levels)
    alone = pixels(gen(client, "a red circle", seed=5)[0]).astype(int)
    assert np.abs(pixels(gallery[0]["image"]).astype(int) - alone).max() <= 2
    job = json.loads(Path(jobs).read_text().splitlines()[1])
    assert job["together"] is True and job["prompts"][0] == "a red circle" and job["controls"][0]["name"] == "masactrl"
    with pytest.raises(AppError, match="word 'zebra' is not in the prompt"):
        client.predict(MODEL, "a red circle", "a red circle on the left", "zebra", 0, STEPS, 7.5, 64, 64,
                       api_name="/consistent")


def test_consistent_with_a_drawn_mask_replays_in_batch_and_bad_masks_are_refused(served, client, tmp_path):
    needs(served, "masactrl")
    from apps.app import mask_canvas

    canvas = mask_canvas(64, 64).size  # the page paints on the image enlarged 4x
    assert canvas == (256, 256)
    args = (MODEL, "a red circle", "a red circle on the left\na red circle on the right", "", 6, STEPS, 7.5, 64, 64)
    plain, *_ = client.predict(*args, api_name="/consistent")
    gallery, info, _, bundle = client.predict(*args, True, painted(canvas, (0, 64, 127, 191), tmp_path, "left"),
                                              api_name="/consistent")
    assert "drawn mask" in info and bundle.endswith(".zip")
    made = [pixels(g["image"]) for g in gallery]
    assert np.array_equal(made[0], pixels(plain[0]["image"]))  # the source is never touched
    assert not np.array_equal(made[1], pixels(plain[1]["image"]))  # the mask acted on the targets
    sidecars = replay(bundle, tmp_path)
    assert [s["group"]["role"] for s in sidecars] == ["source", "target", "target"]
    assert sidecars[0]["controls_spec"][0]["masks"] == ["mask.png"] * 3
    for side, image in zip(sidecars, made):
        assert np.array_equal(pixels(side["path"]), image)  # the same batch of 3: equal to the level
    with pytest.raises(AppError, match="the drawn mask is empty: paint the foreground"):
        client.predict(*args, True, painted(canvas, None, tmp_path, "empty"), api_name="/consistent")
    with pytest.raises(AppError, match=r"the drawn mask is 100x100 but the image is 64x64 \(W x H\)"):
        client.predict(*args, True, painted((100, 100), (0, 0, 50, 50), tmp_path, "odd"), api_name="/consistent")
    with pytest.raises(AppError, match="either a mask word or a drawn mask, not both"):
        client.predict(*args[:3], "circle", *args[4:], True, painted(canvas, (0, 0, 9, 9), tmp_path, "both"),
                       api_name="/consistent")


def test_edit_resizes_a_large_upload_and_says_so(served, client, tmp_path):
    needs(served, "masactrl")
    import zipfile

    from gradio_client import handle_file

    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(big)
    gallery, info, png, params = client.predict(MODEL, handle_file(str(big)), "a red circle", "a blue circle",
                                                STEPS, 7.5, api_name="/edit")
    assert "resized to 64x40" in info
    assert [g["caption"] for g in gallery] == ["reconstruction", "edit"]
    assert Image.open(png).size == (64, 40)
    with zipfile.ZipFile(params) as zf:
        names = sorted(Path(n).name for n in zf.namelist())
        (job_name,) = [n for n in zf.namelist() if n.endswith("job.jsonl")]
        job = json.loads(zf.read(job_name).decode().splitlines()[1])
    assert names == ["image.png", "job.jsonl"]
    assert (job["image"], job["source_prompt"], job["prompt"]) == ("image.png", "a red circle", "a blue circle")
    assert [c["name"] for c in job["controls"]] == ["masactrl"]  # no app-progress, no trajectory follower
    gallery, *_ = client.predict(MODEL, handle_file(str(big)), "a red circle", "a blue circle", STEPS, 7.5, "circle",
                                 api_name="/edit")
    assert len(gallery) == 2
    with pytest.raises(AppError, match="word 'zebra' is not in the prompt"):
        client.predict(MODEL, handle_file(str(big)), "a red circle", "a blue circle", STEPS, 7.5, "zebra",
                       api_name="/edit")
    with pytest.raises(AppError, match="upload an image first"):
        client.predict(MODEL, None, "a red circle", "a blue circle", STEPS, 7.5, api_name="/edit")


def test_edit_with_a_drawn_mask_replays_in_batch_from_the_saved_upload(served, client, tmp_path):
    """The job zip holds the upload as it was edited (resized to 64x40) and the drawn mask; replayed
    by `attnedit batch`, the edit is the app's image exactly."""
    needs(served, "masactrl")
    from gradio_client import handle_file
    from PIL import ImageDraw

    app, _ = served
    photo = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(photo).ellipse((40, 40, 160, 160), fill=(200, 30, 30))
    photo.save(tmp_path / "photo.png")
    canvas = app.edit_canvas(MODEL, photo)  # what the page shows to paint on: the fitted upload, 4x
    assert canvas["background"].size == (256, 160) and canvas["layers"] == []
    args = (MODEL, handle_file(str(tmp_path / "photo.png")), "a red circle", "a blue circle", STEPS, 7.5, "")
    gallery, info, png, bundle = client.predict(*args, True, painted((256, 160), (32, 32, 127, 127), tmp_path, "e"),
                                                api_name="/edit")
    assert "drawn mask" in info and "resized to 64x40" in info
    # a mask painted on the upload itself (its own size) is resized with it
    same, *_ = client.predict(*args, True, painted((300, 200), (40, 40, 159, 159), tmp_path, "u"), api_name="/edit")
    assert len(same) == 2
    sidecars = replay(bundle, tmp_path)
    assert [(s["prompt"], s["group"]["role"]) for s in sidecars] == [("a red circle", "source"),
                                                                      ("a blue circle", "target")]
    assert sidecars[1]["inputs"]["image"] == "image.png" and sidecars[1]["height"] == 40
    assert np.array_equal(pixels(sidecars[1]["path"]), pixels(png))
    assert np.array_equal(pixels(sidecars[0]["path"]), pixels(gallery[0]["image"]))
    with pytest.raises(AppError, match="the drawn mask is 64x64 but the image is 64x40"):
        client.predict(*args, True, painted((64, 64), (0, 0, 9, 9), tmp_path, "sq"), api_name="/edit")


def test_subjects_across_images_makes_references_and_scene(served, client, tmp_path):
    needs(served, "reposition")
    app, _ = served
    refs = "a red circle\na blue square"
    gallery, info, png, params = client.predict(
        MODEL, refs, "circle, square", "a red circle and a blue square", "0,0.2,0.5,0.8; 0.5,0.2,1,0.8", 0, STEPS,
        7.5, 64, 64, api_name="/subjects")
    assert [g["caption"].split(":")[0] for g in gallery] == ["reference", "reference", "scene"]
    assert "3 images" in info
    assert Image.open(png).size == (64, 64)
    job = json.loads(Path(params).read_text().splitlines()[1])  # nothing uploaded: the JSONL alone
    assert job["references"]["subjects"] == ["circle", "square"] and job["seeds"] == [0]
    from attnedit.batch import plan

    with app.pool.use(MODEL) as pipe:
        assert not plan(params, pipe).problems
    # isolation alone, with real reference photos of another size (inverted, resized and said so)
    from gradio_client import handle_file

    photos = []
    for i, colour in enumerate(("red", "blue")):
        photos.append(tmp_path / f"ref{i}.png")
        Image.new("RGB", (96, 96), colour).save(photos[-1])
    gallery, info, png, params = client.predict(
        MODEL, refs, "circle, square", "a red circle and a blue square", "0,0.2,0.5,0.8; 0.5,0.2,1,0.8", 0, STEPS,
        7.5, 64, 64, False, True, [handle_file(str(p)) for p in photos], api_name="/subjects")
    assert "reference photo 1 (96x96) resized to 64x64" in info
    assert params.endswith(".zip")
    sidecars = replay(params, tmp_path)  # the job names the resized photos saved next to it
    refs_block = sidecars[-1]["inputs"]["references"]
    assert refs_block["images"] == ["reference-1.png", "reference-2.png"]
    assert refs_block["options"] == {"reposition": False, "isolate": True}
    assert [s["group"]["role"] for s in sidecars] == ["source", "source", "target"]
    assert np.array_equal(pixels(sidecars[-1]["path"]), pixels(png))
    with pytest.raises(AppError, match="1 reference photos for 2 reference prompts"):
        client.predict(MODEL, refs, "circle, square", "a red circle and a blue square", "", 0, STEPS, 7.5, 64, 64,
                       True, True, [handle_file(str(photos[0]))], api_name="/subjects")
    with pytest.raises(AppError, match="1 scene boxes for 2 subjects"):
        client.predict(MODEL, refs, "circle, square", "a red circle and a blue square", "0,0,1,1", 0, STEPS, 7.5,
                       64, 64, api_name="/subjects")


def test_concepts_training_adds_a_model_whose_tokens_work_in_other_tabs(served, client, tmp_path):
    app, _ = served
    assert app.has_attencraft(), "AttenCraft training is in this build: the concepts tab must be there"
    from gradio_client import handle_file
    from PIL import ImageDraw

    photo = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(photo)
    draw.ellipse((4, 20, 28, 44), fill="red")
    draw.rectangle((36, 20, 60, 44), fill="blue")
    photo.save(tmp_path / "two.png")
    with pytest.raises(AppError, match="give at least two concepts"):
        client.predict(MODEL, handle_file(str(tmp_path / "two.png")), "circle", 2, 0, api_name="/concepts")
    masks, info, dropdown, prompt, weights = client.predict(
        MODEL, handle_file(str(tmp_path / "two.png")), "circle, square", 2, 0, api_name="/concepts")
    assert prompt == "a photo of <circle> and <square>" and "trained 2 steps" in info
    assert Path(weights).name == "concepts.safetensors" and Image.open(masks).format == "PNG"
    new = dropdown["value"]
    assert new in app.pool.names and new.startswith(MODEL)
    image, _, png, bundle = client.predict(new, prompt, "", 0, STEPS, 7.5, 64, 64, False, 2, False, False,
                                           api_name="/generate")
    assert pixels(image).shape == (64, 64, 3)
    # the job names the base model and the concepts shipped next to it; replayed, the tokens work the same
    sidecars = replay(bundle, tmp_path)
    assert len(sidecars) == 1 and sidecars[0]["model"] == MODEL and sidecars[0]["prompt"] == prompt
    assert np.array_equal(pixels(sidecars[0]["path"]), pixels(png))
    with pytest.raises(AppError, match="already carries trained concepts"):
        client.predict(new, handle_file(str(tmp_path / "two.png")), "circle, square", 2, 0, api_name="/concepts")


def test_uploads_over_the_cap_are_refused(served, client, tmp_path):
    needs(served, "masactrl")
    from gradio_client import handle_file

    big = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1800, 1800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 8 * 1024 * 1024
    with pytest.raises(Exception, match="(?i)file size|too large|413"):
        client.predict(MODEL, handle_file(str(big)), "a red circle", "a blue circle", STEPS, 7.5, api_name="/edit")


def test_cli_lists_app_without_importing_gradio_and_serves_the_page(tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    code = ("import sys, attnedit.cli as c; p = c.build_parser(); "
            "assert 'app' in p._subparsers._group_actions[0].choices; assert 'gradio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

    from attnedit.app_cli import models_of

    assert models_of("tiny-sd", "tiny-sdxl, tiny-sd") == (["tiny-sdxl", "tiny-sd"], "tiny-sd")
    assert models_of(None, "tiny-sdxl") == (["tiny-sdxl"], "tiny-sdxl")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "attnedit", "app", "--model", MODEL, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 90
        while True:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
                assert time.time() < deadline, "attnedit app did not come up in 90 s"
                time.sleep(0.5)
        assert "attnedit" in page
    finally:
        proc.terminate()
        proc.wait(timeout=30)
