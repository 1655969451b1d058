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


@pytest.fixture(scope="module")
def served():
    pool = ModelPool([MODEL])
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
    assert Image.open(grid).size == (3 * 192, 192 + 18)
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
    with pytest.raises(AppError, match="x must be a whole number from 0 to 63"):
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
    """Method tabs exist only when their control is on main; without it the endpoint must be absent."""
    app, url = served
    if control not in app.controls:
        api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
        assert not any(control in name for name in api["named_endpoints"])
        pytest.skip(f"control {control!r} is not in this build, so its tab is left out")


def test_multi_subject_plain_image_matches_generate_and_the_job_validates(served, client):
    needs(served, "astar")
    app, _ = served
    plain, controlled, grid, info, png, jobs = client.predict(
        MODEL, "a red circle and a blue square", "astar", "circle, square", "", 4, STEPS, 7.5, 64, 64,
        api_name="/multi_subject")
    alone = gen(client, seed=4)[0]
    assert np.array_equal(pixels(plain), pixels(alone))  # the plain side is exactly the Generate tab's image
    assert np.array_equal(pixels(controlled), pixels(png))
    assert Image.open(grid).size == (3 * 192, 192 + 18)
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


def test_edit_resizes_a_large_upload_and_says_so(served, client, tmp_path):
    needs(served, "masactrl")
    from gradio_client import handle_file

    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(big)
    gallery, info, png, params = client.predict(MODEL, handle_file(str(big)), "a red circle", "a blue circle",
                                                STEPS, 7.5, api_name="/edit")
    assert "resized to 64x40" in info
    assert [g["caption"] for g in gallery] == ["reconstruction", "edit"]
    assert Image.open(png).size == (64, 40)
    saved = json.loads(Path(params).read_text())
    assert saved["edit"]["targets"] == ["a blue circle"]
    assert [c["name"] for c in saved["controls"]] == ["masactrl", "follow_trajectory"]  # no app-progress
    gallery, *_ = client.predict(MODEL, handle_file(str(big)), "a red circle", "a blue circle", STEPS, 7.5, "circle",
                                 api_name="/edit")
    assert len(gallery) == 2
    with pytest.raises(AppError, match="word 'zebra' is not in the prompt"):
        client.predict(MODEL, handle_file(str(big)), "a red circle", "a blue circle", STEPS, 7.5, "zebra",
                       api_name="/edit")
    with pytest.raises(AppError, match="upload an image first"):
        client.predict(MODEL, None, "a red circle", "a blue circle", STEPS, 7.5, api_name="/edit")


def test_subjects_across_images_makes_references_and_scene(served, client, tmp_path):
    needs(served, "reposition")
    refs = "a red circle\na blue square"
    gallery, info, png, params = client.predict(
        MODEL, refs, "circle, square", "a red circle and a blue square", "0,0.2,0.5,0.8; 0.5,0.2,1,0.8", 0, STEPS,
        7.5, 64, 64, api_name="/subjects")
    assert [g["caption"].split(":")[0] for g in gallery] == ["reference", "reference", "scene"]
    assert "3 images" in info
    assert Image.open(png).size == (64, 64)
    assert json.loads(Path(params).read_text())["subjects"] == ["circle", "square"]
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
    saved = json.loads(Path(params).read_text())
    assert saved["real_references"] is True and saved["options"] == {"reposition": False, "isolate": True}
    with pytest.raises(AppError, match="1 reference photos for 2 reference prompts"):
        client.predict(MODEL, refs, "circle, square", "a red circle and a blue square", "", 0, STEPS, 7.5, 64, 64,
                       True, True, [handle_file(str(photos[0]))], api_name="/subjects")
    with pytest.raises(AppError, match="1 scene boxes for 2 subjects"):
        client.predict(MODEL, refs, "circle, square", "a red circle and a blue square", "0,0,1,1", 0, STEPS, 7.5,
                       64, 64, api_name="/subjects")


def test_concepts_training_adds_a_model_whose_tokens_work_in_other_tabs(served, client, tmp_path):
    app, _ = served
    if not app.has_attencraft():
        pytest.skip("AttenCraft training is not in this build")
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
    image, *_ = client.predict(new, prompt, "", 0, STEPS, 7.5, 64, 64, False, 2, False, False, api_name="/generate")
    assert pixels(image).shape == (64, 64, 3)
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
