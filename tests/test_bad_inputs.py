"""Bad input, table-driven, on every way in (API, CLI, batch files, app): a clear early error or nothing.

Each case asserts the exception (or the CLI's exit status 2 and stderr), that the message names the
parameter, and that no model ran: every tiny pipeline used here has tripwires on its denoiser and
its VAE that fail the test if they are called. Cases count by outcome in `test_case_count`.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import attnedit
from attnedit import batch, validate
from attnedit.cli import main as cli

NAN, INF = float("nan"), float("inf")


class ModelCalled(AssertionError):
    pass


def _tripwire(*_a, **_k):
    raise ModelCalled("a model ran before the bad input was refused")


@pytest.fixture(scope="module")
def sd():
    """tiny-sd with tripwires on its denoiser and VAE (any bad input must be refused before them)."""
    ep = attnedit.load("tiny-sd")
    ep.denoiser.register_forward_pre_hook(_tripwire)
    ep.pipe.vae.register_forward_pre_hook(_tripwire)
    ep.pipe.vae.encode = _tripwire
    return ep


@pytest.fixture(scope="module")
def app_module():
    pytest.importorskip("gradio")
    from attnedit.app_cli import load_app_module

    return load_app_module()


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable  # (fixtures) -> None; must raise
    names: str  # a regex the message must contain: the parameter (and, where useful, the value)
    exc: type[BaseException] = ValueError


def _image(tmp: Path) -> Path:
    from PIL import Image

    path = tmp / "photo.png"
    Image.new("RGB", (64, 64), "white").save(path)
    return path


def _huge_png(tmp: Path) -> Path:
    """A valid 1x1 PNG whose header claims 20000 x 20000 pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    path = tmp / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x00"))
                     + chunk(b"IEND", b""))
    return path


def gen(**kw):
    """generate on the tripwired tiny-sd (2 steps unless the case sets them)."""
    return lambda f: f["sd"].generate(kw.pop("prompt", "a red cube"), **{"steps": 2, **kw})


