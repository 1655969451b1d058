"""From a job file to units: each job checked (as the Python API checks its values, and with a model as the
run would) and expanded into one unit per image, with its content key; units grouped into batches."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from .. import validate
from ..validate import InputError, short
from .data import DEFAULT_KEYS, ID_MAX, SEEDS_COUNT_MAX, SIZE_FAR, Entry, Plan, Problem, Unit, _close
from .files import file_concepts, file_digest, read_jobs
from .kinds import build_controls, control_specs, cross_sample, job_keys, kind_of, kinds, load_methods, spec_files

_SLUG_RE = re.compile(r"[^A-Za-z0-9]+")


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
        ident = f"{result.model}+concepts:{file_digest(concepts)}"
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
    valid = job_keys()
    unknown = [k for k in job if k not in valid]
    if unknown:
        k = unknown[0]
        hint = (" (the model is chosen once per run: --model or defaults)" if k == "model" else
                " (concepts are loaded with the model, once per run: put them in defaults)" if k == "concepts" else
                _close(k, valid))
        raise ValueError(f"unknown key {short(k)}{hint}; valid keys: {', '.join(valid)}")
    kind = kind_of(job)
    for other in kinds():
        stray = [k for k in other.keys if k in job] if other is not kind else []
        if stray:
            raise ValueError(other.stray(stray[0]))
    kind.check_job(job, cli)
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
    seeds = list(kind.fixed_seeds) if kind.fixed_seeds is not None else _seeds(spec)
    negative = spec.get("negative_prompt")
    if negative is not None:
        validate.text("negative_prompt", negative, empty=True)
    maps = spec.get("maps", False)
    if not (isinstance(maps, bool) or (isinstance(maps, list) and all(isinstance(w, str) for w in maps))):
        raise InputError("maps", maps, "true/false or a list of words")
    together = kind.together if kind.together is not None else spec.get("together", False)
    validate.flag("together", together)
    if together and len(prompts) < 2 and kind.together is None:
        raise ValueError("together needs at least two prompts (the first is the source of the others)")
    specs = kind.default_controls(control_specs(spec.get("controls")))
    files: dict[str, str] = {}
    for i, s in enumerate(specs):
        spec_files(s, base, f"controls[{i}]", files)  # every file named is there and readable
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
    prompts = kind.expand(job, prompts, settings, pipe, base, files)
    if files:
        settings["files"] = files
    if pipe is not None:
        kind.check_with_model(pipe, prompts, settings, controls, together)
    units = []
    pairs = [(pi, seed) for seed in seeds for pi in range(len(prompts))] if together else [
        (pi, seed) for pi in range(len(prompts)) for seed in seeds]
    roles = kind.roles(len(prompts)) if together else []
    for pi, seed in pairs:
        prompt = prompts[pi]
        ident = {"model": model, "prompt": prompt, "seed": seed, **settings}
        group, role = None, "plain"
        if together:
            ident["group"] = prompts
            group = _digest({"model": model, "prompts": prompts, "seed": seed, **settings})
            role = roles[pi]
        key = _digest(ident)
        name = job_id + (f"-p{pi}" if len(prompts) > 1 else "") if job_id else _slug(prompt)
        units.append(Unit(entry.line, job_id, prompt, seed, settings, key, f"{name}-s{seed}-{key}", group, role,
                          base, kind.name))
    return units


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


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
        alone = any(cross_sample(s) for s in members[0].settings["controls"])
        size = 1 if alone else batch_size
        batches += [members[i : i + size] for i in range(0, len(members), size)]
    order = {u.key: i for i, u in enumerate(units)}
    batches.sort(key=lambda b: order[b[0].key])
    return batches

