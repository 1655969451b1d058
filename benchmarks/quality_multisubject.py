"""Multi-subject quality on the testbed: plain vs Attend-and-Excite vs A-STAR vs Bounded Attention.

    python benchmarks/quality_multisubject.py --model shapes-sd --seeds 16 --steps 25 \\
        --out benchmarks/results/quality_multisubject.md

For multi-object prompts of the shapes world ("a red circle and a blue square", three-object
lists) and many seeds, every method generates the same (prompt, seed) images; the testbed
detector reads each image back and three numbers are scored per image:
- object recall: the share of requested objects present with the right shape and colour
  (`detector.object_recall`); shape recall: the share whose shape is present in any colour (the
  neglect A&E targets);
- attribute binding: of the requested shapes that appear, the share drawn in the requested
  colour (`detector.attribute_binding`; undefined when none appears);
- layout IoU: the mean IoU between each requested object and the box Bounded Attention was given
  (left / right halves, thirds for three objects; `detector.layout_iou`); scored for every method,
  so plain shows what the boxes get by chance.
Each method is compared with plain on the same images: mean paired difference and its standard
error over seeds (the seed-to-seed noise), so "beats plain" means a difference larger than
about two standard errors. `evaluate(...)` is the function `benchmarks/quality.py` can call.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

import attnedit

SHAPES = ("circle", "square", "triangle", "star", "ring")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
METHODS = ("plain", "A&E", "A-STAR", "Bounded", "diffusers A&E")


def prompts(n_pairs: int = 12, n_triples: int = 6, seed: int = 0) -> list[list[tuple[str, str]]]:
    """Deterministic multi-object requests: distinct shapes and distinct colours per prompt."""
    rng = np.random.default_rng(seed)
    out: list[list[tuple[str, str]]] = []
    for n, count in ((2, n_pairs), (3, n_triples)):
        combos = list(itertools.combinations(SHAPES, n))
        for _ in range(count):
            shapes = list(combos[int(rng.integers(len(combos)))])
            rng.shuffle(shapes)
            colours = rng.choice(COLOURS, size=n, replace=False)
            out.append([(s, str(c)) for s, c in zip(shapes, colours)])
    return out


def caption(objects: Sequence[tuple[str, str]]) -> str:
    nouns = [f"a {c} {s}" for s, c in objects]
    return nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " and " + nouns[-1]


def layout_boxes(n: int) -> list[list[float]]:
    """Side-by-side boxes: halves for two objects, thirds for three (with margins)."""
    w = 1.0 / n
    return [[i * w + 0.05 * w * 2, 0.2, (i + 1) * w - 0.05 * w * 2, 0.8] for i in range(n)]


SUBJECTS = ("shape", "phrase")


def make_control(method: str, objects: Sequence[tuple[str, str]], options: dict | None = None,
                 subjects: str = "shape") -> attnedit.Control | None:
    """The method's control for one request; `options` are extra keyword arguments (a sweep's step size).

    `subjects` = what A&E and A-STAR guide: "shape" (the noun, as the papers do) or "phrase" ("red circle":
    the guided map is the phrase token with the highest peak, on the testbed often the colour word).
    """
    if subjects not in SUBJECTS:
        raise ValueError(f"subjects must be one of {', '.join(SUBJECTS)}, got {subjects!r}")
    shapes = [s for s, _ in objects] if subjects == "shape" else [f"{c} {s}" for s, c in objects]
    kw = dict(options or {})
    if method == "plain":
        if kw:
            raise ValueError(f"plain takes no control arguments, got {sorted(kw)}")
        return None
    if method == "A&E":
        return attnedit.AttendExcite(words=shapes, **kw)
    if method == "A-STAR":
        return attnedit.AStar(words=shapes, **kw)
    if method == "diffusers A&E":  # not an attnedit control: `evaluate` runs diffusers' own pipeline
        return None
    if method == "Bounded":
        return attnedit.BoundedAttention(boxes=layout_boxes(len(objects)), words=[f"{c} {s}" for s, c in objects],
                                         **kw)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def diffusers_ae_pipeline(base):
    """diffusers' `StableDiffusionAttendAndExcitePipeline` sharing the components of the stock pipeline `base`."""
    import inspect

    from diffusers import StableDiffusionAttendAndExcitePipeline

    wanted = inspect.signature(StableDiffusionAttendAndExcitePipeline.__init__).parameters
    ae = StableDiffusionAttendAndExcitePipeline(**{k: v for k, v in base.components.items() if k in wanted})
    ae.set_progress_bar_config(disable=True)
    return ae