API = [
    Case("guidance-inf", gen(guidance=INF), "guidance.*got inf"),
    Case("guidance-1e30", gen(guidance=1e30), "guidance.*from 0 to 100"),
    Case("guidance-nan", gen(guidance=NAN), "guidance.*got nan"),
    Case("guidance-negative", gen(guidance=-5), "guidance.*got -5"),
    Case("guidance-string", gen(guidance="7"), "guidance.*'7'"),
    Case("guidance-bool", gen(guidance=True), "guidance.*True"),
    Case("seed-2**32", gen(seed=2**32), "seed.*4294967296"),
    Case("seed-2**63", gen(seed=2**63), "seed.*from 0 to 4294967295"),
    Case("seed-negative", gen(seed=-1), "seed.*-1"),
    Case("seed-bool", gen(seed=True), "seed.*True"),
    Case("seed-float", gen(seed=1.5), "seed.*1.5"),
    Case("seed-2**64", gen(seed=2**64), "seed.*18446744073709551616"),
    Case("seed-string", gen(seed="abc"), "seed.*'abc'"),
    Case("seeds-count", gen(seed=[0, 1]), "seed.*one seed per image"),
    Case("seeds-range", gen(seed=[2**40]), r"seed\[0\].*1099511627776"),
    Case("seed-overflows-for-images", gen(seed=2**32 - 1, num_images=2), "seed.*for 2 images"),
    Case("height-zero", gen(height=0), "height.*got 0"),
    Case("height-float", gen(height=64.5), "height.*64.5"),
    Case("height-stride", gen(height=60), "height.*multiple of 8.*got 60"),
    Case("height-huge", gen(height=65536), "height.*8192.*65536"),
    Case("width-string", gen(width="abc"), "width.*'abc'"),
    Case("height-nan", gen(height=NAN), "height.*nan"),
    Case("steps-float", gen(steps=2.7), "steps.*2.7"),
    Case("steps-string", gen(steps="3"), "steps.*'3'"),
    Case("steps-zero", gen(steps=0), "steps.*got 0"),
    Case("steps-huge", gen(steps=10**6), "steps.*1000"),
    Case("num-images-zero", gen(num_images=0), "num_images.*got 0"),
    Case("num-images-float", gen(num_images=1.0), "num_images.*1.0"),
    Case("unknown-kwarg", gen(bogus_kwarg=1), "unknown keyword argument 'bogus_kwarg'.*accepts"),
    Case("output-type", gen(output_type="np"), "sets output_type itself"),
    Case("num-inference-steps", gen(num_inference_steps=3), "num_inference_steps.*pass steps= instead"),
    Case("prompt-none", gen(prompt=None), "prompt.*None"),
    Case("prompt-empty-list", gen(prompt=[]), r"prompt.*\[\]"),
    Case("prompt-int", gen(prompt=5), "prompt.*got 5"),
    Case("negative-int", gen(negative_prompt=5), "negative_prompt.*got 5"),
    Case("negative-count", gen(negative_prompt=["a", "b"]), "negative_prompt.*one per prompt"),
    Case("latents-nan", lambda f: f["sd"].generate("a", steps=2, latents=torch.full((1, 4, 8, 8), NAN)),
         "latents.*NaN"),
    Case("latents-shape", lambda f: f["sd"].generate("a", steps=2, latents=torch.zeros(1, 4, 9, 8)),
         r"latents.*\(1, 4, 9, 8\)"),
    Case("latents-list", gen(latents=[0.0]), "latents.*a torch.Tensor"),
    Case("controls-int", gen(controls=[5]), "controls.*got 5"),
    Case("controls-unknown-name", gen(controls=["tood"]), "unknown control 'tood'"),
    Case("pipe-kwarg-nan", gen(eta=NAN), "eta.*nan"),
    Case("guidance-rescale-inf", gen(guidance_rescale=INF), "guidance_rescale.*inf"),
    # edit / invert
    Case("edit-not-an-image", lambda f: f["sd"].edit("/etc/passwd", "a", "b", steps=2), "image.*/etc/passwd"),
    Case("edit-missing-file", lambda f: f["sd"].edit("/nope.png", "a", "b", steps=2), "image.*/nope.png"),
    Case("edit-nan-array", lambda f: f["sd"].edit(np.full((64, 64, 3), NAN), "a", "b", steps=2), "image.*NaN"),
    Case("invert-nan-tensor", lambda f: f["sd"].invert(torch.full((3, 64, 64), NAN), steps=2), "image.*NaN"),
    Case("edit-bogus", lambda f: f["sd"].edit(_image(f["tmp"]), "a", "b", steps=2, bogus=1), "'bogus'"),
    Case("edit-seed", lambda f: f["sd"].edit(_image(f["tmp"]), "a", "b", steps=2, seed=3), "seed"),
    Case("edit-no-target", lambda f: f["sd"].edit(_image(f["tmp"]), "a", [], steps=2), "target_prompt"),
    Case("edit-steps-string", lambda f: f["sd"].edit(_image(f["tmp"]), "a", "b", steps="5"), "steps.*'5'"),
    Case("invert-steps-zero", lambda f: f["sd"].invert(_image(f["tmp"]), steps=0), "steps.*got 0"),
    Case("invert-bogus", lambda f: f["sd"].invert(_image(f["tmp"]), steps=2, bogus=1), "'bogus'"),
    Case("invert-fit", lambda f: f["sd"].invert(_image(f["tmp"]), steps=2, fit="crop"), "fit.*'crop'"),
    # load
    Case("load-device", lambda f: attnedit.load("tiny-sd", device="tpu"), "device.*'tpu'"),
    Case("load-dtype", lambda f: attnedit.load("tiny-sd", dtype="float8"), "dtype.*'float8'"),
    Case("load-dtype-int", lambda f: attnedit.load("tiny-sd", dtype=torch.int8), "dtype.*int8"),
    Case("load-option", lambda f: attnedit.load("tiny-sd", sheduler=1), "'sheduler'"),
    Case("load-object", lambda f: attnedit.load(42), "model.*int"),
    Case("load-bad-index", lambda f: attnedit.load(_bad_index(f["tmp"])), r"model_index.json is not valid JSON"),
    # controls and their options
    Case("layers-key", lambda f: attnedit.make_control("store", {"layers": {"knd": "self"}}), "'knd'.*valid keys"),
    Case("todo-factor-huge", lambda f: attnedit.ToDo(factor=10**6), "factor.*1000000"),
    Case("todo-factor-string", lambda f: attnedit.make_control("todo", {"factor": "2"}), "factor.*'2'"),
    Case("agent-ratio-bool", lambda f: attnedit.make_control("agent", {"ratio": True}), "ratio.*True"),
    Case("agent-ratio-nan", lambda f: attnedit.make_control("agent", {"ratio": NAN}), "ratio.*nan"),
    Case("store-rows", lambda f: attnedit.AttentionStore(rows="x"), "rows.*'x'"),
    Case("steps-window", lambda f: attnedit.Steps(5, 2), r"Steps\(5, 2\)"),
    Case("select-kind", lambda f: attnedit.Select(kind="slf"), "layer kind 'slf'"),
    Case("masactrl-nan-mask", lambda f: f["sd"].generate(["a", "b"], steps=2, controls=[
        attnedit.MasaCtrl(masks=[np.full((64, 64), NAN), np.ones((64, 64))])]), "mask.*NaN"),
    Case("bounded-same-boxes", lambda f: attnedit.BoundedAttention(
        boxes=[[0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]], words=["cat", "dog"]), "same box"),
    Case("bounded-tiny-box", lambda f: f["sd"].generate("a cat and a dog", steps=2, controls=[
        attnedit.BoundedAttention(boxes=[[0, 0, 0.05, 0.5], [0.5, 0, 1, 1]], words=["cat", "dog"])]),
        "box 0.*smaller than one latent cell"),
    Case("bounded-nan-box", lambda f: attnedit.BoundedAttention(boxes=[[0, 0, NAN, 1]], words=["cat"]), "box 0"),
    Case("isolation-nan-mask", lambda f: f["sd"].generate("a", steps=2, controls=[
        attnedit.IsolationAttention(masks=[np.full((64, 64), NAN)])]), "mask.*NaN"),
    Case("ir-options", lambda f: __import__("attnedit.methods.ir_diffusion", fromlist=["x"]).ir_diffusion(
        f["sd"], ["a cat"], "a cat", ["cat"], target_boxes=[[0, 0, 1, 1]], control_options={"bogus": 1}),
        "unknown option 'bogus' for control 'reposition'; valid options"),
    Case("masactrl-alone", gen(controls=[attnedit.MasaCtrl()]), "MasaCtrl has nothing to copy from"),
    Case("store-no-layer", gen(controls=[attnedit.AttentionStore(layers=attnedit.Select(min_index=10**9))]),
         "selects no attention layer"),
]


