"""`attnedit batch`: thousands of prompts with controls, on one CPU or many GPUs, never losing an image.

    attnedit batch jobs.jsonl --out runs/a --model shapes-sd --batch-size 8
    accelerate launch --multi_gpu --num_processes 8 -m attnedit batch jobs.yaml --out runs/a
    attnedit batch --validate jobs.yaml

(Several CPU processes: the same `accelerate launch --multi_gpu --num_processes N` on a machine
without GPUs uses gloo; `accelerate launch --cpu` starts a single process.) Reruns into the same
`--out` skip finished images; see assets/examples/jobs.yaml.

A job file is JSONL (one job per line; a `{"defaults": {...}}` line fills every job) or YAML
(`defaults:` plus a `jobs:` list, or a bare list). A job names `prompt` (or `prompts`), `controls`
(`[{"name": "store", "words": ["cat"]}]`: the options of the Python API by the same names), `seeds`
(a list, or a count starting at `seed`), `size` / `height` / `width`, `steps`, `guidance`,
`negative_prompt`, `maps` (true or a list of words: save an attention-map grid), an optional `id`,
and `together: true` to make a job's prompts in one call from one seed, the first as the source
of the others (MasaCtrl). Values come from the job, then the CLI flags, then the `defaults`
block, then the model; except the size: `--height` / `--width` on the command line override
every job's size (its own `size` / `height` / `width` and the defaults'), side by side, and a
real-image edit job (sized by its image) is refused with them. Every value is checked as the
Python API checks it (`attnedit.validate`: integers are integers, guidance finite, seeds in
0 .. 2**32 - 1, sides in 1 .. 8192 and multiples of the model's stride) before any model call;
YAML anchors / aliases and keys given twice (YAML or JSONL) are refused with their line.
`--validate` also warns, without failing, about a size more than 2x from the model's native
size on a side (slow, and noise rather than images).

Jobs that read files (every path is relative to the job file's folder and checked before anything
runs; an image's key includes the files' contents, so an edited file is made again):
- real-image edit: `image` (a photo) with `source_prompt` (what it shows); `prompt`/`prompts` are
  the targets. The image is inverted and denoised as the source (its reconstruction, made too)
  and the targets; the first control is the edit's control (default MasaCtrl). Size and noise come
  from the image: no `size`, `seed(s)` or `together`.
- IR-Diffusion: `prompt` is the scene and `references: {prompts: [...], subjects: [...], boxes:
  [[x0, y0, x1, y1], ...], images: [ref.png, ...], options: {isolate: true, ...}}` its subjects
  (one reference prompt and one subject word each; `boxes`, where each goes in the scene, and
  `images`, real reference photos, are optional; `options` are RepositionAttention's).
- control options that name files (MasaCtrl `masks: [mask.png, ...]`, white = foreground).
- `concepts` (defaults only: one model per run): AttenCraft tokens loaded with the model
  (`attnedit.load(model, concepts=path)`).

Why it is built this way:
- Every image is one *unit* with a content key (model, prompt, seed, settings): its file name is
  `<id or prompt>-s<seed>-<key>.png`, so reruns and workers agree on names without talking.
- Units that share settings are grouped into batches from the job file alone (order of the file,
  `--batch-size`), never from the number of workers or from what is already done, and whole
  batches are split between processes. CPU (and GPU) matrix kernels sum in a batch-size-dependent
  order, so a pixel may differ by one level between batch sizes; fixing the batches this way
  makes one worker and eight workers, and a resumed run, bit-identical (on the same kind of
  device; on CPUs with the same threads per process, `--threads`, which CPU sums also depend on).
- Writes are atomic (temp name unique to the process, then rename); the sidecar JSON is written
  last, holds the PNG's sha256 and marks an image complete; a rerun skips an image only when its
  bytes still match (an older sidecar without the hash: when the PNG decodes whole), so a file
  damaged on disk is made again. `manifest.jsonl` gets one line per finished image (appended
  under a file lock) and is rebuilt from the sidecars when it was cut short, and rewritten in job
  order at the end.
- One run at a time per output folder: a run holds an exclusive lock (`.attnedit-batch.lock`,
  `flock`, taken by the main process of an `accelerate launch` for all its processes); a second
  run into the same `--out` refuses at once, naming the folder and the holder.
- SIGTERM / SIGINT: the batch being denoised is abandoned (nothing of it is written), images
  already handed to the writer are finished, and the run ends with status 128 + the signal
  (143 / 130); a second signal ends it at once. Finished images stay intact; rerun to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import hashlib
import io
import json
import os
import re
import secrets
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import validate
from .validate import InputError, short

MANIFEST = "manifest.jsonl"
SIDECAR_TAG = "attnedit_batch"  # marks sidecars written by this module (with the image key)
JOB_KEYS = ("id", "prompt", "prompts", "negative_prompt", "seeds", "seed", "size", "height", "width", "steps",
            "guidance", "controls", "maps", "together", "image", "source_prompt", "references")
_JOB_ONLY = ("id", "prompt", "prompts", "image", "source_prompt", "references")  # what one job makes
DEFAULT_KEYS = (*(k for k in JOB_KEYS if k not in _JOB_ONLY), "model", "concepts")
REFERENCE_KEYS = ("prompts", "subjects", "boxes", "images", "options")
_SLUG_RE = re.compile(r"[^A-Za-z0-9]+")
LOCK = ".attnedit-batch.lock"  # inside the output folder, held (flock) for the whole run
MESSAGE_MAX = 500  # no problem message prints more than this (a value is shown short, never whole)
SEEDS_COUNT_MAX = 100_000  # `seeds: N` makes N images per prompt
ID_MAX = 80  # a job id is part of file names
SIZE_FAR = 2.0  # --validate warns when a side is more than this factor from the model's native size


# ------------------------------------------------------------------------------------- data types
@dataclass
class Problem:
    """A bad job line: where it is and what is wrong."""

    line: int
    message: str

    def __post_init__(self) -> None:
        self.message = _cap(self.message)

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def _cap(text: str, limit: int = MESSAGE_MAX) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text) - limit + 40} more characters)"


@dataclass
class Entry:
    """One raw job of the file with the line it starts on."""

    line: int
    data: Any


@dataclass
class Unit:
    """One image to make: prompt, seed and the settings it shares with its batch."""

    line: int
    job_id: str | None
    prompt: str
    seed: int
    settings: dict[str, Any]  # steps, guidance, height, width, negative_prompt, controls, maps
    key: str
    stem: str
    group: str | None = None  # images of a `together` job made in one call (one group per seed)
    role: str = "plain"  # "source" (its first prompt) or "target" inside a group
    base: Path | None = None  # the job file's folder: relative file names in `settings` are read from it

    def signature(self) -> str:
        return json.dumps(self.settings, sort_keys=True)


@dataclass
class Plan:
    """Everything a run needs from the job file: units in file order and the problems found."""

    units: list[Unit] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    jobs: int = 0
    duplicates: int = 0
    model: str | None = None
    warnings: list[Problem] = field(default_factory=list)  # valid but likely unwanted (a size far from native)


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # (line, file stem, reason)
    invalid: list[Problem] = field(default_factory=list)
    duplicates: int = 0  # images asked for twice in the file (made once)
    seconds: float = 0.0
    interrupted: int | None = None  # the signal (SIGTERM / SIGINT) that stopped the run early

    @property
    def exit_status(self) -> int:
        """The CLI's status: 128 + signal when interrupted, 1 when an image failed or a line was bad, else 0."""
        if self.interrupted:
            return 128 + int(self.interrupted)
        return 0 if self.ok else 1

    def merge(self, other: Summary) -> None:
        self.done += other.done
        self.skipped += other.skipped
        self.failed += other.failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.invalid and not self.interrupted


