"""Multi-subject quality on the testbed: plain vs Attend-and-Excite vs A-STAR vs Bounded Attention.

    python benchmarks/quality_multisubject.py --model shapes-sd --seeds 16 --steps 25 \\
        --out benchmarks/results/quality_multisubject.md

For multi-object prompts of the shapes world ("a red circle and a blue square", three-object
lists) and many seeds, every method generates the same (prompt, seed) images; the testbed
detector reads each image back and three numbers are scored per image:
- object recall: the fraction of requested objects whose shape is found (multiset matching);
- attribute binding: the fraction of requested (shape, colour) pairs found with the right colour;
- layout IoU: for each requested object, the best box IoU of a detection of its shape with the
  box Bounded Attention was given (left / right halves, thirds for three objects); it is scored
  for every method, so plain shows what the boxes alone would get by chance.
Each method is compared with plain on the same images: mean paired difference and its standard
error over seeds (the seed-to-seed noise), so "beats plain" means a difference larger than
about two standard errors. `evaluate(...)` is the function `benchmarks/quality.py` can call.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

import attnedit

SHAPES = ("circle", "square", "triangle", "star", "ring")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
METHODS = ("plain", "A&E", "A-STAR", "Bounded")


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    box: tuple[float, float, float, float]  # normalised x0, y0, x1, y1


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


def make_control(method: str, objects: Sequence[tuple[str, str]]) -> attnedit.Control | None:
    shapes = [s for s, _ in objects]
    if method == "plain":
        return None
    if method == "A&E":
        return attnedit.AttendExcite(words=shapes)
    if method == "A-STAR":
        return attnedit.AStar(words=shapes)
    if method == "Bounded":
        return attnedit.BoundedAttention(boxes=layout_boxes(len(objects)), words=[f"{c} {s}" for s, c in objects])
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(objects: Sequence[tuple[str, str]], found: Sequence[Detection]) -> dict[str, float]:
    """Recall, binding and layout IoU of one image (see the module docstring)."""
    pool = [d.shape for d in found]
    hits = 0
    for s, _ in objects:
        if s in pool:
            pool.remove(s)
            hits += 1
    pairs = [(d.shape, d.colour) for d in found]
    bound = 0
    for obj in objects:
        if obj in pairs:
            pairs.remove(obj)
            bound += 1
    boxes = layout_boxes(len(objects))
    ious = [max([iou(d.box, box) for d in found if d.shape == s] or [0.0]) for (s, _), box in zip(objects, boxes)]
    n = len(objects)
    return {"recall": hits / n, "binding": bound / n, "layout_iou": sum(ious) / n}


def testbed_detector() -> Callable[[object], list[Detection]]:
    """The testbed detector (`attnedit.testbed.detector`), adapted to `Detection` lists."""
    from attnedit.testbed import detector as det

    def detect(image) -> list[Detection]:
        arr = np.asarray(image.convert("RGB"))
        out = []
        for d in det.detect(arr):
            out.append(Detection(str(d.shape), str(d.colour), tuple(float(v) for v in d.box)))
        return out

    return detect


def evaluate(
    pipe: attnedit.EditPipeline,
    *,
    methods: Sequence[str] = METHODS,
    requests: list[list[tuple[str, str]]] | None = None,
    seeds: Sequence[int] = range(16),
    steps: int = 25,
    guidance: float = 7.5,
    detect: Callable[[object], list[Detection]] | None = None,
    batch: int = 8,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, object]]:
    """Score `methods` on `requests` x `seeds`; returns per method the mean metrics and, against
    plain, the paired mean difference with its standard error over seeds."""
    requests = requests if requests is not None else prompts()
    detect = detect or testbed_detector()
    per: dict[str, dict[tuple[int, int], dict[str, float]]] = {m: {} for m in methods}
    seconds: dict[str, float] = {m: 0.0 for m in methods}
    for m in methods:
        for pi, objects in enumerate(requests):
            text = caption(objects)
            t0 = time.perf_counter()
            images = []
            for start in range(0, len(seeds), batch):
                chunk = list(seeds)[start:start + batch]
                # one call per chunk: per-image seeds; guidance is per sample (exact, batched)
                control = make_control(m, objects)
                out = pipe(text, controls=[control] if control else [], seed=chunk, num_images=len(chunk),
                           steps=steps, guidance=guidance)
                images.extend(out.images)
            seconds[m] += time.perf_counter() - t0
            for s, img in zip(seeds, images):
                per[m][(pi, s)] = score(objects, detect(img))
        if log:
            log(f"{m}: {len(requests) * len(seeds)} images in {seconds[m]:.0f} s")
    return summarise(per, seeds, seconds)


def summarise(per, seeds, seconds) -> dict[str, dict[str, object]]:
    metrics = ("recall", "binding", "layout_iou")
    out: dict[str, dict[str, object]] = {}
    for m, scores in per.items():
        row: dict[str, object] = {"images": len(scores), "seconds": seconds.get(m, 0.0)}
        for k in metrics:
            row[k] = statistics.fmean(v[k] for v in scores.values())
            if m != "plain" and "plain" in per:
                # paired difference, averaged per seed; the spread across seeds is the noise
                by_seed = []
                for s in seeds:
                    diffs = [scores[key][k] - per["plain"][key][k] for key in scores if key[1] == s]
                    by_seed.append(statistics.fmean(diffs))
                se = statistics.stdev(by_seed) / math.sqrt(len(by_seed)) if len(by_seed) > 1 else float("nan")
                row[f"{k}_diff"] = statistics.fmean(by_seed)
                row[f"{k}_se"] = se
        out[m] = row
    return out


def table(summary: dict[str, dict[str, object]]) -> str:
    lines = ["| method | images | object recall | attribute binding | layout IoU | s / image |",
             "|---|---|---|---|---|---|"]
    for m, r in summary.items():
        cells = []
        for k in ("recall", "binding", "layout_iou"):
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
    args = ap.parse_args()
    pipe = attnedit.load(args.model)
    requests = prompts(args.pairs, args.triples)
    t0 = time.perf_counter()
    summary = evaluate(pipe, methods=args.methods, requests=requests, seeds=range(args.seeds), steps=args.steps,
                       guidance=args.guidance, log=lambda s: print(s, file=sys.stderr, flush=True))
    text = (f"# Multi-subject quality on {args.model}\n\n"
            f"Command: `python {' '.join(sys.argv)}`\n\n"
            f"{len(requests)} prompts ({args.pairs} pairs, {args.triples} triples) x {args.seeds} seeds, "
            f"{args.steps} steps, CFG {args.guidance}; in brackets: paired difference to plain ± its standard "
            f"error over seeds. Total {time.perf_counter() - t0:.0f} s.\n\n" + table(summary) + "\n")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
