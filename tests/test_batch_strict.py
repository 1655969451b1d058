"""`attnedit batch` with hostile inputs (issue 18) and the size rules (issue 19): every bad value refused at
planning by name with a short repr, YAML aliases and duplicate keys refused, unreadable job files named,
damaged images redone on resume, one run per output folder, SIGTERM / SIGINT ending cleanly and non-zero."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

import attnedit
from attnedit import batch
from attnedit.cli import main
from attnedit.controls import Control, register

ROOT = Path(__file__).resolve().parent.parent


@register
class Signalling(Control):
    """Sends its own process a signal at step 1 (once per test), as `kill` would from outside."""

    name = "test_signal"
    fired: ClassVar[list[int]] = []

    def __init__(self, *, signum: int = int(signal.SIGTERM), **kw) -> None:
        super().__init__(**kw)
        self.signum = signum

    def begin_step(self, run, step: int) -> None:
        if step != 1 or Signalling.fired:
            return
        if signal.getsignal(self.signum) in (signal.SIG_DFL, signal.default_int_handler, None):
            raise RuntimeError("the batch installed no handler for this signal")  # never kill the test process
        Signalling.fired.append(self.signum)
        os.kill(os.getpid(), self.signum)


@pytest.fixture(scope="module")
def pipe():
    return attnedit.load("tiny-sd")


@pytest.fixture
def loaded(pipe, monkeypatch):
    """The CLI gets the already loaded tiny pipeline instead of loading one."""
    monkeypatch.setattr("attnedit.pipeline.load", lambda *a, **k: pipe)
    return pipe


@pytest.fixture
def no_load(monkeypatch):
    """The CLI must refuse before it loads any model."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("attnedit.pipeline.load", refuse)


@contextlib.contextmanager
def no_model(pipe):
    """Fails the test when anything inside the block reaches the denoiser."""
    def refuse(*args):
        raise AssertionError("the denoiser was called")

    handle = pipe.denoiser.register_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()


def _jsonl(path: Path, *jobs: str) -> Path:
    path.write_text("".join(j + "\n" for j in jobs))
    return path


# ------------------------------------------------------------------------------- job values
BAD_VALUES = [  # (the job's extra JSON, the key the message names, the value as shown, what is valid)
    ('"steps": 2.7', "steps", "2.7", "an integer from 1 to 1000"),
    ('"steps": "3"', "steps", "'3'", "an integer from 1 to 1000"),
    ('"steps": 0', "steps", "0", "an integer from 1 to 1000"),
    ('"steps": true', "steps", "True", "an integer from 1 to 1000"),
    ('"guidance": NaN', "guidance", "nan", "a finite number from 0 to 100"),
    ('"guidance": Infinity', "guidance", "inf", "a finite number from 0 to 100"),
    ('"guidance": 1e30', "guidance", "1e+30", "a finite number from 0 to 100"),
    ('"guidance": -5', "guidance", "-5", "a finite number from 0 to 100"),
    ('"guidance": "7"', "guidance", "'7'", "a finite number from 0 to 100"),
    ('"seeds": [0, 1180591620717411303424]', "seeds[1]", "1180591620717411303424", "an integer from 0 to 4294967295"),
    ('"seeds": [-1]', "seeds[0]", "-1", "an integer from 0 to 4294967295"),
    ('"seeds": [true]', "seeds[0]", "True", "an integer from 0 to 4294967295"),
    ('"seeds": [1.5]', "seeds[0]", "1.5", "an integer from 0 to 4294967295"),
    ('"seeds": [0, 4294967296]', "seeds[1]", "4294967296", "an integer from 0 to 4294967295"),
    ('"seeds": [3, 3]', "seeds", "[3, 3]", "a list of distinct seeds"),
    ('"seeds": 1.5', "seeds", "1.5", "a count from 1 to 100000"),
    ('"seeds": 10000000', "seeds", "10000000", "a count from 1 to 100000"),
    ('"seed": 1180591620717411303424', "seed", "1180591620717411303424", "an integer from 0 to 4294967295"),
    ('"seed": -1', "seed", "-1", "an integer from 0 to 4294967295"),
    ('"seed": true', "seed", "True", "an integer from 0 to 4294967295"),
    ('"seed": 1.5', "seed", "1.5", "an integer from 0 to 4294967295"),
    ('"seed": "abc"', "seed", "'abc'", "an integer from 0 to 4294967295"),
    ('"seed": 4294967295, "seeds": 2', "seed", "4294967295", "at most 4294967294 for 2 seeds"),
    ('"size": 65536', "size", "65536", "an integer from 1 to 8192"),
    ('"size": 64.5', "size", "64.5", "an integer, [height, width] or 'HxW'"),
    ('"size": true', "size", "True", "an integer, [height, width] or 'HxW'"),
    ('"size": [64, 64.0]', "size[1] (width)", "64.0", "an integer from 1 to 8192"),
    ('"size": "0x64"', "size (height)", "0", "an integer from 1 to 8192"),
    ('"size": 60', "size", "60", "a multiple of 8 for this model"),
    ('"height": 60', "height", "60", "a multiple of 8 for this model"),
    ('"width": 65536', "width", "65536", "an integer from 1 to 8192"),
    ('"width": "64"', "width", "'64'", "an integer from 1 to 8192"),
    ('"negative_prompt": 5', "negative_prompt", "5", "a string"),
    ('"together": "yes"', "together", "'yes'", "true or false"),
    ('"maps": 3', "maps", "3", "true/false or a list of words"),
    ('"id": "' + "x" * 200 + '"', "id", "'xxxxxxxx", "1 to 80 letters, digits"),
]