# -------------------------------------------------------------------------------------- reading
def read_jobs(path: str | os.PathLike) -> tuple[dict[str, Any], list[Entry], list[Problem]]:
    """Parse a JSONL or YAML job file into (defaults, jobs with line numbers, problems)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"job file {path} is a folder, not a job file: give a .jsonl or .yaml file")
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} does not exist")
    text = _decode(path, path.read_bytes())
    if path.suffix.lower() in (".yaml", ".yml"):
        return _read_yaml(text)
    return _read_jsonl(text)


_BOMS = (("UTF-32", (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")), ("UTF-16", (b"\xff\xfe", b"\xfe\xff")))


def _decode(path: Path, data: bytes) -> str:
    """The job file's text: UTF-8 (a UTF-8 byte-order mark is dropped); anything else is refused,
    naming the file and the line, instead of a UnicodeDecodeError traceback."""
    for encoding, boms in _BOMS:
        if data.startswith(boms):
            raise ValueError(f"job file {path} is {encoding} text (it starts with a {encoding} byte-order mark); "
                             "save it as UTF-8")
    if b"\x00" in data:
        line = data[: data.index(b"\x00")].count(b"\n") + 1
        raise ValueError(f"job file {path}: line {line} holds a NUL byte (is the file UTF-16 or binary?); save it "
                         "as UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"job file {path}: line {line} is not UTF-8 (byte {data[err.start]:#04x} at offset "
                         f"{err.start}); save the file as UTF-8") from None


def file_model(path: str | os.PathLike) -> str | None:
    """The `model` of the file's defaults block, if any."""
    model = read_jobs(path)[0].get("model")
    return model if isinstance(model, str) else None


def file_concepts(path: str | os.PathLike) -> Path | None:
    """The AttenCraft concepts (`defaults.concepts`) the model of this job file is loaded with, checked."""
    value = read_jobs(path)[0].get("concepts")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: defaults.concepts must be the path of a concepts file or folder, got {short(value)}")
    found = _resolve(Path(path).parent, value)
    if not found.exists():
        raise ValueError(f"{path}: defaults.concepts {short(value)} does not exist "
                         f"(looked for {_cap(str(found), 200)})")
    return found


def _load_options(path: str | os.PathLike) -> dict[str, Any]:
    """`attnedit.load` options the job file asks for (its concepts)."""
    concepts = file_concepts(path)
    return {"concepts": str(concepts)} if concepts is not None else {}


def _resolve(base: Path | None, name: str | os.PathLike) -> Path:
    """A file named in a job file: absolute, or relative to the job file's folder."""
    path = Path(name).expanduser()
    return path if path.is_absolute() or base is None else base / path


def _file_digest(path: Path) -> str:
    """Content digest of a file (or of every file of a folder) for image keys."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _input_file(base: Path | None, name: Any, what: str, files: dict[str, str]) -> Path:
    """Check a file a job reads (exists, is a readable image) and record its digest in `files`."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must be a file name (relative to the job file), got {short(name)}")
    path = _resolve(base, name)
    if not path.is_file():
        raise ValueError(f"{what} {short(name)} does not exist (looked for {_cap(str(path), 200)})")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{what} {short(name)} is not an image the batch can read ({_cap(str(err), 200)})") from None
    files[name] = _file_digest(path)
    return path


