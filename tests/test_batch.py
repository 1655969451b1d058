"""`attnedit batch`: job files, validation, determinism across batching and processes, crash safety."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnedit
from attnedit import batch
from attnedit.controls import CONTROLS, Control, register

ROOT = Path(__file__).resolve().parent.parent

JOBS_YAML = """\
defaults:
  steps: 2
  size: 64
jobs:
  - prompt: a red circle
    seeds: [0, 1, 2]
  - prompt: a blue square and a cat
    seeds: 2
    maps: [cat]
  - prompts: [a dog, a green bird]
    seed: 10
    seeds: 2
  - prompt: a cow
    seeds: [5]
    guidance: 3.0
"""
N_IMAGES = 10


@register
class Exploding(Control):
    """A control that fails in the middle of denoising (for failure isolation tests)."""

    name = "test_exploding"

    def begin_step(self, run, step: int) -> None:
        raise RuntimeError(f"boom at step {step}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """CPU kernels sum in a thread-count-dependent order, so every run here (in this process and
    in the subprocesses, OMP_NUM_THREADS=1) uses one thread to compare bytes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    return attnedit.load("tiny-sd")


@pytest.fixture(scope="module")
def jobs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("jobs") / "jobs.yaml"
    path.write_text(JOBS_YAML)
    return path


@pytest.fixture(scope="module")
def reference(pipe, jobs_file, tmp_path_factory) -> dict[str, bytes]:
    """Every file one in-process run writes, by name."""
    out = tmp_path_factory.mktemp("ref")
    summary = batch.run_batch(jobs_file, out, model="tiny-sd", pipe=pipe, batch_size=2, progress=False)
    assert summary.done == N_IMAGES and summary.ok
    return _files(out)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf-home"), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    return env


def _check_outputs(out: Path, reference: dict[str, bytes]) -> None:
    """Exactly the reference files, every PNG readable, the manifest listing each image once."""
    files = _files(out)
    assert sorted(files) == sorted(reference)
    for name, data in files.items():
        if name.endswith(".png"):
            Image.open(out / name).load()  # not truncated
        assert data == reference[name], name
    rows = [json.loads(line) for line in (out / batch.MANIFEST).read_text().splitlines()]
    images = [r["image"] for r in rows]
    assert len(images) == len(set(images)) == N_IMAGES
    assert set(images) == {n for n in files if n.endswith(".png") and not n.endswith(".maps.png")}


# ------------------------------------------------------------------------------------ job files
def test_jsonl_problems_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"defaults": {"steps": 2}}\n'
        '{"prompt": "a cat", "seeds": [0, 1]}\n'
        "\n"
        '{"prompt": "a dog" "seeds": 3}\n'  # line 4: malformed
        '{"prompt": "a bird", "sedes": 3}\n'  # line 5: unknown key
        '{"prompt": "a cow", "controls": [{"name": "no_such_control"}]}\n'  # 6
        '{"prompt": "a cow", "controls": [{"name": "store", "wordz": ["cow"]}]}\n'  # 7
        '{"prompt": "a cow", "seeds": [1], "seed": 3}\n'  # 8
        '["not", "a", "job"]\n'  # 9
        '{"prompt": "a hen", "seeds": 2}\n'
        '{"prompt": "a hen", "controls": [{"name": "store", "words": 5}]}\n'  # 11: wrong type
        '{"defaults": {"stepz": 2}}\n'  # 12: a second defaults line
    )
    result = batch.plan(path)
    lines = {p.line: p.message for p in result.problems}
    assert sorted(lines) == [4, 5, 6, 7, 8, 9, 11, 12]
    assert lines[11].startswith("TypeError") and "second defaults line" in lines[12]
    assert "not valid JSON" in lines[4]
    assert "'sedes'" in lines[5] and "did you mean 'seeds'" in lines[5]
    assert "unknown control 'no_such_control'" in lines[6] and "store" in lines[6]
    assert "unknown option 'wordz'" in lines[7] and "words" in lines[7]
    assert "either a seeds list or seed" in lines[8]
    assert [(u.prompt, u.seed, u.line) for u in result.units] == [("a cat", 0, 2), ("a cat", 1, 2),
                                                                   ("a hen", 0, 10), ("a hen", 1, 10)]
    assert all(u.settings["steps"] == 2 for u in result.units)