def test_bad_job_values_are_refused_at_planning_by_name(tmp_path, pipe):
    """Each bad value: a problem on its line that names the key, shows the value short and says what is
    valid; no image of it planned and no model call."""
    path = _jsonl(tmp_path / "jobs.jsonl", *('{"prompt": "a cat", ' + extra + "}" for extra, *_ in BAD_VALUES))
    with no_model(pipe):
        result = batch.plan(path, pipe, model="tiny-sd")
    messages = {p.line: p.message for p in result.problems}
    assert result.units == [] and len(messages) == len(BAD_VALUES)
    for line, (extra, key, shown, valid) in enumerate(BAD_VALUES, start=1):
        message = messages[line]
        assert message.startswith(f"{key} must be "), (extra, message)
        assert f"got {shown}" in message and valid in message, (extra, message)
        assert len(message) < 200, message


def test_yaml_nan_and_inf_are_refused(tmp_path, pipe):
    path = tmp_path / "jobs.yaml"
    path.write_text("jobs:\n  - {prompt: a cat, guidance: .nan}\n  - {prompt: a cat, guidance: .inf}\n"
                    "  - {prompt: a cat, steps: 2.0}\n  - {prompt: a cat, seeds: [0, 4294967295], steps: 2}\n")
    result = batch.plan(path, pipe, model="tiny-sd")
    assert [(p.line, p.message) for p in result.problems] == [
        (2, "guidance must be a finite number from 0 to 100, got nan"),
        (3, "guidance must be a finite number from 0 to 100, got inf"),
        (4, "steps must be an integer from 1 to 1000, got 2.0")]
    assert [u.seed for u in result.units] == [0, 4294967295]  # the two ends of the range: two distinct images
    assert len({u.stem for u in result.units}) == 2


def test_validate_refuses_bad_values_without_a_model_call(tmp_path, loaded, capsys):
    path = _jsonl(tmp_path / "jobs.jsonl", '{"prompt": "a cat", "seeds": [1180591620717411303424]}',
                  '{"prompt": "a cat", "guidance": NaN}', '{"prompt": "a cat", "size": 65536}',
                  '{"prompt": "a cat", "steps": 2}')
    with no_model(loaded):
        code = main(["batch", "--validate", str(path), "--model", "tiny-sd"])
    out = capsys.readouterr().out
    assert code == 1
    assert f"{path}:1: seeds[0] must be an integer from 0 to 4294967295, got 1180591620717411303424" in out
    assert f"{path}:2: guidance must be a finite number from 0 to 100, got nan" in out
    assert f"{path}:3: size must be an integer from 1 to 8192, got 65536" in out
    assert "4 job(s), 1 image(s), 3 problem(s)" in out