def _bad_index(tmp: Path) -> Path:
    folder = tmp / "broken-model"
    folder.mkdir(exist_ok=True)
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline",')
    return folder


def run_cli(*args: str):
    return lambda f: cli(list(args))


CLI = [
    Case("cli-guidance-nan", run_cli("generate", "a", "--model", "tiny-sd", "--guidance", "nan"), "guidance.*nan"),
    Case("cli-seed-range", run_cli("generate", "a", "--model", "tiny-sd", "--seed", "4294967296"), "seed"),
    Case("cli-seed-images", run_cli("generate", "a", "--model", "tiny-sd", "--seed", "4294967295",
                                    "--num-images", "2"), "seed.*for 2 images"),
    Case("cli-height-stride", run_cli("generate", "a", "--model", "tiny-sd", "--height", "60"), "height.*8"),
    Case("cli-height-huge", run_cli("generate", "a", "--model", "tiny-sd", "--height", "65536"), "height.*8192"),
    Case("cli-steps-zero", run_cli("generate", "a", "--model", "tiny-sd", "--steps", "0"), "steps.*0"),
    Case("cli-num-images", run_cli("generate", "a", "--model", "tiny-sd", "--num-images", "0"), "num_images"),
    Case("cli-out-empty", run_cli("generate", "a", "--model", "tiny-sd", "--out", ""), "--out"),
    Case("cli-out-proc", run_cli("generate", "a", "--model", "tiny-sd", "--out", "/proc/x.png"), "--out.*/proc"),
    Case("cli-out-jpg", run_cli("generate", "a", "--model", "tiny-sd", "--out", "x.jpg"), r"--out.*\.png"),
    Case("cli-out-folder", run_cli("generate", "a", "--model", "tiny-sd", "--out", "/tmp/"), "--out.*folder"),
    Case("cli-maps-noext", run_cli("maps", "a cube", "--model", "tiny-sd", "--out", "noext"), r"--out.*\.png"),
    Case("cli-device", run_cli("generate", "a", "--model", "tiny-sd", "--device", "tpu"), "device.*'tpu'"),
    Case("cli-dtype", run_cli("generate", "a", "--model", "tiny-sd", "--dtype", "float8"), "dtype.*float8"),
    Case("cli-info-stride", run_cli("info", "--model", "tiny-flux", "--height", "60"), "height.*16.*60"),
    Case("cli-app-port", run_cli("app", "--port", "99999"), "port.*99999"),
    Case("cli-control-option", run_cli("generate", "a cube", "--model", "tiny-sd", "--control", "todo:factor=abc"),
         "factor.*'abc'"),
]


def app_call(fn_name: str, *args):
    return lambda f: getattr(f["app"], fn_name)(*args)


APP = [
    Case("app-seed-fraction", lambda f: f["app_module"].Settings.parse(2.5, 2, 5.0, 64, 64), "seed.*2.5"),
    Case("app-steps-over", lambda f: f["app_module"].Settings.parse(0, 1000, 5.0, 64, 64), "steps.*1000"),
    Case("app-guidance-nan", lambda f: f["app_module"].Settings.parse(0, 2, NAN, 64, 64), "guidance.*nan"),
    Case("app-height-string", lambda f: f["app_module"].Settings.parse(0, 2, 5.0, "abc", 64), "height.*'abc'"),
    Case("app-upload-not-image", lambda f: f["app_module"].load_upload("/etc/passwd", "the image to edit"),
         "the image to edit is not an image"),
    Case("app-upload-huge", lambda f: f["app_module"].load_upload(_huge_png(f["tmp"]), "the image to edit"),
         "too many pixels.*up to 16 megapixels"),
]