def test_yaml_syntax_error_keeps_the_other_jobs(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text(
        "defaults:\n"
        "  steps: 3\n"
        "  stepz: 4\n"
        "jobs:\n"
        "  - prompt: a cat\n"
        "    seeds: [0, 1\n"  # line 5: unclosed list
        "  - prompt: a dog\n"
        "    colour: red\n"  # job at line 6: unknown key
        "  - prompt: a bird\n"
        "    seeds: 2\n"
    )
    result = batch.plan(path)
    assert [(p.line, p.message.split(":")[0]) for p in result.problems] == [
        (1, "unknown key 'stepz' in defaults (did you mean 'steps'?); valid keys"),
        (6, "YAML syntax error"), (7, "unknown key 'colour'; valid keys")]
    assert [(u.prompt, u.seed, u.line, u.settings["steps"]) for u in result.units] == [("a bird", 0, 9, 3),
                                                                                       ("a bird", 1, 9, 3)]


def test_yaml_problems_have_the_line_of_their_job(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("jobz: []\njobs:\n  - prompt: a cat\n\n  - prompt: a dog\n    seeds: -1\n"
                    "  - {prompt: a cow, maps: 3}\n")
    result = batch.plan(path)
    assert [(p.line, p.message) for p in result.problems] == [
        (1, "unknown top-level key 'jobz'; a YAML job file has 'defaults' and 'jobs'"),
        (5, "seeds must be a count from 1 to 100000 or a list of distinct seeds from 0 to 4294967295, got -1"),
        (7, "maps must be true/false or a list of words, got 3")]
    assert [u.line for u in result.units] == [3]


def test_precedence_job_then_cli_then_defaults(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("defaults:\n  steps: 3\n  size: 64\n  seeds: 2\njobs:\n"
                    "  - prompt: a cat\n"
                    "  - prompt: a dog\n    steps: 5\n    height: 128\n    seeds: [7]\n")
    result = batch.plan(path, overrides={"steps": 4, "width": None})
    got = [(u.prompt, u.seed, u.settings["steps"], u.settings["height"], u.settings["width"]) for u in result.units]
    assert got == [("a cat", 0, 4, 64, 64), ("a cat", 1, 4, 64, 64), ("a dog", 7, 5, 128, None)]


def test_seed_and_name_do_not_depend_on_position(tmp_path):
    """Reordering the file keeps every image's seed and file name (the key is its content)."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    jobs = ['{"prompt": "a cat", "seeds": [4, 9]}', '{"prompt": "a dog", "seeds": 2, "steps": 3}']
    a.write_text("\n".join(jobs) + "\n")
    b.write_text("\n\n" + "\n".join(reversed(jobs)) + "\n")
    names = lambda p: {(u.prompt, u.seed, u.stem) for u in batch.plan(p, model="tiny-sd").units}  # noqa: E731
    assert names(a) == names(b)
    assert {s for _, s, _ in names(a)} == {4, 9, 0, 1}


def test_validate_checks_words_boxes_controls_and_writes_nothing(tmp_path, capsys):
    from attnedit.cli import main

    path = tmp_path / "jobs.jsonl"
    lines = [
        '{"prompt": "a cat on a mat", "controls": [{"name": "store", "words": ["cat"]}], "steps": 2}',
        '{"prompt": "a cat on a mat", "controls": [{"name": "store", "words": ["zebra"]}]}',
        '{"prompt": "a cat", "controls": [{"name": "store", "wordz": ["cat"]}]}',
        '{"prompt": "a cat", "controls": [{"name": "nope"}]}',
        '{"prompt": "a cat", "size": 60}',
        '{"prompt": "a cat", "maps": ["dog"]}',
    ]
    if "bounded" in CONTROLS:
        lines.append('{"prompt": "a cat and a dog", "controls": [{"name": "bounded", "words": ["cat", "dog"], '
                     '"boxes": [[0.1, 0.1, 0.5], [0.5, 0.5, 0.9, 0.9]]}]}')
    path.write_text("\n".join(lines) + "\n")
    before = set(tmp_path.iterdir())
    code = main(["batch", "--validate", str(path), "--model", "tiny-sd"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"{path}:2: word 'zebra' is not in the prompt; its words are: a, cat, on, a, mat" in out
    assert f"{path}:3: unknown option 'wordz'" in out
    assert f"{path}:4: unknown control 'nope'" in out
    assert f"{path}:5: size must be a multiple of 8 for this model" in out and "got 60; e.g. 56 or 64" in out
    assert f"{path}:6: word 'dog' is not in the prompt" in out
    if "bounded" in CONTROLS:
        assert f"{path}:7: " in out and "box" in out.split(f"{path}:7: ")[1].splitlines()[0]
    assert f"{path}:1:" not in out
    assert set(tmp_path.iterdir()) == before


def test_example_job_files_are_valid(pipe):
    """jobs.jsonl / jobs.yaml suit the default 64 px model (no problem, no size warning); the real-checkpoint
    files are valid for their families and --validate warns that their sizes are far from a 64 px model's."""
    examples = ROOT / "assets" / "examples"
    for name, images in (("jobs.jsonl", 11), ("jobs.yaml", 9)):
        result = batch.plan(examples / name, pipe, model="tiny-sd")
        assert result.problems == [] and result.warnings == [] and len(result.units) == images, name
        assert {u.settings["height"] for u in result.units} == {64} and result.units[-1].role in ("plain", "target")
    for name, family in (("jobs-sd15.jsonl", "sd"), ("jobs-sdxl.yaml", "sdxl"), ("jobs-flux.jsonl", "flux")):
        tiny = pipe if family == "sd" else attnedit.load(f"tiny-{family}")
        result = batch.plan(examples / name, tiny, model=f"tiny-{family}")
        assert result.problems == [] and result.units, name
        assert result.warnings and "native" in result.warnings[0].message, name
        assert examples.joinpath(name).read_text().startswith("# attnedit batch"), "the header says how to run it"


# ------------------------------------------------------------------------------ determinism
def test_batched_images_match_one_at_a_time(pipe):
    """One seed per image: a batch gets bit-identical initial latents and text embeddings, so an
    image never depends on its batch neighbours' seeds or prompts. The pixels agree to one level
    only: CPU GEMM/GEMV (oneDNN, MKL) sum in a batch-size-dependent order (e.g. the time-embedding
    Linear runs as a GEMV for one image and a GEMM for four), giving ~1e-7 differences that can flip
    the rounding of a few uint8 pixels. That is why `batch` fixes each image's batch from the job
    file alone (see test_two_processes_match_one_process)."""
    prompts = ["a cat", "a red dog on a mat", "two birds", "a house"]
    seeds = [3, 7, 11, 5]
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    both = pipe.initial_latents(4, 64, 64, gens())
    alone = torch.cat([pipe.initial_latents(1, 64, 64, [g]) for g in gens()])
    assert torch.equal(both, alone)
    emb = pipe.pipe.encode_prompt(prompts, "cpu", 1, True)[0]
    assert torch.equal(emb[1], pipe.pipe.encode_prompt(prompts[1:2], "cpu", 1, True)[0][0])

    batched = [np.asarray(im, dtype=np.int16) for im in pipe.generate(prompts, seed=seeds, steps=2).images]
    single = [np.asarray(pipe.generate(p, seed=s, steps=2).image, dtype=np.int16) for p, s in zip(prompts, seeds)]
    for a, b in zip(batched, single):
        diff = np.abs(a - b)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005
    # and the same batch twice is bit-identical
    again = [np.asarray(im, dtype=np.int16) for im in pipe.generate(prompts, seed=seeds, steps=2).images]
    assert all(np.array_equal(a, b) for a, b in zip(batched, again))


def test_two_processes_match_one_process(tmp_path, jobs_file, reference):
    port = _free_port()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "attnedit", "batch", str(jobs_file), "--out", str(out), "--model", "tiny-sd",
           "--batch-size", "2", "--no-progress"]
    proc = subprocess.run(cmd, env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{N_IMAGES} done, 0 skipped" in proc.stdout
    assert proc.stdout.count("attnedit batch:") == 1  # one summary, from the main process
    _check_outputs(out, reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- crash safety
def test_rerun_repairs_partial_outputs(tmp_path, pipe, jobs_file, reference):
    """The states a kill can leave: a PNG without sidecar, temp files, a torn manifest line, a
    manifest missing rows, a sidecar without its maps grid. A rerun redoes exactly those."""
    out = tmp_path / "out"
    out.mkdir()
    for name, data in reference.items():
        (out / name).write_bytes(data)
    pngs = sorted(n for n in reference if n.endswith(".png") and not n.endswith(".maps.png"))
    maps = pngs[0].replace(".png", ".maps.png")
    assert maps in reference
    (out / maps).unlink()  # a grid lost (its sidecar says it exists)
    (out / pngs[2]).with_suffix(".json").unlink()  # killed between PNG and sidecar
    (out / pngs[3]).unlink()
    (out / pngs[3]).with_suffix(".json").unlink()
    (out / f".{pngs[3]}.tmp").write_bytes(reference[pngs[3]][:100])  # killed while writing the PNG
    (out / pngs[4]).write_bytes(b"garbage")  # a PNG whose sidecar was never written
    (out / pngs[4]).with_suffix(".json").unlink()
    rows = (out / batch.MANIFEST).read_text().splitlines()
    (out / batch.MANIFEST).write_text("\n".join(rows[:4]) + "\n" + rows[4][:20])  # torn last line
    summary = batch.run_batch(jobs_file, out, model="tiny-sd", pipe=pipe, batch_size=2, progress=False)
    assert summary.done == 4 and summary.skipped == N_IMAGES - 4 and summary.ok
    _check_outputs(out, reference)
    # a complete output folder: nothing is redone, nothing is touched
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    summary = batch.run_batch(jobs_file, out, model="tiny-sd", pipe=pipe, batch_size=2, progress=False)
    assert summary.done == 0 and summary.skipped == N_IMAGES
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != batch.MANIFEST} == {
        k: v for k, v in stamps.items() if k != batch.MANIFEST}
    _check_outputs(out, reference)


def test_sigkill_at_random_points_then_rerun(tmp_path, pipe, jobs_file, reference):
    rng = random.Random(1234)
    killed_with = []
    for trial in range(3):
        out = tmp_path / f"out{trial}"
        cmd = [sys.executable, "-m", "attnedit", "batch", str(jobs_file), "--out", str(out), "--model", "tiny-sd",
               "--batch-size", "2", "--no-progress"]
        proc = subprocess.Popen(cmd, env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # wait until the run is writing images, then kill it after a random delay
        target = rng.randint(0, N_IMAGES - 3)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("*.json"))) >= target and (out / batch.MANIFEST).exists():
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_with.append(len(list(out.glob("*.json"))) if out.is_dir() else 0)
        summary = batch.run_batch(jobs_file, out, model="tiny-sd", pipe=pipe, batch_size=2, progress=False)
        assert summary.ok and summary.done + summary.skipped == N_IMAGES
        _check_outputs(out, reference)
        shutil.rmtree(out)
    assert any(0 < k < N_IMAGES for k in killed_with), killed_with  # at least one kill landed mid-run


def test_together_groups_and_cross_sample_controls(tmp_path, pipe):
    """A `together` job is one call per seed with source/target roles (as `masactrl.consistent`);
    MasaCtrl on images generated one per call would copy from nothing: refused at planning."""
    if "masactrl" not in CONTROLS:
        pytest.skip("MasaCtrl is not registered in this build")
    from attnedit.methods.masactrl import consistent

    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"prompts": ["a cat", "a cat jumping", "a cat sitting"], "together": true, "seeds": [3, 4], "steps": 2,'
        ' "controls": [{"name": "masactrl"}]}\n'
        '{"prompts": ["a dog", "a dog running"], "seeds": 2, "steps": 2, "controls": [{"name": "masactrl"}]}\n'
        '{"prompt": "a cow", "together": true}\n'
    )
    result = batch.plan(path, pipe, model="tiny-sd")
    problems = [(p.line, p.message) for p in result.problems]
    assert problems[1] == (3, "together needs at least two prompts (the first is the source of the others)")
    assert problems[0][0] == 2 and "MasaCtrl has nothing to copy from" in problems[0][1]
    assert "together: true" in problems[0][1]
    batches = batch.make_batches(result.units, batch_size=8)
    assert [[(u.prompt, u.seed, u.role) for u in b] for b in batches] == [
        [("a cat", 3, "source"), ("a cat jumping", 3, "target"), ("a cat sitting", 3, "target")],
        [("a cat", 4, "source"), ("a cat jumping", 4, "target"), ("a cat sitting", 4, "target")]]
    path.write_text(path.read_text().splitlines()[0] + "\n")
    out = tmp_path / "out"
    summary = batch.run_batch(path, out, model="tiny-sd", pipe=pipe, batch_size=8, progress=False)
    assert summary.done == 6 and summary.failed == []
    expected = consistent(pipe, "a cat", ["a cat jumping", "a cat sitting"], seed=4, steps=2).images
    for u, image in zip(batches[1], expected):
        assert np.array_equal(np.asarray(Image.open(out / f"{u.stem}.png")), np.asarray(image))
        assert json.loads((out / f"{u.stem}.json").read_text())["group"]["role"] == u.role



def _photo(path: Path, colour: str = "red", size: tuple[int, int] = (64, 64)) -> Path:
    from PIL import ImageDraw

    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).ellipse((8, 16, 40, 48), fill=colour)
    im.save(path)
    return path