def diffusers_ae_supported(pipe: attnedit.EditPipeline) -> bool:
    """diffusers' A&E pipeline exists for Stable Diffusion 1.x/2.x only (shapes-sd, shapes-sd-clip)."""
    from diffusers import StableDiffusionPipeline

    return isinstance(pipe.pipe, StableDiffusionPipeline)


def diffusers_ae(pipe: attnedit.EditPipeline, text: str, objects: Sequence[tuple[str, str]], seeds: list[int],
                 steps: int, guidance: float, options: dict | None = None) -> list:
    """Images of diffusers' `StableDiffusionAttendAndExcitePipeline` on the model's components, from the same
    seeded initial latents as attnedit's generations, so its difference to plain is paired like the others'.
    The reference that shows the testbed is fair to A&E: it is the A&E users run outside attnedit.

    Its defaults (16x16 maps, step size 20, x100 softmax over tokens 1:-1) except the schedule, which diffusers
    fixes for 50 steps (guide steps 0-24, refine at indices 0 / 10 / 20): here, like the paper and attnedit,
    the first half of `steps` is guided and the refinement indices scale with the step count (k * steps / 50);
    `options` (keyword arguments of the pipeline call) override."""
    import torch

    base = pipe.pipe
    ae = diffusers_ae_pipeline(base)
    tokens = base.tokenizer.convert_ids_to_tokens(base.tokenizer(text).input_ids)
    indices = [tokens.index(f"{s}</w>") for s, _ in objects]
    height, width = pipe.default_size()
    latents = pipe.initial_latents(len(seeds), height, width, [torch.Generator().manual_seed(s) for s in seeds])
    schedule = {"max_iter_to_alter": steps // 2,
                "thresholds": {round(k * steps / 50): v for k, v in {0: 0.05, 10: 0.5, 20: 0.8}.items()}}
    saved = base.unet.attn_processors  # diffusers' A&E sets its processors on the shared UNet and keeps them
    try:
        return ae(text, token_indices=indices, latents=latents, num_images_per_prompt=len(seeds), height=height,
                  width=width, num_inference_steps=steps, guidance_scale=guidance,
                  **{**schedule, **(options or {})}).images
    finally:
        base.unet.set_attn_processor(saved)


def score(objects: Sequence[tuple[str, str]], found: list) -> dict[str, float | None]:
    """Metrics of one image with the testbed detector's definitions (`attnedit.testbed.detector`)."""
    from attnedit.testbed import detector as det

    prompt = caption(objects)
    pool = [d.shape for d in found]
    shapes = 0
    for s, _ in objects:
        if s in pool:
            pool.remove(s)
            shapes += 1
    return {
        "recall": det.object_recall(prompt, found),
        "shape_recall": shapes / len(objects),
        "binding": det.attribute_binding(prompt, found),
        "layout_iou": det.layout_iou(prompt, [tuple(b) for b in layout_boxes(len(objects))], found),
    }


def testbed_detector() -> Callable[[object], list]:
    """PIL image -> detections of the testbed detector."""
    from attnedit.testbed import detector as det

    return lambda image: det.detect(np.asarray(image.convert("RGB")))


def evaluate(
    pipe: attnedit.EditPipeline,
    *,
    methods: Sequence[str] = METHODS,
    requests: list[list[tuple[str, str]]] | None = None,
    seeds: Sequence[int] = range(16),
    steps: int = 25,
    guidance: float = 7.5,
    detect: Callable[[object], list] | None = None,
    batch: int = 8,
    log: Callable[[str], None] | None = None,
    options: dict[str, dict] | None = None,
    subjects: str = "shape",
) -> dict[str, dict[str, object]]:
    """Score `methods` on `requests` x `seeds`; returns per method the mean metrics and, against
    plain, the paired mean difference with its standard error over seeds. `options` maps a method
    to extra keyword arguments of its control."""
    options = options or {}
    requests = requests if requests is not None else prompts()
    for objects in requests:  # before any image is generated
        check_pair(objects)
    if "diffusers A&E" in methods and not diffusers_ae_supported(pipe):
        raise ValueError(f"'diffusers A&E' runs diffusers' StableDiffusionAttendAndExcitePipeline, which needs a "
                         f"Stable Diffusion 1.x/2.x model, not a {type(pipe.pipe).__name__}; leave it out")
    detect = detect or testbed_detector()
    per: dict[str, dict[tuple[int, int], dict[str, float | None]]] = {m: {} for m in methods}
    drawn: dict[str, dict[tuple[int, int, int], str]] = {m: {} for m in methods}
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    for m in methods:
        for pi, objects in enumerate(requests):
            text = caption(objects)
            t0 = time.perf_counter()
            images = []
            for start in range(0, len(seeds), batch):
                chunk = list(seeds)[start:start + batch]
                # one call per chunk: per-image seeds; guidance is per sample (exact, batched)
                if m == "diffusers A&E":
                    images.extend(diffusers_ae(pipe, text, objects, chunk, steps, guidance, options.get(m)))
                    continue
                control = make_control(m, objects, options.get(m), subjects)
                out = pipe(text, controls=[control] if control else [], seed=chunk, num_images=len(chunk),
                           steps=steps, guidance=guidance)
                images.extend(out.images)
            seconds[m] += time.perf_counter() - t0
            for s, img in zip(seeds, images):
                found = detect(img)
                per[m][(pi, s)] = score(objects, found)
                drawn[m].update(outcomes(pi, s, objects, found))
        if log:
            log(f"{m}: {len(requests) * len(seeds)} images in {seconds[m]:.0f} s")
    summary = summarise(per, seeds, seconds)
    for m, row in summary.items():
        if m != "plain" and "plain" in drawn:
            row["from_plain"] = from_plain(drawn["plain"], drawn[m])
    if "plain" in drawn and len(seeds) > 1:
        summary["plain"]["from_plain"] = from_plain(drawn["plain"], next_seed(drawn["plain"], seeds))
    return summary


