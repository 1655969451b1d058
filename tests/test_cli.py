"""The command line: generate, maps, info, and errors that name the problem."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from attnedit.cli import main


def test_generate_writes_png_and_sidecar(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a red cube", "--model", "tiny-sd", "--steps", "2", "--seed", "7", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["seed"] == 7 and side["steps"] == 2 and side["prompt"] == "a red cube"
    assert side["versions"]["attnedit"] and side["model"] == "tiny-sd"
    assert not list(tmp_path.glob(".*tmp")), "temporary files must be renamed away"


def test_generate_with_control_option_string(tmp_path):
    out = tmp_path / "img.png"
    code = main(["generate", "a red cube", "--model", "tiny-sd", "--steps", "1", "--out", str(out),
                 "--control", 'store:{"words": ["cube"]}'])
    assert code == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["controls"][0]["name"] == "store" and side["controls"][0]["words"] == ["cube"]


def test_maps_writes_grid(tmp_path):
    out = tmp_path / "maps.png"
    args = ["maps", "a red cube", "--model", "tiny-sd", "--steps", "2", "--out", str(out), "--words", "red,cube"]
    assert main(args) == 0
    grid = Image.open(tmp_path / "maps.maps.png")
    assert grid.width == 3 * 192  # image + two words
    assert Image.open(out).size == (64, 64)  # --out is the image, its sidecar beside it
    assert json.loads((tmp_path / "maps.json").read_text())["prompt"] == "a red cube"


def test_info_lists_layers_with_grids(capsys):
    assert main(["info", "--model", "tiny-sdxl", "--height", "64", "--width", "96", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "sdxl" and len(data["layers"]) == 16
    assert {tuple(r["grid"]) for r in data["layers"]} == {(4, 6)}


def test_errors_are_readable(tmp_path, capsys):
    code = main(["generate", "a cube", "--model", "tiny-sd", "--out", str(tmp_path / "x.png"),
                 "--control", "store:wrds=1"])
    assert code == 2
    assert "unknown option 'wrds' for control 'store'" in capsys.readouterr().err
    assert main(["maps", "a cube", "--model", "tiny-sd", "--words", "zebra", "--out", str(tmp_path / "m.png")]) == 2
    assert "word 'zebra' is not in the prompt; its words are: a, cube" in capsys.readouterr().err
    assert main(["info", "--model", "nowhere"]) == 2
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "m.png").exists()
    assert not list(tmp_path.iterdir()), "nothing is written when a run is refused"


def test_help_imports_neither_torch_nor_diffusers():
    """`attnedit --help` and `attnedit <cmd> --help` answer at once (benchmarks/cli_speed.py times them)."""
    import subprocess
    import sys

    for argv in (["--help"], ["generate", "--help"], ["maps", "--help"], ["info", "--help"], ["batch", "--help"],
                 ["app", "--help"], ["testbed", "train", "--help"], ["train", "attencraft", "--help"]):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "attnedit", *argv], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-500:]
        heavy = [line for line in res.stderr.splitlines() if line.rstrip().endswith(("| torch", "| diffusers"))]
        assert not heavy, f"attnedit {' '.join(argv)} imported {heavy}"


def test_generate_is_quiet_and_reports_times_on_request(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "attnedit", "generate", "a red cube", "--model", "tiny-sd", "--steps",
                          "2", "--out", str(tmp_path / "a.png"), "--verbose"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("loaded tiny-sd (") and lines[1].startswith("generated 1 image(s)")
    assert "1 CPU thread(s)" in lines[0]  # a small model on the CPU: one thread


def test_apply_takes_names_and_the_controller_reaches_controls_by_name():
    import attnedit

    ep = attnedit.load("tiny-sd")
    ctrl = attnedit.apply(ep, "todo:factor=2", "store")  # an EditPipeline or its .pipe
    try:
        ep.pipe("a red cube", num_inference_steps=2, height=64, width=64)
        assert ctrl.todo.factor == 2 and ctrl.store.word_map("cube").shape == (8, 8)
    finally:
        attnedit.remove(ep)
    assert not hasattr(ep.pipe, "_attnedit_controller")
    wrapped = attnedit.load(ep.pipe)  # an existing pipeline object is wrapped as it is
    assert wrapped.pipe is ep.pipe and wrapped.family.name == "sd"
    assert callable(attnedit.consistent) and callable(attnedit.edit) and callable(attnedit.visualize.map_grid)


def test_map_grid_rows_are_filled_evenly_and_labels_sit_under_the_tiles():
    import torch

    from attnedit.visualize import map_grid

    for n, cols in ((3, 3), (6, 6), (7, 4), (12, 6), (13, 5)):
        grid = map_grid({f"w{i}": torch.rand(4, 4) for i in range(n - 1)}, Image.new("RGB", (8, 8)), tile=64)
        assert grid.width == cols * 64, (n, grid.width)
        top = np.asarray(grid)[0:3, 2:30]  # the first tile's top-left corner is picture, not a label
        assert not (top == 255).all()