def test_run_with_only_bad_lines_never_calls_the_model(tmp_path, pipe):
    path = _jsonl(tmp_path / "jobs.jsonl", '{"prompt": "a cat", "guidance": Infinity}',
                  '{"prompt": "a dog", "seeds": [0, 4294967296]}')
    out = tmp_path / "out"
    with no_model(pipe):
        summary = batch.run_batch(path, out, model="tiny-sd", pipe=pipe, progress=False)
    assert summary.done == 0 and [p.line for p in summary.invalid] == [1, 2] and not summary.ok
    assert list(out.glob("*.png")) == []


@pytest.mark.parametrize("flags, message", [
    (["--guidance", "nan"], "--guidance must be a finite number from 0 to 100, got nan"),
    (["--guidance", "inf"], "--guidance must be a finite number from 0 to 100, got inf"),
    (["--steps", "0"], "--steps must be an integer from 1 to 1000, got 0"),
    (["--height", "65536"], "--height must be an integer from 1 to 8192, got 65536"),
    (["--width", "0"], "--width must be an integer from 1 to 8192, got 0"),
    (["--seeds", "0"], "--seeds must be an integer from 1 to 100000, got 0"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--threads", "0"], "--threads must be an integer from 1 to 4096, got 0"),
    (["--dtype", "float8"], "--dtype must be one of float32"),
    (["--out", ""], "--out is required"),
])
def test_command_line_values_are_checked_before_loading(tmp_path, no_load, capsys, flags, message):
    path = _jsonl(tmp_path / "jobs.jsonl", '{"prompt": "a cat"}')
    argv = ["batch", str(path), "--out", str(tmp_path / "out"), "--no-progress", *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_line_size_must_fit_the_model(tmp_path, loaded, capsys):
    path = _jsonl(tmp_path / "jobs.jsonl", '{"prompt": "a cat"}')
    with no_model(loaded):
        assert main(["batch", "--validate", str(path), "--model", "tiny-sd", "--height", "60"]) == 2
    assert "--height must be a multiple of 8 for this model" in capsys.readouterr().err


# ------------------------------------------------------------------------------- bounded output
def test_problem_messages_are_bounded(tmp_path, pipe):
    huge = "x" * 200_000
    path = _jsonl(tmp_path / "jobs.jsonl",
                  json.dumps({"prompt": "a cat", huge: 1}),
                  json.dumps({"prompts": [1] * 50_000}),
                  json.dumps({"prompt": "a cat", "controls": [{"name": "store", "words": [huge]}]}),
                  json.dumps({"prompt": "a cat", "controls": [[huge]]}),
                  json.dumps({"prompt": "a cat", "seeds": [huge]}),
                  json.dumps({"defaults": {huge: 1}}))
    result = batch.plan(path, pipe, model="tiny-sd")
    assert sorted(p.line for p in result.problems) == [1, 2, 3, 4, 5, 6]
    assert all(len(p.message) <= batch.MESSAGE_MAX for p in result.problems), [len(p.message) for p in
                                                                               result.problems]
    assert len(batch.Problem(1, "y" * 10**6).message) <= batch.MESSAGE_MAX


def _bomb() -> str:
    """Nine levels of nine aliases: under 600 bytes, 387 million strings once expanded."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\njobs:\n  - {prompt: *i}\n"


BOMB = _bomb()


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, loaded, capsys):
    assert len(BOMB) < 600
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    started = time.perf_counter()
    code = main(["batch", "--validate", str(path), "--model", "tiny-sd"])
    out = capsys.readouterr().out
    assert time.perf_counter() - started < 10 and code == 1
    assert len(out) < 5000, len(out)
    assert f"{path}:11: YAML alias *i refused: anchors and aliases are not supported" in out
    # the same inside one job: that job is refused with its line, the others run
    path.write_text("jobs:\n  - prompt: a cat\n    seeds: [0]\n  - prompt: a dog\n    seeds: &s [0, 1]\n"
                    "  - prompt: a cow\n    seeds: *s\n")
    result = batch.plan(path)
    assert [(p.line, p.message.split(":")[0]) for p in result.problems] == [
        (5, "YAML anchor &s refused"), (7, "YAML alias *s refused")]
    assert [u.prompt for u in result.units] == ["a cat"]


def test_yaml_duplicate_keys_are_refused_with_their_line(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("defaults:\n  steps: 2\njobs:\n  - prompt: a cat\n    seeds: [0]\n    seeds: [1]\n"
                    "  - prompt: a dog\n    controls: [{name: store, words: [dog], words: [cat]}]\n"
                    "  - prompt: a cow\n")
    result = batch.plan(path)
    assert [(p.line, p.message) for p in result.problems] == [
        (6, "duplicate key 'seeds' (first given on line 5): a key may appear once in a mapping"),
        (8, "duplicate key 'words' (first given on line 8): a key may appear once in a mapping")]
    assert [(u.prompt, u.settings["steps"]) for u in result.units] == [("a cow", 2)]
    path.write_text("defaults:\n  steps: 2\n  steps: 3\njobs:\n  - prompt: a cat\njobs:\n  - prompt: a dog\n")
    problems = [(p.line, p.message.split(" (")[0]) for p in batch.plan(path).problems]
    assert problems == [(3, "duplicate key 'steps'"), (6, "duplicate top-level key 'jobs'")]


def test_jsonl_duplicate_keys_are_refused_with_their_line(tmp_path):
    path = _jsonl(tmp_path / "jobs.jsonl", '{"defaults": {"steps": 2, "steps": 3}}',
                  '{"prompt": "a cat", "seeds": [0], "seeds": [1]}',
                  '{"prompt": "a dog", "controls": [{"name": "store", "name": "todo"}]}',
                  '{"prompt": "a cow", "seeds": [0]}')
    result = batch.plan(path)
    assert [(p.line, p.message.split(":")[0]) for p in result.problems] == [
        (1, "duplicate key 'steps'"), (2, "duplicate key 'seeds'"), (3, "duplicate key 'name'")]
    assert [u.prompt for u in result.units] == ["a cow"]


# ------------------------------------------------------------------------------- the job file
def test_a_folder_given_as_the_job_file(tmp_path, no_load, capsys):
    with pytest.raises(ValueError, match="is a folder, not a job file"):
        batch.plan(tmp_path)
    assert main(["batch", "--validate", str(tmp_path)]) == 2
    assert f"job file {tmp_path} is a folder, not a job file" in capsys.readouterr().err


def test_job_files_that_are_not_utf8(tmp_path, no_load, capsys):
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"prompt": "a cat"}\n', encoding="utf-16")
    with pytest.raises(ValueError, match=f"job file {path} is UTF-16 text"):
        batch.plan(path)
    assert main(["batch", "--validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"job file {path} is UTF-16 text" in err and "save it as UTF-8" in err and "Traceback" not in err
    path.write_bytes('{"prompt": "a cat"}\n{"prompt": "a dog"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"job file {path}: line 3 is not UTF-8"):
        batch.plan(path)
    path.write_text('{"prompt": "a cat"}\n', encoding="utf-16-le")  # no byte-order mark
    with pytest.raises(ValueError, match="line 1 holds a NUL byte"):
        batch.plan(path)
    path.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "a caf\u00e9"}\n'.encode())  # UTF-8 with a BOM is UTF-8
    assert [u.prompt for u in batch.plan(path).units] == ["a caf\u00e9"]


# ------------------------------------------------------------------------------- resume
def test_resume_redoes_images_damaged_on_disk(tmp_path, pipe):
    path = _jsonl(tmp_path / "jobs.jsonl", '{"prompt": "a cat", "seeds": [0, 1, 2, 3], "steps": 2}')
    out = tmp_path / "out"
    assert batch.run_batch(path, out, model="tiny-sd", pipe=pipe, progress=False).done == 4
    pngs = sorted(out.glob("*.png"))
    first = {p.name: p.read_bytes() for p in pngs}
    for p in pngs:
        assert json.loads(p.with_suffix(".json").read_text())["png_sha256"] == hashlib.sha256(first[p.name]).hexdigest()
    pngs[0].write_bytes(first[pngs[0].name][:-40])  # truncated
    damaged = bytearray(first[pngs[1].name])
    damaged[len(damaged) // 2] ^= 0xFF
    pngs[1].write_bytes(bytes(damaged))  # same length, one byte changed
    old = pngs[2].with_suffix(".json")  # a sidecar from before hashes were stored: the PNG is decoded instead
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "png_sha256"}))
    pngs[2].write_bytes(first[pngs[2].name][: len(first[pngs[2].name]) // 2])
    old = pngs[3].with_suffix(".json")  # an old sidecar with its PNG whole: skipped
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "png_sha256"}))
    summary = batch.run_batch(path, out, model="tiny-sd", pipe=pipe, progress=False)
    assert summary.done == 3 and summary.skipped == 1 and summary.ok
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))} == first
    rows = [json.loads(r)["image"] for r in (out / batch.MANIFEST).read_text().splitlines()]
    assert sorted(rows) == sorted(first)


# ------------------------------------------------------------------------------- one run per folder
def test_a_second_run_into_a_locked_folder_refuses_and_touches_nothing(tmp_path, pipe, loaded, capsys):
    path = _jsonl(tmp_path / "jobs.jsonl", '{"prompt": "a cat", "seeds": [0], "steps": 2}')
    out = tmp_path / "out"
    out.mkdir()
    stray = out / ".other-run.png.123-abcd.tmp"  # a file the running run is writing
    stray.write_bytes(b"partial")
    with batch.OutputLock(out):
        with pytest.raises(batch.OutputBusy, match=f"is writing into {out}; wait until it ends, or give another"):
            batch.run_batch(path, out, model="tiny-sd", pipe=pipe, progress=False)
        assert main(["batch", str(path), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"another attnedit batch run (pid {os.getpid()}, started " in err and str(out) in err
        assert stray.exists() and list(out.glob("*.png")) == []
    (out / batch.LOCK).write_text("pid 1, started long ago\n")  # left by a killed run: nobody holds it
    assert batch.run_batch(path, out, model="tiny-sd", pipe=pipe, progress=False).done == 1
    assert not (out / batch.LOCK).exists() and not stray.exists()
    names = {batch._temp_name(out / "x.png").name for _ in range(3)}
    assert len(names) == 3 and all(n.startswith(f".x.png.{os.getpid()}-") and n.endswith(".tmp") for n in names)


# ------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_abandons_the_image_in_flight_and_exits_non_zero(tmp_path, loaded, capsys, sig):
    Signalling.fired.clear()
    before = signal.getsignal(sig)
    path = _jsonl(tmp_path / "jobs.jsonl", '{"defaults": {"steps": 2}}', '{"prompt": "a cat", "seeds": [0, 1]}',
                  '{"prompt": "a dog", "controls": [{"name": "test_signal", "signum": ' + str(int(sig)) + "}]}",
                  '{"prompt": "a bird", "seeds": [0, 1]}')
    out = tmp_path / "out"
    code = main(["batch", str(path), "--out", str(out), "--no-progress", "--model", "tiny-sd"])
    captured = capsys.readouterr()
    assert Signalling.fired == [sig] and code == 128 + sig
    assert f"stopped by {sig.name}" in captured.err and f"stopped early by {sig.name}" in captured.out
    assert signal.getsignal(sig) == before  # the run's handlers are gone
    made = sorted(p.name for p in out.glob("*.png"))
    assert len(made) == 2 and all(n.startswith("a-cat-") for n in made)
    for name in made:  # finished images are whole and their sidecars say so
        assert batch.intact(out, name[:-4], json.loads((out / name).with_suffix(".json").read_text()))
    assert list(out.glob(".*.tmp")) == [] and not (out / batch.LOCK).exists()
    assert main(["batch", str(path), "--out", str(out), "--no-progress", "--model", "tiny-sd"]) == 0
    assert "3 done, 2 skipped" in capsys.readouterr().out


def test_sigterm_to_a_real_run_and_a_concurrent_run_into_its_folder(tmp_path, loaded, capsys):
    """A second `attnedit batch` into a folder another process is writing is refused; SIGTERM ends the
    first with status 143, every image it wrote whole."""
    path = _jsonl(tmp_path / "jobs.jsonl", '{"prompt": "a cat", "seeds": 400, "steps": 2, "size": 64}')
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    proc = subprocess.Popen([sys.executable, "-m", "attnedit", "batch", str(path), "--out", str(out), "--model",
                             "tiny-sd", "--no-progress"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("*.json")):
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert main(["batch", str(path), "--out", str(out), "--no-progress", "--model", "tiny-sd"]) == 2
        err = capsys.readouterr().err
        assert f"another attnedit batch run (pid {proc.pid}, started " in err and f"writing into {out}" in err
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped early by SIGTERM" in stdout
    sidecars = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert 0 < len(sidecars) < 400
    assert all(batch.intact(out, Path(s["image"]).stem, s) and s["png_sha256"] for s in sidecars)
    assert list(out.glob(".*.tmp")) == [] and not (out / batch.LOCK).exists()


# ------------------------------------------------------------------------------- sizes (issue 19)
def test_validate_warns_when_a_size_is_far_from_the_models(tmp_path, loaded, capsys):
    path = _jsonl(tmp_path / "jobs.jsonl", '{"prompt": "a cat", "size": 512}', '{"prompt": "a dog", "size": 128}',
                  '{"prompt": "a cow", "size": [32, 64]}', '{"prompt": "a hen", "size": [64, 24]}')
    with no_model(loaded):
        code = main(["batch", "--validate", str(path), "--model", "tiny-sd"])
    out = capsys.readouterr().out
    assert code == 0
    assert (f"{path}:1: warning: size 512x512 (H x W) is far from this model's native 64x64: expect a slow run and "
            "poor images") in out
    assert f"{path}:4: warning: size 64x24 (H x W)" in out
    assert f"{path}:2:" not in out and f"{path}:3:" not in out  # 2x and 0.5x are near enough
    assert "4 job(s), 4 image(s), 0 problem(s), 2 warning(s)" in out


def test_command_line_size_overrides_every_jobs_size(tmp_path, pipe, capsys):
    path = tmp_path / "jobs.yaml"
    path.write_text("defaults: {size: 96}\njobs:\n  - {prompt: a cat}\n  - {prompt: a dog, size: 128}\n"
                    "  - {prompt: a cow, height: 32, width: 40}\n")
    sizes = lambda **flags: [(u.settings["height"], u.settings["width"])  # noqa: E731
                             for u in batch.plan(path, pipe, overrides=flags, model="tiny-sd").units]
    assert sizes() == [(96, 96), (128, 128), (32, 40)]
    assert sizes(height=64) == [(64, 96), (64, 128), (64, 40)]
    assert sizes(height=64, width=72) == [(64, 72)] * 3
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--height HEIGHT image height for EVERY job: overrides the job's and the defaults' size" in text
    assert "--height / --width on the command line override every job's size" in text.replace("`", "")


def test_command_line_size_refuses_edit_jobs(tmp_path, pipe):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "photo.png")
    path = _jsonl(tmp_path / "jobs.jsonl", '{"image": "photo.png", "source_prompt": "a cat", "prompt": "a dog"}')
    assert batch.plan(path, pipe, model="tiny-sd").problems == []
    problems = batch.plan(path, pipe, overrides={"width": 64}, model="tiny-sd").problems
    assert [p.message for p in problems] == [
        "an edit job takes its size from its image, so --width (which sets every job's size) cannot apply to it: "
        "run edit jobs without --height/--width"]