def next_seed(drawn: dict[tuple[int, int, int], str], seeds: Sequence[int]) -> dict[tuple[int, int, int], str]:
    """The control for `from_plain`: each object as plain drew it from the next seed (the last seed wraps to the
    first), i.e. what new starting noise alone fixes and breaks."""
    order = list(seeds)
    if len(order) < 2:
        raise ValueError(f"next_seed needs at least 2 seeds, got {order}")
    nxt = dict(zip(order, order[1:] + order[:1]))
    return {(pi, s, i): drawn[(pi, nxt[s], i)] for pi, s, i in drawn}


def check_pair(objects: Sequence[tuple[str, str]]) -> None:
    """The per-object kinds need a two-object request's objects to differ in shape and in colour."""
    if len(objects) == 2 and (objects[0][0] == objects[1][0] or objects[0][1] == objects[1][1]):
        raise ValueError(f"the per-object table needs two objects of different shapes and colours, got {objects}")


def outcomes(pi: int, seed: int, objects: Sequence[tuple[str, str]], found: list) -> dict[tuple[int, int, int], str]:
    """Per requested object of a two-object prompt: present, or how it is missing (`detector.pair_outcome`, whose
    kinds assume the two objects differ in shape and in colour, as `prompts()` makes them)."""
    from attnedit.testbed.detector import pair_outcome

    if len(objects) != 2:
        return {}
    check_pair(objects)
    return {(pi, seed, i): pair_outcome(tuple(obj), objects[1 - i][0], found) for i, obj in enumerate(objects)}


def from_plain(plain: dict, other: dict) -> dict[str, tuple[int, int, int]]:
    """For each way plain drew a requested object (present, or a kind of miss): how many objects, how many of them
    the other method, from the same seed, draws with the right shape and colour, and how many it draws the same
    way as plain (for a miss: missing in the same way, e.g. the same wrong-shape stand-in kind). This is what a
    method fixes, breaks and keeps: A&E is built for the "neither" row (nothing of the object drawn). Empty when
    there are no two-object prompts."""
    from attnedit.testbed.detector import PAIR_MISSES, PRESENT

    counts = {k: [0, 0, 0] for k in (PRESENT, *PAIR_MISSES)}
    for key, kind in plain.items():
        if key in other:
            counts[kind][0] += 1
            counts[kind][1] += other[key] == PRESENT
            counts[kind][2] += other[key] == kind
    if not any(n for n, _, _ in counts.values()):
        return {}
    return {k: (n, hit, same) for k, (n, hit, same) in counts.items()}