def _job(tmp: Path, text: str, suffix: str = ".jsonl") -> Path:
    path = tmp / f"jobs{suffix}"
    path.write_text(text)
    return path


def plan_problem(text: str, suffix: str = ".jsonl"):
    """The job file's first problem, raised as a ValueError (what `attnedit batch --validate` prints)."""
    def call(f):
        result = batch.plan(_job(f["tmp"], text, suffix), f["sd"], model="tiny-sd")
        assert result.problems and not result.units, [str(p) for p in result.problems]
        assert all(len(p.message) <= 1000 for p in result.problems), "a problem message must stay short"
        raise ValueError(result.problems[0].message)

    return call


BATCH = [
    Case("batch-guidance-infinity", plan_problem('{"prompt": "a", "guidance": Infinity}'), "guidance.*inf"),
    Case("batch-guidance-nan", plan_problem('{"prompt": "a", "guidance": NaN}'), "guidance.*nan"),
    Case("batch-seeds-alias", plan_problem('{"prompt": "a", "seeds": [0, 4294967296]}'), "seed.*4294967296"),
    Case("batch-seeds-2**70", plan_problem('{"prompt": "a", "seeds": [1180591620717411303424]}'), "seed"),
    Case("batch-seed-bool", plan_problem('{"prompt": "a", "seed": true}'), "seed.*True"),
    Case("batch-size-huge", plan_problem('{"prompt": "a", "size": 65536}'), "8192"),
    Case("batch-height-float", plan_problem('{"prompt": "a", "height": 64.5}'), "height.*64.5"),
    Case("batch-steps-string", plan_problem('{"prompt": "a", "steps": "3"}'), "steps.*'3'"),
    Case("batch-duplicate-key", plan_problem('{"prompt": "a", "steps": 2, "steps": 3}'), "steps"),
    Case("batch-control-option", plan_problem('{"prompt": "a", "controls": [{"name": "todo", "factor": "2"}]}'),
         "factor.*'2'"),
    Case("batch-yaml-alias", plan_problem("- &a {prompt: a}\n- *a\n", ".yaml"), "alias"),
]

CASES = [("api", c) for c in API] + [("cli", c) for c in CLI] + [("app", c) for c in APP] + \
    [("batch", c) for c in BATCH]


@pytest.mark.parametrize(("way", "case"), CASES, ids=[f"{w}-{c.id}" for w, c in CASES])
def test_bad_input_is_refused_early_with_a_message_naming_it(way, case, sd, tmp_path, capsys, request, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a CLI case that was wrongly accepted writes nowhere else
    fixtures = {"sd": sd, "tmp": tmp_path}
    if way == "app":
        fixtures["app_module"] = request.getfixturevalue("app_module")
    if way == "cli":
        import attnedit.pipeline as pipeline

        real = pipeline.load

        def tripwired(*a, **kw):  # the CLI loads its own model: give it the tripwires too
            ep = real(*a, **kw)
            ep.denoiser.register_forward_pre_hook(_tripwire)
            return ep

        monkeypatch.setattr(pipeline, "load", tripwired)
        assert case.call(fixtures) == 2, "the command line must exit with status 2"
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert __import__("re").search(case.names, err), err
        assert not any(tmp_path.rglob("*.png")), "nothing may be written"
        return
    with pytest.raises(case.exc, match=case.names) as info:
        case.call(fixtures)
    assert not isinstance(info.value, ModelCalled)
    assert len(str(info.value)) <= 1000


def test_case_count():
    """At least 80 bad inputs across the four ways in; every one is a clear early error."""
    counts = {w: sum(1 for way, _ in CASES if way == w) for w in ("api", "cli", "app", "batch")}
    assert sum(counts.values()) >= 80 and all(counts.values()), counts


def test_validation_messages_are_short_for_huge_values():
    huge = list(range(100_000))
    with pytest.raises(validate.InputError) as info:
        validate.steps(huge)
    assert len(str(info.value)) < 200 and "..." in str(info.value)


def test_accepted_edges_still_work(sd):
    """The edges of the documented ranges are valid (and the tripwires prove these do run)."""
    with pytest.raises(ModelCalled):
        sd.generate("a red cube", steps=1, seed=2**32 - 1, guidance=0.0)
    assert json.loads(json.dumps(validate.seeds([0, 2**32 - 1], 2))) == [0, 4294967295]
