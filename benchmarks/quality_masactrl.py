"""MasaCtrl consistency and inversion round trip on the testbed (shapes-sd + its detector).

    python benchmarks/quality_masactrl.py --model shapes-sd --seeds 16 --steps 25 \\
        --out benchmarks/results/quality_masactrl.md

Consistency: for a source prompt "a {colour} {shape}" and two targets that keep the subject and
add an object ("... and a {c2} {s2}", "... left of a {c2} {s2}"), the same seed is used for the
source and both targets, once with MasaCtrl (default settings) and once independently (no control).
The source image is the same in both arms (MasaCtrl leaves sources untouched), so each target is
compared with the same source. Per target, read back by the testbed detector:
- identity kept: the target has a detection of the source subject (shape and colour) whose box
  overlaps the source's detection with IoU >= 0.5 (same object, same place and size);
- subject pixels: mean |source - target| (0..255) inside the source subject's box (lower = closer);
- prompt followed: the added object (shape and colour) is detected in the target.
Differences MasaCtrl - independent are paired by (request, seed); ± is the standard error over seeds.

Round trip: world images are inverted (DDIM, prompt = caption, guidance 1) and sampled back with
the same prompt; the error is the mean |input - output| in pixels, next to the VAE-only round trip
(the floor any inversion can reach), plus whether the detector reads the same objects back.
`consistency(...)` and `round_trip(...)` are the functions `benchmarks/quality.py` can call.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

import attnedit

SHAPES = ("circle", "square", "triangle", "star", "ring")
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    box: tuple[float, float, float, float]  # normalised x0, y0, x1, y1


def testbed_detector() -> Callable[[object], list[Detection]]:
    """The testbed detector (`attnedit.testbed.detector.detect`), adapted to `Detection` lists."""
    from attnedit.testbed import detector as det

    def detect(image) -> list[Detection]:
        arr = np.asarray(image.convert("RGB"))
        return [Detection(str(d.shape), str(d.colour), tuple(float(v) for v in d.box)) for d in det.detect(arr)]

    return detect


def requests(n: int = 12, seed: int = 0) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Deterministic (subject, added object) pairs, (shape, colour) each, distinct shapes and colours."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s1, s2 = rng.choice(SHAPES, size=2, replace=False)
        c1, c2 = rng.choice(COLOURS, size=2, replace=False)
        out.append(((str(s1), str(c1)), (str(s2), str(c2))))
    return out


def prompts_for(subject: tuple[str, str], added: tuple[str, str]) -> tuple[str, list[str]]:
    (s1, c1), (s2, c2) = subject, added
    src = f"a {c1} {s1}"
    return src, [f"{src} and a {c2} {s2}", f"{src} left of a {c2} {s2}"]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box_pixels(image, box: Sequence[float]) -> np.ndarray:
    arr = np.asarray(image.convert("RGB")).astype(np.float32)
    h, w = arr.shape[:2]
    x0, y0 = int(box[0] * w), int(box[1] * h)
    x1, y1 = max(x0 + 1, math.ceil(box[2] * w)), max(y0 + 1, math.ceil(box[3] * h))
    return arr[y0:y1, x0:x1]


def score_pair(subject, added, src_img, tgt_img, src_found, tgt_found) -> dict[str, float] | None:
    """Scores of one (source, target) pair; None when the source itself lacks the subject."""
    src_det = [d for d in src_found if (d.shape, d.colour) == subject]
    if not src_det:
        return None
    ref = max(src_det, key=lambda d: (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]))
    same = [d for d in tgt_found if (d.shape, d.colour) == subject]
    kept = float(any(iou(d.box, ref.box) >= 0.5 for d in same))
    diff = float(np.abs(_box_pixels(src_img, ref.box) - _box_pixels(tgt_img, ref.box)).mean())
    followed = float(any((d.shape, d.colour) == added for d in tgt_found))
    return {"identity": kept, "subject_l1": diff, "prompt": followed}


def consistency(
    pipe: attnedit.EditPipeline,
    *,
    pairs: list | None = None,
    seeds: Sequence[int] = range(16),
    steps: int = 25,
    guidance: float = 5.0,
    detect: Callable[[object], list[Detection]] | None = None,
    control_options: dict | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, object]]:
    """MasaCtrl vs independent generation (see the module docstring); returns a summary per arm."""
    from attnedit.methods.masactrl import MasaCtrl, consistent

    pairs = pairs if pairs is not None else requests()
    detect = detect or testbed_detector()
    per: dict[str, dict[tuple, dict[str, float]]] = {"independent": {}, "MasaCtrl": {}}
    seconds = {"independent": 0.0, "MasaCtrl": 0.0}
    skipped = 0
    for pi, (subject, added) in enumerate(pairs):
        src, targets = prompts_for(subject, added)
        for seed in seeds:
            t0 = time.perf_counter()
            masa = consistent(pipe, src, targets, seed=int(seed), control=MasaCtrl(**(control_options or {})),
                              steps=steps, guidance=guidance).images
            t1 = time.perf_counter()
            plain = pipe.generate([src, *targets], seed=[int(seed)] * 3, steps=steps, guidance=guidance).images
            t2 = time.perf_counter()
            seconds["MasaCtrl"] += t1 - t0
            seconds["independent"] += t2 - t1
            src_found = detect(masa[0])
            for arm, images in (("MasaCtrl", masa), ("independent", plain)):
                for ti, tgt in enumerate(images[1:]):
                    s = score_pair(subject, added, masa[0], tgt, src_found, detect(tgt))
                    if s is None:
                        skipped += arm == "MasaCtrl"
                        continue
                    per[arm][(pi, int(seed), ti)] = s
        if log:
            log(f"request {pi + 1}/{len(pairs)} ({src}) done")
    out = summarise(per, seeds, seconds)
    out["MasaCtrl"]["skipped_no_source_subject"] = skipped
    return out


def summarise(per, seeds, seconds) -> dict[str, dict[str, object]]:
    metrics = ("identity", "subject_l1", "prompt")
    out: dict[str, dict[str, object]] = {}
    for arm, scores in per.items():
        row: dict[str, object] = {"pairs": len(scores), "seconds": seconds.get(arm, 0.0)}
        for k in metrics:
            row[k] = statistics.fmean(v[k] for v in scores.values()) if scores else float("nan")
        if arm != "independent":
            base = per["independent"]
            for k in metrics:
                by_seed = []
                for s in seeds:
                    d = [scores[key][k] - base[key][k] for key in scores if key[1] == int(s) and key in base]
                    if d:
                        by_seed.append(statistics.fmean(d))
                row[f"{k}_diff"] = statistics.fmean(by_seed) if by_seed else float("nan")
                row[f"{k}_se"] = (statistics.stdev(by_seed) / math.sqrt(len(by_seed))) if len(by_seed) > 1 \
                    else float("nan")
        out[arm] = row
    return out


def round_trip(
    pipe: attnedit.EditPipeline,
    *,
    n_images: int = 16,
    steps: int = 25,
    world_seed: int = 12345,
    prompt: str | None = None,
    detect: Callable[[object], list[Detection]] | None = None,
) -> dict[str, float]:
    """Invert world images and sample them back; pixel error vs the VAE-only floor, objects kept."""
    from PIL import Image

    from attnedit.inversion import ddim_scheduler, encode_image, invert
    from attnedit.testbed.world import World

    world = World(world_seed)
    errs, floors, kept = [], [], []
    for i in range(n_images):
        scene = world.scene(i)
        img = Image.fromarray(world.image(i))
        text = scene.caption if prompt is None else prompt
        inv = invert(pipe, img, prompt=text, steps=steps)
        saved = pipe.pipe.scheduler
        if pipe.family.arch == "unet":
            pipe.pipe.scheduler = ddim_scheduler(pipe)
        try:
            out = pipe.pipe(text, latents=inv.latent.clone(), num_inference_steps=steps, guidance_scale=1.0,
                            height=inv.height, width=inv.width, output_type="pil", **pipe.call_defaults()).images[0]
        finally:
            pipe.pipe.scheduler = saved
        with torch.no_grad():
            lat = encode_image(pipe, img)
            vae = pipe.pipe.vae
            rec = vae.decode(lat / vae.config.scaling_factor).sample[0]
        rec = ((rec.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().cpu().numpy()
        x = np.asarray(img).astype(np.float32)
        errs.append(float(np.abs(np.asarray(out).astype(np.float32) - x).mean()))
        floors.append(float(np.abs(rec - x).mean()))
        if detect is not None:
            want = sorted((o.shape, o.colour) for o in scene.objects)
            got = sorted((d.shape, d.colour) for d in detect(out))
            kept.append(float(want == got))
    row = {"images": n_images, "steps": steps, "l1": statistics.fmean(errs), "l1_vae_floor": statistics.fmean(floors),
           "l1_max": max(errs)}
    if kept:
        row["objects_read_back"] = statistics.fmean(kept)
    return row


def table(summary: dict[str, dict[str, object]], trip: dict[str, float] | None = None) -> str:
    lines = ["| arm | pairs | identity kept | subject L1 (0-255) | prompt followed | s / source |",
             "|---|---|---|---|---|---|"]
    for arm, r in summary.items():
        cells = []
        for k, fmt in (("identity", ".3f"), ("subject_l1", ".1f"), ("prompt", ".3f")):
            cell = format(r[k], fmt)
            if f"{k}_diff" in r:
                cell += f" ({format(r[f'{k}_diff'], '+' + fmt)} ± {format(r[f'{k}_se'], fmt)})"
            cells.append(cell)
        per = r["seconds"] / max(1, r["pairs"] / 2)
        lines.append(f"| {arm} | {r['pairs']} | " + " | ".join(cells) + f" | {per:.2f} |")
    if trip:
        lines += ["", "| round trip | images | steps | L1 (0-255) | VAE-only L1 | max L1 | objects read back |",
                  "|---|---|---|---|---|---|---|",
                  f"| DDIM inversion | {trip['images']} | {trip['steps']} | {trip['l1']:.2f} | "
                  f"{trip['l1_vae_floor']:.2f} | {trip['l1_max']:.2f} | "
                  f"{trip.get('objects_read_back', float('nan')):.3f} |"]
    skipped = summary.get("MasaCtrl", {}).get("skipped_no_source_subject")
    if skipped:
        lines.append(f"\n{skipped} (source, target) pairs skipped: the detector found no subject in the source.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-sd")
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25, help="the testbed's own default (attnedit.json)")
    ap.add_argument("--guidance", type=float, default=5.0, help="the testbed's own default (attnedit.json)")
    ap.add_argument("--round-trip-images", type=int, default=16)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="write the markdown table here too")
    args = ap.parse_args()
    pipe = attnedit.load(args.model, device=args.device)
    detect = testbed_detector()
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    summary = consistency(pipe, pairs=requests(args.requests), seeds=range(args.seeds), steps=args.steps,
                          guidance=args.guidance, detect=detect, log=log)
    trip = round_trip(pipe, n_images=args.round_trip_images, steps=args.steps, detect=detect) \
        if args.round_trip_images else None
    text = table(summary, trip)
    cmd = " ".join(["python", *sys.argv])
    text = f"{text}\n\nCommand: `{cmd}`\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