def from_plain_table(summary: dict[str, dict[str, object]]) -> str:
    """`from_plain` of every method as one table (empty when there are no two-object prompts). A cell: how many
    of the row's objects the method draws right, and for a miss how many stay missing the same way."""
    from attnedit.testbed.detector import PRESENT

    methods = [m for m, r in summary.items() if r.get("from_plain")]
    if not methods:
        return ""
    kinds = list(summary[methods[0]]["from_plain"])
    label = {"plain": "plain, next seed, draws it"}
    lines = ["| what plain drew for a requested object | objects | "
             + " | ".join(label.get(m, f"{m} draws it") for m in methods)
             + " |", "|---|---|" + "---|" * len(methods)]
    for k in kinds:
        n = summary[methods[0]]["from_plain"][k][0]
        cells = []
        for m in methods:
            total, hit, same = summary[m]["from_plain"][k]
            cell = f"{hit} ({hit / total:.0%})" if total else "-"
            if total and k != PRESENT:
                cell += f"; same miss {same} ({same / total:.0%})"
            cells.append(cell)
        lines.append(f"| {k} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


METRICS = ("recall", "shape_recall", "binding", "layout_iou")


def _mean(values) -> float:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else float("nan")


def summarise(per, seeds, seconds) -> dict[str, dict[str, object]]:
    """Means per method; against plain, the paired difference averaged per seed and its standard
    error across seeds (binding is skipped on images where it is undefined for either method)."""
    out: dict[str, dict[str, object]] = {}
    for m, scores in per.items():
        row: dict[str, object] = {"images": len(scores), "seconds": seconds.get(m, 0.0)}
        for k in METRICS:
            row[k] = _mean(v[k] for v in scores.values())
            if m != "plain" and "plain" in per:
                by_seed = []
                for s in seeds:
                    diffs = [scores[key][k] - per["plain"][key][k] for key in scores
                             if key[1] == s and scores[key][k] is not None and per["plain"][key][k] is not None]
                    if diffs:
                        by_seed.append(statistics.fmean(diffs))
                row[f"{k}_diff"] = statistics.fmean(by_seed) if by_seed else float("nan")
                row[f"{k}_se"] = (statistics.stdev(by_seed) / math.sqrt(len(by_seed))) if len(by_seed) > 1 \
                    else float("nan")
        out[m] = row
    return out


def table(summary: dict[str, dict[str, object]]) -> str:
    lines = ["| method | images | object recall | shape recall (neglect) | attribute binding | layout IoU "
             "| s / image |", "|---|---|---|---|---|---|---|"]
    for m, r in summary.items():
        cells = []
        for k in METRICS:
            cell = f"{r[k]:.3f}"
            if f"{k}_diff" in r:
                cell += f" ({r[f'{k}_diff']:+.3f} ± {r[f'{k}_se']:.3f})"
            cells.append(cell)
        per_image = r["seconds"] / max(r["images"], 1)
        lines.append(f"| {m} | {r['images']} | " + " | ".join(cells) + f" | {per_image:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-sd")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--triples", type=int, default=6)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default=None, help="write the table (markdown) here")
    ap.add_argument("--options", default="{}", help='JSON: method -> extra control arguments, e.g. '
                    '\'{"A&E": {"scale_factor": 60}}\' (for sweeps; the official defaults otherwise)')
    ap.add_argument("--subjects", default="shape", choices=SUBJECTS,
                    help="what A&E / A-STAR guide: the shape noun (papers) or the colour + shape phrase")
    args = ap.parse_args()
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        ap.error(f"--options is not JSON: {err}")
    if not isinstance(options, dict) or any(k not in METHODS or not isinstance(v, dict) for k, v in options.items()):
        ap.error(f"--options maps method names ({', '.join(METHODS)}) to objects of keyword arguments")
    for m, kw in options.items():  # a misspelt argument fails here, before any image is generated
        if m == "diffusers A&E":
            continue  # keyword arguments of diffusers' pipeline call, checked by diffusers
        try:
            make_control(m, [("circle", "red"), ("square", "blue")], kw)
        except (TypeError, ValueError) as err:
            ap.error(f"--options {m}: {err}")
    pipe = attnedit.load(args.model)
    requests = prompts(args.pairs, args.triples)
    t0 = time.perf_counter()
    summary = evaluate(pipe, methods=args.methods, requests=requests, seeds=range(args.seeds), steps=args.steps,
                       guidance=args.guidance, log=lambda s: print(s, file=sys.stderr, flush=True), options=options,
                       subjects=args.subjects)
    opts = (f"; options {json.dumps(options)}" if options else "") + (
        f"; A&E / A-STAR subjects: {args.subjects}" if args.subjects != "shape" else "")
    text = (f"# Multi-subject quality on {args.model}\n\n"
            f"Command: `python {' '.join(sys.argv)}`\n\n"
            f"{len(requests)} prompts ({args.pairs} pairs, {args.triples} triples) x {args.seeds} seeds, "
            f"{args.steps} steps, CFG {args.guidance}{opts}; in brackets: paired difference to plain ± its standard "
            f"error over seeds. Total {time.perf_counter() - t0:.0f} s.\n\n" + table(summary) + "\n")
    moves = from_plain_table(summary)
    if moves:
        text += ("\nTwo-object prompts, per requested object: how plain drew it (`detector.pair_outcome`) and how "
                 "often each method, from the same seed, draws it right (the control: plain itself from the next "
                 "seed, what new starting noise alone fixes and breaks):\n\n" + moves + "\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