def _read_jsonl(text: str) -> tuple[dict[str, Any], list[Entry], list[Problem]]:
    defaults: dict[str, Any] = {}
    defaults_line: int | None = None
    entries: list[Entry] = []
    problems: list[Problem] = []
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            data = json.loads(line, object_pairs_hook=_unique_pairs)
        except _DuplicateKey as err:
            problems.append(Problem(no, f"duplicate key {short(err.key)}: a key may appear once in an object "
                                        "(JSON readers would silently keep the last)"))
            continue
        except json.JSONDecodeError as err:
            problems.append(Problem(no, f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        except (ValueError, RecursionError) as err:  # e.g. an integer of more than 4300 digits, nesting too deep
            problems.append(Problem(no, f"not valid JSON ({type(err).__name__}: {_cap(str(err), 120)})"))
            continue
        if isinstance(data, dict) and set(data) == {"defaults"}:
            if defaults_line is not None:
                problems.append(Problem(no, f"a second defaults line (the first is line {defaults_line})"))
            elif not isinstance(data["defaults"], dict):
                problems.append(Problem(no, "defaults must be an object"))
            else:
                defaults, defaults_line = data["defaults"], no
                problems += _check_defaults(defaults, no)
            continue
        entries.append(Entry(no, data))
    return defaults, entries, problems


class _DuplicateKey(ValueError):
    def __init__(self, key: Any) -> None:
        super().__init__(f"duplicate key {short(key)}")
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` hook: an object that names a key twice is refused (not last-wins)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


@functools.cache
def _yaml_loader() -> tuple[type, type]:
    """(the job files' YAML loader, the error it raises for what it refuses).

    SafeLoader that refuses anchors and aliases while composing, before anything is built from them
    (a few hundred bytes of nested aliases expand to gigabytes), and mappings that name a key twice.
    """
    import yaml

    class Refused(yaml.MarkedYAMLError):
        """An anchor, an alias or a duplicate key: reported as it is, not as a syntax error."""

    class JobLoader(yaml.SafeLoader):
        line_offset = 0  # lines of the file before the text read (messages give file lines)

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise Refused(problem=f"YAML alias *{_cap(event.anchor, 40)} refused: anchors and aliases are not "
                              "supported in job files (they can expand a small file into a huge value); write the "
                              "value out", problem_mark=event.start_mark)
            if getattr(event, "anchor", None) is not None:
                raise Refused(problem=f"YAML anchor &{_cap(event.anchor, 40)} refused: anchors and aliases are not "
                              "supported in job files (they can expand a small file into a huge value); write the "
                              "value out", problem_mark=event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                first: dict[Any, int] = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    try:
                        seen = first.get(key)
                    except TypeError:  # an unhashable key: the constructor says so itself
                        continue
                    if seen is not None:
                        raise Refused(problem=f"duplicate key {short(key)} (first given on line {seen}): a key may "
                                      "appear once in a mapping", problem_mark=key_node.start_mark)
                    first[key] = key_node.start_mark.line + 1 + self.line_offset
            return super().construct_mapping(node, deep=deep)

    return JobLoader, Refused


def _load_yaml(text: str, line_offset: int = 0) -> tuple[Any, Any]:
    """(the root node, the data) of one YAML document (`line_offset` lines into the file), read with the
    job files' loader."""
    loader_class, _ = _yaml_loader()
    loader = loader_class(text)
    loader.line_offset = line_offset
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def _read_yaml(text: str) -> tuple[dict[str, Any], list[Entry], list[Problem]]:
    import yaml

    try:
        root, data = _load_yaml(text)
    except (yaml.YAMLError, RecursionError):
        return _read_yaml_chunks(text)
    if root is None:
        return {}, [], []
    problems: list[Problem] = []
    defaults: dict[str, Any] = {}
    if isinstance(root, yaml.SequenceNode):
        items, nodes = data, root.value
    elif isinstance(root, yaml.MappingNode):
        items, nodes = [], []
        for key_node, value_node in root.value:
            key = key_node.value
            if key == "defaults":
                if not isinstance(data.get("defaults"), dict):
                    problems.append(Problem(key_node.start_mark.line + 1, "defaults must be a mapping"))
                else:
                    defaults = data["defaults"]
                    problems += _check_defaults(defaults, key_node.start_mark.line + 1)
            elif key == "jobs":
                if not isinstance(value_node, yaml.SequenceNode):
                    problems.append(Problem(key_node.start_mark.line + 1, "jobs must be a list"))
                else:
                    items, nodes = data["jobs"], value_node.value
            else:
                problems.append(Problem(key_node.start_mark.line + 1, f"unknown top-level key {short(key)}; a YAML "
                                        "job file has 'defaults' and 'jobs'"))
    else:
        return {}, [], [Problem(1, "a YAML job file is a list of jobs or a mapping with 'defaults' and 'jobs'")]
    entries = [Entry(node.start_mark.line + 1, item) for item, node in zip(items, nodes)]
    return defaults, entries, problems


def _read_yaml_chunks(text: str) -> tuple[dict[str, Any], list[Entry], list[Problem]]:
    """A file YAML cannot parse as a whole: parse the defaults block and each list item on their
    own, so one bad job is reported with its line and the others still run."""
    import yaml

    lines = text.splitlines()
    chunks: list[tuple[str, int, int]] = []  # (kind, first line index, end index)
    top = [i for i, ln in enumerate(lines) if ln and not ln[0].isspace() and not ln.startswith("#")]
    sections: list[tuple[str, int, int]] = []
    for n, i in enumerate(top):
        end = top[n + 1] if n + 1 < len(top) else len(lines)
        head = lines[i].split(":", 1)[0].strip()
        sections.append((head, i, end))
    if not any(h in ("defaults", "jobs") for h, _, _ in sections):  # a bare list: items at column 0
        sections = [("jobs", -1, len(lines))]
    problems: list[Problem] = []
    first: dict[str, int] = {}
    for head, start, end in sections:
        if head in ("defaults", "jobs") and head in first:
            problems.append(Problem(start + 1, f"duplicate top-level key {head!r} (first given on line "
                                               f"{first[head]}); this one is not read"))
            continue
        first.setdefault(head, start + 1)
        if head == "defaults":
            chunks.append(("defaults", start, end))
        elif head == "jobs" or head.startswith("-"):
            body = range(start + 1, end)
            starts = [i for i in body if lines[i].lstrip().startswith("- ") or lines[i].strip() == "-"]
            if not starts:
                continue
            indent = min(len(lines[i]) - len(lines[i].lstrip()) for i in starts)
            starts = [i for i in starts if len(lines[i]) - len(lines[i].lstrip()) == indent]
            for n, i in enumerate(starts):
                chunks.append(("job", i, starts[n + 1] if n + 1 < len(starts) else end))
        else:
            problems.append(Problem(start + 1, f"unknown top-level key {short(head)} (or a YAML syntax error on it)"))
    defaults: dict[str, Any] = {}
    entries: list[Entry] = []
    for kind, start, end in chunks:
        piece = "\n".join(lines[start:end])
        if kind == "job":
            piece = _dedent(lines[start:end])
        try:
            value = _load_yaml(piece, start)[1]
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
            at = start + 1 + (mark.line if mark is not None else 0)
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            refused = isinstance(err, _yaml_loader()[1])
            problems.append(Problem(at, what if refused else f"YAML syntax error: {what}"))
            continue
        except RecursionError:
            problems.append(Problem(start + 1, "YAML nesting too deep"))
            continue
        if kind == "defaults":
            value = (value or {}).get("defaults") if isinstance(value, dict) else None
            if not isinstance(value, dict):
                problems.append(Problem(start + 1, "defaults must be a mapping"))
            else:
                defaults = value
                problems += _check_defaults(defaults, start + 1)
        elif isinstance(value, list) and len(value) == 1:
            entries.append(Entry(start + 1, value[0]))
        else:
            problems.append(Problem(start + 1, "could not read this job"))
    return defaults, entries, problems


def _check_defaults(defaults: dict[str, Any], line: int) -> list[Problem]:
    valid = ", ".join(DEFAULT_KEYS)
    return [Problem(line, f"unknown key {short(k)} in defaults{_close(k, DEFAULT_KEYS)}; valid keys: {valid}")
            for k in defaults if k not in DEFAULT_KEYS]


def _dedent(lines: list[str]) -> str:
    indent = min((len(ln) - len(ln.lstrip()) for ln in lines if ln.strip()), default=0)
    return "\n".join(ln[indent:] for ln in lines)


# ------------------------------------------------------------------------------------- planning
def _close(word: Any, choices: Sequence[str]) -> str:
    if not isinstance(word, str) or len(word) > 100:
        return ""
    near = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _slug(text: str, limit: int = 40) -> str:
    return _SLUG_RE.sub("-", text).strip("-").lower()[:limit].strip("-") or "image"


def _size(spec: dict[str, Any], default: tuple[int | None, int | None],
          stride: int | None = None) -> tuple[int | None, int | None]:
    """(height, width) of a job: `size` (an int, [height, width] or "HxW") or `height` / `width`, each side an
    int in 1 .. 8192 and, when the model is known (`stride`), a multiple of its stride; else `default`."""
    size = spec.get("size")
    if size is not None and ("height" in spec or "width" in spec):
        raise ValueError("give either size or height/width, not both")
    if size is None:
        h = spec.get("height", default[0])
        w = spec.get("width", default[1])
        names = ("height", "width")
    elif isinstance(size, bool):
        raise InputError("size", size, "an integer, [height, width] or 'HxW'")
    elif isinstance(size, int):
        h = w = size
        names = ("size", "size")
    elif isinstance(size, str) and re.fullmatch(r"\d{1,9}x\d{1,9}", size):
        h, w = (int(v) for v in size.split("x"))
        names = ("size (height)", "size (width)")
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        h, w = size
        names = ("size[0] (height)", "size[1] (width)")
    else:
        raise InputError("size", size, "an integer, [height, width] or 'HxW'")
    return (None if h is None else validate.side(names[0], h, stride),
            None if w is None else validate.side(names[1], w, stride))


def _seeds(spec: dict[str, Any]) -> list[int]:
    """The seeds of a job: a list of distinct seeds, or a count (`seeds: N`) from `seed` (default 0);
    every seed in 0 .. 2**32 - 1 (past it torch's generator would repeat another seed's noise)."""
    seeds = spec.get("seeds")
    if isinstance(seeds, list):
        if "seed" in spec and seeds:
            raise ValueError("give either a seeds list or seed (+ a seeds count), not both")
        if not seeds:
            raise ValueError("seeds is an empty list")
        if len(seeds) > SEEDS_COUNT_MAX:
            raise InputError("seeds", seeds, f"a list of at most {SEEDS_COUNT_MAX} seeds",
                             shown=f"a list of {len(seeds)} seeds")
        out = [validate.seed(f"seeds[{i}]", s) for i, s in enumerate(seeds)]
        if len(set(out)) != len(out):
            again = next(s for i, s in enumerate(out) if s in out[:i])
            raise InputError("seeds", seeds, "a list of distinct seeds", note=f"{again} is given twice")
        return out
    count = 1
    if seeds is not None:
        try:
            count = validate.integer("seeds", seeds, 1, SEEDS_COUNT_MAX)
        except InputError:
            raise InputError("seeds", seeds, f"a count from 1 to {SEEDS_COUNT_MAX} or a list of distinct seeds from 0 "
                             f"to {validate.SEED_MAX}") from None
    base = validate.seed("seed", spec.get("seed", 0))
    if base + count - 1 > validate.SEED_MAX:
        raise InputError("seed", base, f"at most {validate.SEED_MAX - count + 1} for {count} seeds (image i uses "
                         f"seed + i, at most {validate.SEED_MAX})")
    return [base + i for i in range(count)]


def check_overrides(overrides: dict[str, Any] | None, stride: int | None = None) -> dict[str, Any]:
    """The command-line values (`--steps`, `--guidance`, `--height`, `--width`, `--seeds`, `--negative-prompt`)
    checked as a job's are, named by their flag; returns the ones that are set."""
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = [k for k in cli if k not in ("steps", "guidance", "height", "width", "negative_prompt", "seeds")]
    if unknown:
        raise InputError("overrides", unknown[0], "steps, guidance, height, width, negative_prompt or seeds")
    if "steps" in cli:
        validate.integer("--steps", cli["steps"], 1, validate.STEPS_MAX)
    if "guidance" in cli:
        validate.number("--guidance", cli["guidance"], 0.0, validate.GUIDANCE_MAX)
    for side in ("height", "width"):
        if side in cli:
            validate.side(f"--{side}", cli[side], stride)
    if "seeds" in cli:
        validate.integer("--seeds", cli["seeds"], 1, SEEDS_COUNT_MAX)
    if "negative_prompt" in cli:
        validate.text("--negative-prompt", cli["negative_prompt"], empty=True)
    return cli


def _control_specs(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"controls must be a list of {{'name': ..., options}}, got {type(value).__name__}")
    specs = []
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"each control is an object with a 'name' and its options, got {short(item)}")
        specs.append(dict(item))
    return specs


def load_methods() -> list[str]:
    """Import every method module so controls are known by name. A module that fails to import
    (a method being worked on) is reported once and skipped instead of stopping every job."""
    import importlib
    import pkgutil
    import warnings

    from . import methods

    broken = []
    for info in pkgutil.iter_modules(methods.__path__):
        try:
            importlib.import_module(f"{methods.__name__}.{info.name}")
        except Exception as err:
            broken.append(info.name)
            warnings.warn(f"attnedit method module {info.name!r} failed to import ({type(err).__name__}: {err}); "
                          "its controls are unavailable", stacklevel=2)
    return broken


def _file_options(spec: dict[str, Any]) -> list[str]:
    """Options of a control spec that may name files (`file_options` of its class)."""
    from .controls import CONTROLS

    return [k for k in getattr(CONTROLS.get(spec["name"]), "file_options", ()) if k in spec]


def _spec_files(spec: dict[str, Any], base: Path | None, where: str, files: dict[str, str] | None = None):
    """A control spec with its file names resolved against the job file's folder (checked if `files`)."""
    out = dict(spec)
    for key in _file_options(spec):
        value = spec[key]
        single = not isinstance(value, list)
        items = [value] if single else value
        resolved = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if files is not None:
                    _input_file(base, item, f"{where} ({spec['name']}) {key}" + ("" if single else f"[{i}]"), files)
                item = str(_resolve(base, item))
            resolved.append(item)
        out[key] = resolved[0] if single else resolved
    return out


def build_controls(specs: list[dict[str, Any]], maps: Any = False, base: Path | None = None) -> tuple[list[Any], Any]:
    """Controls of one batch from their specs; adds an AttentionStore when maps are asked for.

    File names in options (`file_options`) are read relative to `base`, the job file's folder.
    Returns (controls, the store that feeds the map grids or None).
    """
    from .controls import make_control
    from .store import AttentionStore

    controls = []
    for i, spec in enumerate(specs):
        spec = _spec_files(spec, base, f"controls[{i}]")
        opts = {k: v for k, v in spec.items() if k != "name"}
        controls.append(make_control(spec["name"], opts))
    store = None
    if maps:
        store = next((c for c in controls if isinstance(c, AttentionStore)), None)
        if store is None:
            store = AttentionStore(words=list(maps) if isinstance(maps, list) else None)
            controls.append(store)
    return controls, store


def plan(
    path: str | os.PathLike,
    pipe: Any | None = None,
    overrides: dict[str, Any] | None = None,
    model: str | None = None,
) -> Plan:
    """Read the job file and expand it into units (one per image), checking every job.

    Without `pipe` only the file itself is checked (keys, types, control names and options); with
    `pipe` every job also goes through the controls' own `setup` checks against the model and the
    prompts (a word not in the prompt, a bad box, a size the model cannot take), with no denoising.
    """
    load_methods()
    cli = check_overrides(overrides, pipe.pixel_stride if pipe is not None else None)
    defaults, entries, problems = read_jobs(path)
    result = Plan(problems=list(problems), jobs=len(entries))
    result.model = model or defaults.get("model")
    ident = result.model
    try:
        concepts = file_concepts(path)
    except ValueError as err:
        result.problems.append(Problem(1, str(err)))
        concepts = None
    if concepts is not None:  # other weights, other images: the key names the concepts' contents
        ident = f"{result.model}+concepts:{_file_digest(concepts)}"
    file_defaults = {k: v for k, v in defaults.items() if k in DEFAULT_KEYS and k not in ("model", "concepts")}
    base = Path(path).resolve().parent
    native = pipe.default_size() if pipe is not None else None
    seen: set[str] = set()
    for entry in entries:
        try:
            units = _expand(entry, file_defaults, cli, pipe, ident, base)
        except ValueError as err:
            result.problems.append(Problem(entry.line, str(err)))
            continue
        except Exception as err:  # e.g. a control given an option of the wrong type
            result.problems.append(Problem(entry.line, f"{type(err).__name__}: {err}"))
            continue
        if native is not None and units:
            far = _far_from_native(units[0].settings, native)
            if far:
                result.warnings.append(Problem(entry.line, far))
        for u in units:
            if u.key in seen:
                result.duplicates += 1
                continue
            seen.add(u.key)
            result.units.append(u)
    result.problems.sort(key=lambda p: p.line)
    return result


def _far_from_native(settings: dict[str, Any], native: tuple[int, int]) -> str | None:
    """A warning when a job's size is far (more than `SIZE_FAR`x per side) from the model's native size."""
    h, w = settings.get("height"), settings.get("width")
    nh, nw = native
    if not (h and w and nh and nw):
        return None
    if all(1 / SIZE_FAR <= got / want <= SIZE_FAR for got, want in ((h, nh), (w, nw))):
        return None
    return (f"size {h}x{w} (H x W) is far from this model's native {nh}x{nw}: expect a slow run and poor images "
            f"(e.g. noise); for this model use size: [{nh}, {nw}] or --height {nh} --width {nw}")


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Later layers win; a layer that sets `size` drops inherited height/width (and the reverse),
    one that sets a seeds list drops an inherited `seed`."""
    spec: dict[str, Any] = {}
    for layer in layers:
        if "size" in layer:
            spec.pop("height", None)
            spec.pop("width", None)
        if "height" in layer or "width" in layer:
            spec.pop("size", None)
        if isinstance(layer.get("seeds"), list):
            spec.pop("seed", None)
        spec.update(layer)
    return spec


def _expand(entry: Entry, file_defaults: dict, cli: dict, pipe: Any, model: str | None,
            base: Path | None = None) -> list[Unit]:
    job = entry.data
    if not isinstance(job, dict):
        raise ValueError(f"a job is an object with a prompt, got {type(job).__name__}")
    unknown = [k for k in job if k not in JOB_KEYS]
    if unknown:
        k = unknown[0]
        hint = (" (the model is chosen once per run: --model or defaults)" if k == "model" else
                " (concepts are loaded with the model, once per run: put them in defaults)" if k == "concepts" else
                _close(k, JOB_KEYS))
        raise ValueError(f"unknown key {short(k)}{hint}; valid keys: {', '.join(JOB_KEYS)}")
    edit, refs = "image" in job, "references" in job
    if edit and refs:
        raise ValueError("a job is either a real-image edit (image) or IR-Diffusion (references), not both")
    if "source_prompt" in job and not edit:
        raise ValueError("source_prompt describes the photo of a real-image edit: add image: or drop source_prompt")
    if edit:
        fixed = [k for k in ("seed", "seeds", "size", "height", "width", "together") if k in job]
        if fixed:
            raise ValueError(f"an edit job takes its size and noise from its image: drop {fixed[0]!r}")
        forced = [f"--{k}" for k in ("height", "width") if k in cli]
        if forced:
            raise ValueError(f"an edit job takes its size from its image, so {forced[0]} (which sets every job's size) "
                             "cannot apply to it: run edit jobs without --height/--width")
    size_flags = {k: cli[k] for k in ("height", "width") if k in cli}  # --height/--width override every job's size
    spec = _merge(file_defaults, {k: v for k, v in cli.items() if k not in size_flags}, job)
    if ("prompt" in job) == ("prompts" in job):
        raise ValueError("a job needs exactly one of prompt (a string) or prompts (a list of strings)")
    prompts = [job["prompt"]] if "prompt" in job else job["prompts"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        name = "prompt" if "prompt" in job else "prompts"
        raise InputError(name, job[name], "a non-empty string" if name == "prompt" else
                         "a non-empty list of non-empty strings")
    job_id = job.get("id")
    if job_id is not None and (not isinstance(job_id, str) or len(job_id) > ID_MAX
                               or not re.fullmatch(r"[A-Za-z0-9._-]+", job_id)):
        raise InputError("id", job_id, f"1 to {ID_MAX} letters, digits, '.', '_' or '-'")
    seeds = [0] if edit else _seeds(spec)  # an edit starts from its image's inverted noise
    negative = spec.get("negative_prompt")
    if negative is not None:
        validate.text("negative_prompt", negative, empty=True)
    maps = spec.get("maps", False)
    if not (isinstance(maps, bool) or (isinstance(maps, list) and all(isinstance(w, str) for w in maps))):
        raise InputError("maps", maps, "true/false or a list of words")
    together = True if edit or refs else spec.get("together", False)
    validate.flag("together", together)
    if together and len(prompts) < 2 and not (edit or refs):
        raise ValueError("together needs at least two prompts (the first is the source of the others)")
    specs = _control_specs(spec.get("controls"))
    if edit and not specs:
        specs = [{"name": "masactrl"}]  # what `EditPipeline.edit` uses when given no control
    files: dict[str, str] = {}
    for i, s in enumerate(specs):
        _spec_files(s, base, f"controls[{i}]", files)  # every file named is there and readable
    controls, _ = build_controls(specs, maps, base)  # unknown names/options, bad option values
    recommended = pipe.recommended() if pipe is not None else {}
    stride = pipe.pixel_stride if pipe is not None else None
    height, width = _size(spec, (recommended.get("height"), recommended.get("width")), stride)
    height, width = size_flags.get("height", height), size_flags.get("width", width)
    steps = spec.get("steps", recommended.get("steps"))
    if steps is not None:
        steps = validate.steps(steps)
    guidance = spec.get("guidance", recommended.get("guidance"))
    if guidance is not None:
        guidance = validate.guidance(guidance)
    settings: dict[str, Any] = {
        "steps": steps,
        "guidance": guidance,
        "height": height,
        "width": width,
        "negative_prompt": negative,
        "controls": specs,
        "maps": maps,
    }
    if edit:
        source = job.get("source_prompt", "")
        if not isinstance(source, str):
            raise InputError("source_prompt", source, "a string (what the image shows)")
        settings["height"], settings["width"] = _edit_size(_input_file(base, job["image"], "image", files), pipe)
        settings["image"] = job["image"]
        prompts = [source, *prompts]
    if refs:
        bad = [k for k in ("prompts", "controls", "maps") if k in job]
        if bad:
            raise ValueError(f"an IR-Diffusion job has one scene prompt and builds its own control: drop {bad[0]!r} "
                             "(control options go under references.options)")
        settings["controls"], settings["maps"] = [], False  # inherited ones do not apply
        settings["references"] = _references(job["references"], prompts[0], settings, pipe, base, files)
        prompts = [*settings["references"]["prompts"], prompts[0]]
    if files:
        settings["files"] = files
    if pipe is not None and refs:
        _check_references(pipe, prompts[-1], settings)
    elif pipe is not None:
        for group in ([prompts] if together else [[p] for p in prompts]):
            check_with_model(pipe, group, settings, controls)
    units = []
    pairs = [(pi, seed) for seed in seeds for pi in range(len(prompts))] if together else [
        (pi, seed) for pi in range(len(prompts)) for seed in seeds]
    last = len(prompts) - 1
    for pi, seed in pairs:
        prompt = prompts[pi]
        ident = {"model": model, "prompt": prompt, "seed": seed, **settings}
        group, role = None, "plain"
        if together:
            ident["group"] = prompts
            group = _digest({"model": model, "prompts": prompts, "seed": seed, **settings})
            role = ("target" if pi == last else "source") if refs else ("source" if pi == 0 else "target")
        key = _digest(ident)
        name = job_id + (f"-p{pi}" if len(prompts) > 1 else "") if job_id else _slug(prompt)
        units.append(Unit(entry.line, job_id, prompt, seed, settings, key, f"{name}-s{seed}-{key}", group, role,
                          base))
    return units


def _edit_size(image: Path, pipe: Any) -> tuple[int, int]:
    """(height, width) the edit of `image` has: its size fitted to the model's stride as `invert` fits it."""
    import warnings

    from PIL import Image

    if pipe is None:
        with Image.open(image) as im:
            return im.height, im.width
    from .inversion import prepare_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the run says it again when it inverts
        fitted, _ = prepare_image(image, pipe.pixel_stride)
    return fitted.height, fitted.width


def _references(block: Any, scene: str, settings: dict[str, Any], pipe: Any, base: Path | None,
                files: dict[str, str]) -> dict[str, Any]:
    """The `references` block of an IR-Diffusion job, checked (lengths, words, boxes, files, options)."""
    from .controls import CONTROLS, make_control
    from .masks import check_boxes

    if "reposition" not in CONTROLS:
        raise ValueError("IR-Diffusion (references) is not available in this attnedit build")
    if not isinstance(block, dict):
        raise ValueError("references must be a mapping: {prompts: [...], subjects: [...], boxes, images, options}")
    unknown = [k for k in block if k not in REFERENCE_KEYS]
    if unknown:
        raise ValueError(f"unknown key {short(unknown[0])} in references{_close(unknown[0], REFERENCE_KEYS)}; "
                         f"valid keys: {', '.join(REFERENCE_KEYS)}")
    refs, subjects = block.get("prompts"), block.get("subjects")
    if not isinstance(refs, list) or not refs or not all(isinstance(p, str) and p.strip() for p in refs):
        raise ValueError("references.prompts must be a non-empty list of prompts, one per subject")
    if not isinstance(subjects, list) or len(subjects) != len(refs) or not all(isinstance(w, str) for w in subjects):
        raise ValueError(f"references.subjects must list one word per reference prompt ({len(refs)}), "
                         f"got {short(subjects)}")
    out: dict[str, Any] = {"prompts": refs, "subjects": subjects}
    boxes = block.get("boxes")
    if boxes is not None:
        if not isinstance(boxes, list) or len(boxes) != len(refs):
            raise ValueError(f"references.boxes must give one scene box per subject ({len(refs)}), got {short(boxes)}")
        out["boxes"] = [list(b) for b in check_boxes(boxes, "references.boxes")]
    images = block.get("images")
    if images is not None:
        if not isinstance(images, list) or len(images) != len(refs):
            raise ValueError(f"references.images must give one photo per reference prompt ({len(refs)}), "
                             f"got {short(images)}")
        for i, name in enumerate(images):
            found = _input_file(base, name, f"references.images[{i}]", files)
            if settings["height"] is not None and pipe is not None:
                h, w = _edit_size(found, pipe)
                if (h, w) != (settings["height"], settings["width"]):
                    raise ValueError(f"references.images[{i}] {short(name)} is {w}x{h} (W x H) but the scene is "
                                     f"{settings['width']}x{settings['height']}: give photos of the scene's size")
        out["images"] = list(images)
    options = block.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"references.options must be a mapping of RepositionAttention options, got {short(options)}")
    placed = [k for k in options if k.startswith(("target_", "reference_"))]
    if placed:
        raise ValueError(f"references.options: {short(placed[0])} is set from references (boxes) or the subjects' "
                         "attention; drop it")
    full = [[0.0, 0.0, 1.0, 1.0]] * len(refs)
    make_control("reposition", {**options, "target_boxes": full, "reference_boxes": full})  # bad names/values
    out["options"] = dict(options)
    return out


def _check_references(pipe: Any, scene: str, settings: dict[str, Any]) -> None:
    """What `ir_diffusion` checks before denoising: subject words in their prompts, the size."""
    from .methods.ir_diffusion import _check_words

    h, w, stride = settings["height"], settings["width"], pipe.pixel_stride
    if h % stride or w % stride:
        raise ValueError(f"image size {h}x{w} is not a multiple of {stride} for this model")
    refs = settings["references"]
    max_len = pipe.call_defaults().get("max_sequence_length")
    _check_words(pipe, refs["prompts"], [[w] for w in refs["subjects"]], max_len)
    _check_words(pipe, [scene], [refs["subjects"]], max_len)
    from .controls import make_control

    full = [[0.0, 0.0, 1.0, 1.0]] * len(refs["prompts"])
    control = make_control("reposition", {**refs["options"], "target_boxes": refs.get("boxes") or full,
                                          "reference_boxes": full})
    n = len(refs["prompts"])
    check_with_model(pipe, [*refs["prompts"], scene], settings, [control], roles=["source"] * n + ["target"])


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def group_layout(pipe: Any, units: Sequence[Unit], guidance: float):
    """Source/target roles of a `together` group for the controls that relate images (MasaCtrl)."""
    from .layout import BatchLayout

    cfg = pipe.family.uses_cfg(guidance)
    return BatchLayout.standard(len(units), cfg, groups=[0] * len(units), roles=[u.role for u in units])


def check_with_model(pipe: Any, prompts: list[str], settings: dict[str, Any], controls: list[Any],
                     roles: list[str] | None = None) -> None:
    """Everything `EditPipeline.generate` checks before denoising, without denoising: the size,
    and each control's `setup` against this model and these prompts (words, boxes, layers, roles).
    Several prompts are one call whose first is the source of the others, unless `roles` says."""
    from .controller import Controller
    from .layout import BatchLayout

    h, w, stride = settings["height"], settings["width"], pipe.pixel_stride
    if h % stride or w % stride:
        raise ValueError(f"image size {h}x{w} is not a multiple of {stride} for this model")
    cfg = pipe.family.uses_cfg(settings["guidance"])
    pipe.pipe.scheduler.set_timesteps(settings["steps"])
    layout = None
    if len(prompts) > 1:
        roles = roles or ["source"] + ["target"] * (len(prompts) - 1)
        layout = BatchLayout.standard(len(prompts), cfg, groups=[0] * len(prompts), roles=roles)
    ctrl = _CHECKERS.get(pipe)
    if ctrl is None:  # one controller per pipeline: its layer registry is built once, not per job
        ctrl = _CHECKERS[pipe] = Controller(pipe.pipe, [])
    ctrl.controls = list(controls)
    try:
        ctrl.begin_run(prompts, num_steps=settings["steps"], height=h, width=w, cfg=cfg, layout=layout,
                       max_sequence_length=pipe.call_defaults().get("max_sequence_length"))
    finally:
        ctrl.controls = []


_CHECKERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Controls whose effect on an image depends on the other images of its call (MasaCtrl: sample 0 is
# the source of the others). A control class may say so itself with `cross_sample = True/False`.
CROSS_SAMPLE = frozenset({"masactrl", "ir_diffusion", "irdiffusion"})


def cross_sample(name: str) -> bool:
    from .controls import CONTROLS

    declared = getattr(CONTROLS.get(name), "cross_sample", None)
    return bool(declared) if declared is not None else name in CROSS_SAMPLE


def make_batches(units: list[Unit], batch_size: int) -> list[list[Unit]]:
    """Group units that share settings, in file order, `batch_size` at a time.

    Depends only on the job file and `batch_size` (never on workers or on what is done), so an
    image is always computed in the same batch. A `together` group is one batch of its own; jobs
    with a control that relates the images of a batch (`cross_sample`) run one image per call.
    """
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.group or u.signature(), []).append(u)
    batches: list[list[Unit]] = []
    for members in groups.values():
        if members[0].group:
            batches.append(members)
            continue
        alone = any(cross_sample(s["name"]) for s in members[0].settings["controls"])
        size = 1 if alone else batch_size
        batches += [members[i : i + size] for i in range(0, len(members), size)]
    order = {u.key: i for i, u in enumerate(units)}
    batches.sort(key=lambda b: order[b[0].key])
    return batches


# ----------------------------------------------------------------------------------- the outputs
def is_complete(out: Path, unit: Unit) -> bool:
    """The sidecar is written last, so a readable sidecar with this key marks a finished image, when
    the image (and its maps grid) on disk are still the ones it describes (`intact`)."""
    side = out / f"{unit.stem}.json"
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get(SIDECAR_TAG) == unit.key and intact(out, unit.stem, data)


def intact(out: Path, stem: str, sidecar: dict[str, Any]) -> bool:
    """The PNG `stem`.png (and the maps grid the sidecar names) are whole: their bytes match the sha256
    the sidecar holds, or, for a sidecar written before hashes were stored, they decode completely."""
    files = [(out / f"{stem}.png", sidecar.get("png_sha256"))]
    if sidecar.get("maps_file"):
        maps = sidecar["maps_file"]
        if not isinstance(maps, str) or Path(maps).name != maps:
            return False
        files.append((out / maps, sidecar.get("maps_sha256")))
    return all(_file_intact(path, digest) for path, digest in files)


def _file_intact(path: Path, digest: Any) -> bool:
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if digest is not None:
        return isinstance(digest, str) and hashlib.sha256(data).hexdigest() == digest
    from PIL import Image

    try:  # verify: chunk CRCs up to IEND; load: every pixel (neither alone catches every truncation)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:
        return False
    return True


def _manifest_row(sidecar: dict[str, Any]) -> dict[str, Any]:
    return {
        "key": sidecar[SIDECAR_TAG],
        "image": sidecar["image"],
        "sidecar": Path(sidecar["image"]).with_suffix(".json").name,
        "maps": sidecar.get("maps_file"),
        "line": sidecar["job"]["line"],
        "id": sidecar["job"]["id"],
        "prompt": sidecar["prompt"],
        "seed": sidecar["seed"],
    }


def _complete_sidecars(out: Path) -> dict[str, dict[str, Any]]:
    """stem -> sidecar of every image in `out` whose sidecar was written (and its files are there), for the
    manifest; whether an image is skipped is decided by `is_complete`, which also checks its bytes."""
    found = {}
    for side in sorted(out.glob("*.json")):
        try:
            data = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or SIDECAR_TAG not in data:
            continue
        maps = data.get("maps_file")
        if (out / f"{side.stem}.png").is_file() and (not maps or (out / str(maps)).is_file()):
            found[side.stem] = data
    return found


def _temp_name(path: Path) -> Path:
    """A temp name beside `path`, unique to this process and call (`recover` removes leftovers)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _write_bytes(path: Path, data: bytes) -> None:
    """Temp name, flushed to disk, renamed: after a kill or a power cut the file is whole or absent."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomic(path: Path, text: str) -> None:
    _write_bytes(path, text.encode())


def rebuild_manifest(out: Path, units: Sequence[Unit] = ()) -> int:
    """Write `manifest.jsonl` from the sidecars: the run's units in file order, then any other
    finished image in `out` by name. Returns the number of rows."""
    found = _complete_sidecars(out)
    rows, done = [], set()
    for u in units:
        if u.stem in found and found[u.stem][SIDECAR_TAG] == u.key:
            rows.append(_manifest_row(found[u.stem]))
            done.add(u.stem)
    rows += [_manifest_row(found[s]) for s in sorted(found) if s not in done]
    _write_atomic(out / MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def recover(out: Path) -> bool:
    """Before a run (holding the folder's lock, so no other run writes here): drop temp files of a
    killed run and rebuild the manifest when it does not list exactly the finished images (cut
    short, a torn last line, duplicates). True if rebuilt."""
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    manifest = out / MANIFEST
    finished = {d["image"] for d in _complete_sidecars(out).values()}
    listed: list[str] = []
    intact = True
    if manifest.exists():
        for line in manifest.read_text().splitlines():
            try:
                listed.append(json.loads(line)["image"])
            except (ValueError, KeyError, TypeError):
                intact = False
    if intact and len(listed) == len(set(listed)) and set(listed) == finished:
        return False
    rebuild_manifest(out)
    return True


def append_manifest(out: Path, row: dict[str, Any]) -> None:
    """One whole line per finished image; a file lock keeps lines of concurrent workers apart."""
    import fcntl

    data = (json.dumps(row) + "\n").encode()
    fd = os.open(out / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, data)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class OutputBusy(RuntimeError):
    """Another run holds the output folder's lock."""


class OutputLock:
    """An exclusive `flock` on `out/.attnedit-batch.lock` for one run (one per `accelerate launch`: the main
    process takes it for all). Refuses at once (`OutputBusy`) when another run holds it; the file is
    removed when the run ends, and a lock taken on a file removed meanwhile is taken again on the new one."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ValueError(f"--out {self.out}: cannot write in this folder ({err.strerror or err})") from None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by another run
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                raise OutputBusy(f"another attnedit batch run ({holder or 'its pid not written yet'}) is writing "
                                 f"into {self.out}; wait until it ends, or give another --out (its lock: {self.path})"
                                 ) from None
            except OSError as err:  # a file system without flock (some network mounts): run unlocked, say so
                import warnings

                warnings.warn(f"cannot lock {self.path} ({err.strerror or err}): a second run into {self.out} "
                              "at the same time would not be detected", stacklevel=2)
                break
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the run that held it ended and removed the file: lock the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # still holding it: a run that opened the old file retries on a new one
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Interrupted(BaseException):
    """Raised inside the denoising of a batch when SIGTERM / SIGINT arrives: the batch is abandoned."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT during a run (main thread only): the first one abandons the batch being
    denoised (`Interrupted` from inside `abortable`) or, elsewhere, stops the run before the next
    batch; a second one acts as the signal would without this handler (ends the process)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._abortable = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now (writes are atomic, a rerun resumes)
            previous = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            if callable(previous):
                previous(signum, frame)
            else:
                os.kill(os.getpid(), signum)
            return
        self.received = signum
        if self._abortable:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        if self.received is not None:
            raise Interrupted(self.received)
        self._abortable += 1
        try:
            yield
        finally:
            self._abortable -= 1


# ------------------------------------------------------------------------------------- the run
def _distributed_state(cpu: bool | None = None):
    """accelerate's process state (one process without a launcher); CPU-only machines use gloo."""
    import torch
    from accelerate import PartialState

    if cpu is None:
        forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        cpu = forced or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


class Runner:
    """Makes the images of one process's batches and writes them (also used by the benchmark).

    Files are written by one background thread while the next batch denoises (PNG encoding and
    fsync cost as much as a small model's forward passes); at most one batch waits to be written.
    With `signals` (a `StopSignals`), SIGTERM / SIGINT abandon the batch being denoised (`Interrupted`).
    """

    def __init__(self, pipe: Any, out: Path, model: str, progress: Any = None,
                 signals: StopSignals | None = None, complete: set[str] | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from .pipeline import versions

        self.pipe = pipe
        self.out = out
        self.model = model
        self.versions = versions()
        self.progress = progress
        self.signals = signals
        self.complete = complete  # keys of the images found complete before the run (else checked per batch)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnedit-batch-writer")
        self._writing: Any = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Wait until every image handed to the writer is on disk."""
        self.flush()
        self._writer.shutdown(wait=True)

    def flush(self) -> None:
        if self._writing is not None:
            self._writing.result()
            self._writing = None

    def run(self, batch: list[Unit], summary: Summary) -> None:
        todo = [u for u in batch if not (u.key in self.complete if self.complete is not None
                                         else is_complete(self.out, u))]
        summary.skipped += len(batch) - len(todo)
        self._tick(len(batch) - len(todo))
        if not todo:
            return
        try:
            with self.signals.abortable() if self.signals is not None else contextlib.nullcontext():
                files = self._generate(batch, todo)
        except Exception as err:  # a control that raises: isolate it, the others go on
            if len(batch) == 1 or batch[0].group:  # a group only makes sense as a whole
                summary.failed += [(u.line, u.stem, _cap(f"{type(err).__name__}: {err}")) for u in todo]
                self._tick(len(todo))
                return
            for u in todo:
                self.run([u], summary)
            return
        self.flush()
        self._writing = self._writer.submit(self._write, files, summary)

    def _generate(self, batch: list[Unit], todo: list[Unit]) -> list[tuple[Unit, Any, Any, dict[str, Any]]]:
        """The whole batch is computed again (so pixels never depend on what was done before);
        returns (unit, image, map grid or None, sidecar) of the missing images."""
        from .visualize import map_grid

        s = batch[0].settings
        base = batch[0].base
        controls, store = build_controls(s["controls"], s["maps"], base)
        common = dict(steps=s["steps"], guidance=s["guidance"], negative_prompt=s["negative_prompt"])
        if "image" in s:  # real-image edit: the source (reconstruction) and its targets from the inverted image
            if common["negative_prompt"] is None:
                del common["negative_prompt"]
            result = self.pipe.edit(_resolve(base, s["image"]), batch[0].prompt, [u.prompt for u in batch[1:]],
                                    control=controls[0], controls=controls[1:], **common)
        elif "references" in s:  # IR-Diffusion: references, then the scene
            from .methods.ir_diffusion import ir_diffusion

            refs = s["references"]
            photos = [_resolve(base, name) for name in refs["images"]] if "images" in refs else None
            result = ir_diffusion(self.pipe, refs["prompts"], batch[-1].prompt, refs["subjects"],
                                  target_boxes=refs.get("boxes"), reference_images=photos, seed=batch[-1].seed,
                                  height=s["height"], width=s["width"], control_options=refs["options"], **common)
        else:
            layout = group_layout(self.pipe, batch, s["guidance"]) if batch[0].group else None
            result = self.pipe.generate(
                [u.prompt for u in batch], controls=controls, seed=[u.seed for u in batch], height=s["height"],
                width=s["width"], layout=layout, **common,
            )
        options = [{"name": c.name, **c.options()} for c in controls]
        wanted = {u.key for u in todo}
        files = []
        for i, u in enumerate(batch):
            if u.key not in wanted:
                continue
            grid = map_grid(store.word_maps(i), result.images[i]) if store is not None else None
            sidecar = {
                SIDECAR_TAG: u.key,
                "image": f"{u.stem}.png",
                "maps_file": f"{u.stem}.maps.png" if grid is not None else None,
                "model": self.model,
                "family": self.pipe.family.name,
                "prompt": u.prompt,
                "negative_prompt": s["negative_prompt"],
                "seed": u.seed,
                "steps": s["steps"],
                "guidance": s["guidance"],
                "height": s["height"],
                "width": s["width"],
                "controls": options,
                "controls_spec": s["controls"],
                "inputs": {k: s[k] for k in ("image", "references", "files") if k in s} or None,
                "batch_size": len(batch),
                "group": {"id": u.group, "role": u.role, "prompts": [b.prompt for b in batch]} if u.group else None,
                "job": {"line": u.line, "id": u.job_id},
                "versions": self.versions,
            }
            files.append((u, result.images[i], grid, sidecar))
        return files

    def _write(self, files: list[tuple[Unit, Any, Any, dict[str, Any]]], summary: Summary) -> None:
        """Maps grid, PNG, then sidecar (the completion mark, with the PNGs' sha256), then the manifest line."""
        for u, image, grid, sidecar in files:
            try:
                if grid is not None:
                    sidecar["maps_sha256"] = _write_png(self.out / sidecar["maps_file"], grid)
                sidecar["png_sha256"] = _write_png(self.out / sidecar["image"], image)
                _write_atomic(self.out / f"{u.stem}.json", json.dumps(sidecar, indent=2, default=str))
                append_manifest(self.out, _manifest_row(sidecar))
                summary.done += 1
            except Exception as err:  # disk full, permissions: reported, the run goes on
                summary.failed.append((u.line, u.stem, _cap(f"writing failed: {type(err).__name__}: {err}")))
            self._tick(1)

    def _tick(self, n: int) -> None:
        if self.progress is not None and n:
            self.progress.update(n)


def _write_png(path: Path, image: Any) -> str:
    """`image` as a PNG at `path`, written atomically (`_write_bytes`); returns the sha256 of its bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    _write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def run_batch(
    jobs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    pipe: Any = None,
    batch_size: int = 1,
    overrides: dict[str, Any] | None = None,
    strict: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    log: Any = None,
    threads: int | str | None = None,
) -> Summary:
    """Run a job file into `out` (resuming what is there); returns this run's `Summary`.

    `threads`: CPU threads per process (None: leave torch's setting; "auto": the command line's policy,
    one thread for a small model on the CPU, see `attnedit.cli.cpu_threads`).

    Under `accelerate launch` each process takes its share of the batches; every process returns
    the merged summary. `pipe` reuses a loaded `EditPipeline` (single process only). `overrides`
    are the command-line values by name (steps, guidance, height, width, negative_prompt, seeds).
    Raises `OutputBusy` when another run holds `out`. SIGTERM / SIGINT (main thread) end the run
    early with `Summary.interrupted` set: the batch in flight is abandoned, written images stay.
    """
    from .pipeline import DEFAULT_MODEL, load

    validate.integer("batch_size", batch_size, 1)
    check_overrides(overrides)
    log = log or sys.stderr
    start = time.perf_counter()
    state = _distributed_state()
    main = state.is_main_process
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give an output folder")
    model_name = model or (file_model(jobs) if pipe is None else getattr(pipe, "model_name", None)) or DEFAULT_MODEL
    if pipe is None:  # a given pipe must already carry the file's concepts
        pipe = load(model_name, device=device or state.device, dtype=dtype, **_load_options(jobs))
    if threads is not None:
        from .cli import cpu_threads

        cpu_threads(pipe, None if threads == "auto" else threads)
    the_plan = plan(jobs, pipe, overrides, model_name)
    summary = Summary(invalid=the_plan.problems, duplicates=the_plan.duplicates)
    if main:
        for p in the_plan.problems:
            print(f"{jobs}:{p.line}: {p.message}" + ("" if strict else " (skipped)"), file=log)
        for p in the_plan.warnings:
            print(f"{jobs}:{p.line}: warning: {p.message}", file=log)
    if strict and the_plan.problems:
        summary.seconds = time.perf_counter() - start
        return summary
    lock = _lock_output(out, state)  # one run per folder: the main process locks it for every process
    try:
        with StopSignals() as signals:
            merged = _run_locked(the_plan, out, pipe, model_name, batch_size, strict, progress, state, signals)
    finally:
        if lock is not None:
            lock.release()
    merged.invalid, merged.duplicates = the_plan.problems, the_plan.duplicates
    merged.seconds = time.perf_counter() - start
    if merged.interrupted and main:
        print(f"attnedit batch: stopped by {signal.Signals(merged.interrupted).name}: the batch in flight was "
              f"abandoned, the {merged.done} image(s) written by this run are complete; rerun the same command to "
              "resume", file=log)
    return merged


def _complete_keys(units: Sequence[Unit], out: Path, state: Any) -> set[str]:
    """Keys of the images already complete and intact in `out` (`is_complete`: their bytes are read once,
    by the main process, and the answer shared with the others)."""
    keys = sorted(u.key for u in units if is_complete(out, u)) if state.is_main_process else None
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        keys = broadcast_object_list([keys], from_process=0)[0]
    return set(keys or ())


def _lock_output(out: Path, state: Any) -> OutputLock | None:
    """The main process takes the folder's lock; every process learns whether it got it."""
    lock, busy = None, None
    if state.is_main_process:
        try:
            lock = OutputLock(out).acquire()
        except OutputBusy as err:
            busy = str(err)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        busy = broadcast_object_list([busy], from_process=0)[0]
    if busy is not None:
        raise OutputBusy(busy)
    return lock


def _run_locked(the_plan: Plan, out: Path, pipe: Any, model_name: str, batch_size: int, strict: bool,
                progress: bool, state: Any, signals: StopSignals) -> Summary:
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    if main:
        recover(out)
    state.wait_for_everyone()
    batches = make_batches(the_plan.units, batch_size)
    complete = _complete_keys(the_plan.units, out, state)
    pending = [b for b in batches if not all(u.key in complete for u in b)]
    state.wait_for_everyone()  # every process has read the same state before anything is written
    local = Summary()
    with state.split_between_processes(pending) as mine:
        bar = _progress_bar(sum(len(b) for b in mine), rank, world, progress)
        with Runner(pipe, out, model_name, bar, signals, complete) as runner:
            for batch in mine:
                if signals.received is not None:
                    break
                try:
                    runner.run(batch, local)
                except Interrupted:
                    break
                if strict and local.failed:
                    break
        # leaving the Runner waited for the writer: every image handed to it is on disk
        if bar is not None:
            bar.close()
    if signals.received is not None:  # no collective step: the other processes may be stopping too
        local.interrupted = signals.received
        return local
    if main:  # batches finished before this run: counted once, not by every process
        local.skipped += sum(len(b) for b in batches) - sum(len(b) for b in pending)
    merged = _gather(local, state)
    if main:
        rebuild_manifest(out, the_plan.units)
    state.wait_for_everyone()
    return merged


def _progress_bar(total: int, rank: int, world: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"batch [{rank + 1}/{world}]", unit="img", position=rank, dynamic_ncols=True,
                file=sys.stderr, leave=True)


def _gather(local: Summary, state: Any) -> Summary:
    """Sum the summaries of every process (each process gets the total)."""
    if state.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    merged = Summary()
    for done, skipped, failed in gather_object([(local.done, local.skipped, local.failed)]):
        merged.done += done
        merged.skipped += skipped
        merged.failed += [tuple(f) for f in failed]
    return merged


def print_summary(summary: Summary, jobs: str, log: Any = None) -> None:
    log = log or sys.stdout
    print(f"attnedit batch: {summary.done} done, {summary.skipped} skipped (already complete), "
          f"{len(summary.failed)} failed, {len(summary.invalid)} invalid job line(s) "
          + (f"({summary.duplicates} duplicate image(s) made once) " if summary.duplicates else "")
          + f"in {summary.seconds:.1f}s"
          + (f"; stopped early by {signal.Signals(summary.interrupted).name}" if summary.interrupted else ""),
          file=log)
    for line, stem, reason in summary.failed:
        print(f"  failed {jobs}:{line} {stem}: {reason}", file=log)
    for p in summary.invalid:
        print(f"  invalid {jobs}:{p.line}: {p.message}", file=log)


# ----------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> None:
    from .paths import DEFAULT_MODEL

    p = subparsers.add_parser(
        "batch", help="run a JSONL/YAML job file (resumable; `accelerate launch -m attnedit batch` for many GPUs)",
        description="\n\n".join(__doc__.split("\n\n")[1:5]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("jobs", help="job file: .jsonl (one job per line) or .yaml/.yml")
    p.add_argument("--out", default=None, help="output folder (PNG + JSON sidecar per image, manifest.jsonl); one "
                   "run at a time: a second run into a folder in use is refused")
    p.add_argument("--model", default=None, help=f"model for every job (else defaults.model, else {DEFAULT_MODEL})")
    p.add_argument("--validate", action="store_true", help="check every job line and report problems; generate nothing")
    p.add_argument("--strict", action="store_true", help="stop at the first bad job line or failed image")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (jobs with equal settings)")
    p.add_argument("--device", default=None, help="device (default: accelerate's per-process device)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--steps", type=int, default=None, help="steps for jobs that do not set them")
    p.add_argument("--guidance", type=float, default=None, help="guidance for jobs that do not set it")
    p.add_argument("--height", type=int, default=None,
                   help="image height for EVERY job: overrides the job's and the defaults' size (an edit job, "
                        "sized by its image, is refused with it)")
    p.add_argument("--width", type=int, default=None,
                   help="image width for EVERY job: overrides the job's and the defaults' size (an edit job, "
                        "sized by its image, is refused with it)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seeds", type=int, default=None, help="images per prompt (seeds 0..N-1) for jobs without seeds")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: 1 for small models such as the bundled ones, else "
                        "torch's; CPU sums depend on it: fix it to compare runs bit for bit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    """Exit status: 0 all made, 1 a failed image or a bad line, 2 a bad argument / --strict with bad lines
    / the output folder busy, 128 + signal when stopped by SIGTERM (143) or SIGINT (130)."""
    overrides = {"steps": args.steps, "guidance": args.guidance, "height": args.height, "width": args.width,
                 "negative_prompt": args.negative_prompt, "seeds": args.seeds}
    _check_args(args, overrides)
    if args.validate:
        return _validate(args, overrides)
    if args.out is None or not str(args.out).strip():
        raise ValueError("--out is required: the output folder (or use --validate)")
    from .cli import quiet_loading

    quiet_loading()
    try:
        summary = run_batch(args.jobs, args.out, model=args.model, batch_size=args.batch_size, overrides=overrides,
                            strict=args.strict, device=args.device, dtype=args.dtype, progress=not args.no_progress,
                            threads=args.threads if args.threads is not None else "auto")
    except OutputBusy as err:
        if _distributed_state().is_main_process:
            print(f"attnedit batch: error: {err}", file=sys.stderr)
        return 2
    if _distributed_state().is_main_process:
        print_summary(summary, args.jobs)
    if summary.interrupted:
        return summary.exit_status
    if args.strict and summary.invalid:
        return 2
    return summary.exit_status


def _check_args(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """Every flag checked before a model is loaded (the job file's values are checked by `plan`)."""
    check_overrides(overrides)
    validate.integer("--batch-size", args.batch_size, 1)
    if args.threads is not None:
        validate.integer("--threads", args.threads, 1, 4096)
    if args.dtype is not None:
        validate.choice("--dtype", args.dtype, validate.DTYPES)
    if args.device is not None:
        validate.device(args.device)
    if args.model is not None:
        validate.text("--model", args.model)


def _validate(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from .cli import quiet_loading
    from .pipeline import DEFAULT_MODEL, load

    quiet_loading()
    model = args.model or file_model(args.jobs) or DEFAULT_MODEL
    pipe = load(model, device=args.device or "cpu", dtype=args.dtype, **_load_options(args.jobs))
    result = plan(args.jobs, pipe, overrides, model)
    lines = [(p.line, "", p.message) for p in result.problems] + [(p.line, "warning: ", p.message)
                                                                   for p in result.warnings]
    for line, kind, message in sorted(lines, key=lambda x: x[0]):
        print(f"{args.jobs}:{line}: {kind}{message}")
    print(f"{result.jobs} job(s), {len(result.units)} image(s), {len(result.problems)} problem(s)"
          + (f", {len(result.warnings)} warning(s)" if result.warnings else "")
          + (f", {result.duplicates} duplicate image(s) merged" if result.duplicates else ""))
    return 1 if result.problems else 0
