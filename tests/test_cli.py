"""The command line: generate, maps, info, and errors that name the problem."""

from __future__ import annotations

import json

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
