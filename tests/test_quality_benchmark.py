"""The testbed quality benchmark runs end to end on its quick prompt set (one prompt, one seed per set)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_quick_run_writes_every_section(tmp_path):
    quality = _load("quality")
    out = tmp_path / "quality"
    assert quality.main(["--model", "shapes-sd", "--quick", "--steps", "10", "--out", str(out)]) == 0
    text = out.with_suffix(".md").read_text()
    for section in ("plain", "multi", "masactrl", "fast"):
        assert f"## {section}" in text and "skipped" not in text.split(f"## {section}")[1].split("##")[0]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["plain"]["single object"]["n"] == 1
    assert 0.0 <= results["plain"]["single object"]["all_present"] <= 1.0
    # every multi-subject method produced a row for the one request
    assert {"plain", "A&E", "A-STAR", "Bounded"} <= set(results["multi"])
    assert 0.0 <= results["masactrl"]["round_trip"]["objects_read_back"] <= 1.0  # the detector read the round trip
    assert out.with_suffix(".png").stat().st_size > 0


def test_multisubject_controls_take_sweep_options_and_refuse_bad_ones():
    import pytest

    qm = _load("quality_multisubject")
    objects = [("circle", "red"), ("square", "blue")]
    ae = qm.make_control("A&E", objects, {"scale_factor": 5, "token_mode": "subjects"})
    assert ae.scale_factor == 5.0 and ae.token_mode == "subjects" and ae.words == ["circle", "square"]
    assert qm.make_control("A-STAR", objects, None, "phrase").words == ["red circle", "blue square"]
    assert qm.make_control("plain", objects) is None
    with pytest.raises(ValueError, match="plain takes no control arguments"):
        qm.make_control("plain", objects, {"scale_factor": 5})
    with pytest.raises(TypeError, match="scale_fac"):
        qm.make_control("A&E", objects, {"scale_fac": 5})
    with pytest.raises(ValueError, match="subjects must be one of"):
        qm.make_control("A&E", objects, None, "noun")