def test_edit_and_ir_diffusion_jobs_read_their_files_and_replay_the_python_api(tmp_path, pipe):
    """An `image` job is `EditPipeline.edit` (MasaCtrl with a mask PNG here), a `references` job is
    `ir_diffusion` with real reference photos; files are read relative to the job file."""
    if "masactrl" not in CONTROLS or "reposition" not in CONTROLS:
        pytest.skip("MasaCtrl or IR-Diffusion is not registered in this build")
    from attnedit.methods.ir_diffusion import ir_diffusion
    from attnedit.methods.masactrl import MasaCtrl

    folder = tmp_path / "jobs"
    (folder / "in").mkdir(parents=True)
    _photo(folder / "in" / "photo.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask, "L").save(folder / "in" / "mask.png")
    _photo(folder / "in" / "ref0.png", "red")
    _photo(folder / "in" / "ref1.png", "blue")
    path = folder / "jobs.yaml"
    path.write_text("""\
defaults: {steps: 2, seeds: 3}
jobs:
  - image: in/photo.png
    source_prompt: a red circle
    prompt: a blue circle
    controls: [{name: masactrl, start_step: 0, masks: [in/mask.png, in/mask.png]}]
  - prompt: a red circle and a blue square
    seeds: [1]
    size: 64
    references:
      prompts: [a red circle, a blue square]
      subjects: [circle, square]
      boxes: [[0, 0.2, 0.5, 0.8], [0.5, 0.2, 1, 0.8]]
      images: [in/ref0.png, in/ref1.png]
      options: {reposition: false}
""")
    result = batch.plan(path, pipe, model="tiny-sd")
    assert result.problems == []
    assert [(u.prompt, u.seed, u.role) for u in result.units] == [
        ("a red circle", 0, "source"), ("a blue circle", 0, "target"),
        ("a red circle", 1, "source"), ("a blue square", 1, "source"), ("a red circle and a blue square", 1, "target")]
    assert [len(b) for b in batch.make_batches(result.units, 8)] == [2, 3]
    out = tmp_path / "out"
    summary = batch.run_batch(path, out, model="tiny-sd", pipe=pipe, progress=False)
    assert summary.done == 5 and summary.ok
    made = [np.asarray(Image.open(out / f"{u.stem}.png")) for u in result.units]
    m = folder / "in" / "mask.png"
    edit = pipe.edit(folder / "in" / "photo.png", "a red circle", "a blue circle", steps=2,
                     control=MasaCtrl(start_step=0, masks=[Image.open(m), Image.open(m)]))
    scene = ir_diffusion(pipe, ["a red circle", "a blue square"], "a red circle and a blue square",
                         ["circle", "square"], target_boxes=[[0, 0.2, 0.5, 0.8], [0.5, 0.2, 1, 0.8]], seed=1, steps=2,
                         height=64, width=64, reference_images=[Image.open(folder / "in" / f"ref{i}.png")
                                                                for i in range(2)],
                         control_options={"reposition": False})
    for got, want in zip(made, [*edit.images, *scene.images]):
        assert np.array_equal(got, np.asarray(want))
    side = json.loads((out / f"{result.units[1].stem}.json").read_text())
    assert side["inputs"]["image"] == "in/photo.png"
    assert set(side["inputs"]["files"]) == {"in/photo.png", "in/mask.png"}
    # the moved folder gives the same keys (names are relative, keys hold contents); an edited file does not
    shutil.copytree(folder, tmp_path / "moved")
    moved = batch.plan(tmp_path / "moved" / "jobs.yaml", pipe, model="tiny-sd").units
    assert [u.key for u in moved] == [u.key for u in result.units]
    _photo(tmp_path / "moved" / "in" / "photo.png", "green")
    moved = batch.plan(tmp_path / "moved" / "jobs.yaml", pipe, model="tiny-sd").units
    assert moved[0].key != result.units[0].key and moved[2].key == result.units[2].key


def test_file_jobs_are_checked_up_front_with_the_problem_named(tmp_path, pipe):
    if "masactrl" not in CONTROLS or "reposition" not in CONTROLS:
        pytest.skip("MasaCtrl or IR-Diffusion is not registered in this build")
    _photo(tmp_path / "photo.png")
    _photo(tmp_path / "big.png", size=(96, 96))
    Image.new("L", (32, 64)).save(tmp_path / "small-mask.png")
    (tmp_path / "junk.png").write_text("not an image")
    refs = '"references": {"prompts": ["a red circle", "a blue square"], "subjects": ["circle", "square"]'
    lines = [
        '{"image": "nothing.png", "source_prompt": "a cat", "prompt": "a dog"}',
        '{"image": "junk.png", "source_prompt": "a cat", "prompt": "a dog"}',
        '{"image": "photo.png", "source_prompt": "a cat", "prompt": "a dog", "seeds": [1]}',
        '{"image": "photo.png", "source_prompt": "a cat", "prompt": "a dog", '
        '"controls": [{"name": "masactrl", "masks": ["small-mask.png", "small-mask.png"]}]}',
        '{"image": "photo.png", "source_prompt": "a cat", "prompt": "a dog", '
        '"controls": [{"name": "masactrl", "masks": ["photo.png", "gone.png"]}]}',
        '{"source_prompt": "a cat", "prompt": "a dog"}',
        '{"prompt": "a red circle and a blue square", ' + refs + ', "images": ["photo.png", "big.png"]}}',
        '{"prompt": "a red circle and a blue square", ' + refs + ', "boxez": []}}',
        '{"prompt": "a red circle and a zebra", ' + refs + '}}',
        '{"prompt": "a red circle and a blue square", ' + refs + ', "options": {"target_boxes": []}}}',
        '{"prompt": "a cat", "concepts": "c.safetensors"}',
        '{"image": "photo.png", "source_prompt": "", "prompt": "a dog", "steps": 2}',
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    problems = {p.line: p.message for p in batch.plan(path, pipe, model="tiny-sd").problems}
    assert problems[1].startswith("image 'nothing.png' does not exist (looked for ")
    assert problems[2].startswith("image 'junk.png' is not an image the batch can read")
    assert problems[3] == "an edit job takes its size and noise from its image: drop 'seeds'"
    assert problems[4] == ("MasaCtrl mask 0 has size (64, 32) but the image is 64x64 (H x W); "
                           "give masks at the image resolution")
    assert problems[5].startswith("controls[0] (masactrl) masks[1] 'gone.png' does not exist")
    assert problems[6].startswith("source_prompt describes the photo of a real-image edit")
    assert problems[7] == ("references.images[1] 'big.png' is 96x96 (W x H) but the scene is 64x64: "
                           "give photos of the scene's size")
    assert problems[8].startswith("unknown key 'boxez' in references (did you mean 'boxes'?)")
    assert problems[9].startswith("word 'square' is not in the prompt")
    assert problems[10].startswith("references.options: 'target_boxes' is set from references")
    assert problems[11].startswith("unknown key 'concepts' (concepts are loaded with the model, once per run")
    assert 12 not in problems and len(problems) == 11
    path.write_text('{"defaults": {"concepts": "missing"}}\n{"prompt": "a cat"}\n')
    with pytest.raises(ValueError, match="defaults.concepts 'missing' does not exist"):
        batch.run_batch(path, tmp_path / "out", model="tiny-sd", progress=False)


# ------------------------------------------------------------------------------------ failures
def test_failing_control_and_bad_lines_are_isolated(tmp_path, pipe, capsys):
    path = tmp_path / "jobs.jsonl"
    path.write_text(
        '{"defaults": {"steps": 2}}\n'
        '{"prompt": "a cat", "seeds": [0, 1]}\n'
        '{"prompt": "a dog", "seeds": [0, 1], "controls": [{"name": "test_exploding"}]}\n'
        '{"prompt": "a dog" "seeds": 3}\n'
        '{"prompt": "a bird", "seeds": [0, 1]}\n'
    )
    out = tmp_path / "out"
    summary = batch.run_batch(path, out, model="tiny-sd", pipe=pipe, batch_size=4, progress=False)
    assert summary.done == 4 and not summary.ok
    assert [(f[0], f[2]) for f in summary.failed] == [(3, "RuntimeError: boom at step 0")] * 2
    assert [(p.line, p.message.split(" (")[0]) for p in summary.invalid] == [(4, "not valid JSON")]
    assert f"{path}:4: not valid JSON" in capsys.readouterr().err
    rows = [json.loads(r) for r in (out / batch.MANIFEST).read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a cat", 0), ("a cat", 1), ("a bird", 0), ("a bird", 1)]
    assert getattr(pipe.pipe, "_attnedit_controller", None) is None  # left clean after the failure
    batch.print_summary(summary, str(path))
    text = capsys.readouterr().out
    assert "4 done, 0 skipped (already complete), 2 failed, 1 invalid" in text
    assert f"failed {path}:3 a-dog-s0-" in text and "boom at step 0" in text

    # --strict stops before generating anything when a line is bad
    strict_out = tmp_path / "strict"
    summary = batch.run_batch(path, strict_out, model="tiny-sd", pipe=pipe, strict=True, progress=False)
    assert summary.invalid and summary.done == 0 and not strict_out.exists()


def test_cli_exit_codes_and_summary(tmp_path, capsys):
    from attnedit.cli import main

    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "a cat", "seeds": 2, "steps": 2}\n{"prompt": "a dog", "stepz": 2}\n')
    run = lambda out, *flags: main(["batch", str(path), "--out", str(tmp_path / out), "--no-progress",  # noqa: E731
                                    "--model", "tiny-sd", *flags])
    assert run("strict", "--strict") == 2
    assert not (tmp_path / "strict").exists()
    assert run("out") == 1  # a bad line
    captured = capsys.readouterr()
    assert f"{path}:2: unknown key 'stepz' (did you mean 'steps'?)" in captured.err
    assert "attnedit batch: 2 done, 0 skipped (already complete), 0 failed, 1 invalid job line(s)" in captured.out
    path.write_text('{"prompt": "a cat", "seeds": 2, "steps": 2}\n')
    assert run("out") == 0
    assert "0 done, 2 skipped (already complete), 0 failed, 0 invalid" in capsys.readouterr().out


def test_manifest_lines_of_concurrent_writers_stay_whole(tmp_path):
    """Appends from several processes under the lock never interleave within a line."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_rows, args=(tmp_path, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    rows = [json.loads(r) for r in (tmp_path / batch.MANIFEST).read_text().splitlines()]
    assert sorted((r["w"], r["i"]) for r in rows) == sorted((w, i) for w in range(3) for i in range(300))


def _append_rows(out: Path, worker: int) -> None:
    for i in range(300):
        batch.append_manifest(out, {"w": worker, "i": i, "pad": "x" * 20000})
