"""Attend-and-Excite's view of a model: the subject peaks its loss reads, step by step, without any update.

    HF_HUB_OFFLINE=1 python benchmarks/ae_peaks.py --model shapes-sd

For one two-object prompt and a few seeds, A&E runs with `scale_factor=0` and no refinement (the images are the
plain model's) and records its loss, 1 - the weakest subject's smoothed peak, at guided steps 0, 5 and 10; for
the shape nouns and the colour words, with the official softmax over the prompt's tokens (`token_mode="prompt"`)
and over the subjects only (`"subjects"`, attnedit's option). A&E's refinement thresholds ask for peaks of 0.5 and
0.8 by the middle of the guided steps; a subject that loses the x100 softmax to another word of its own object
never gets there (`benchmarks/results/quality_multisubject.md`).

    HF_HUB_OFFLINE=1 python benchmarks/ae_peaks.py --model shapes-sd-clip --pairs 24 --seeds 4

With `--pairs N`: A&E's premise on a model, measured. For the N two-object prompts of
`quality_multisubject.py` x seeds (plain images, as above), the weakest shape-noun peak at guided steps 0, 5 and 10
beside what the detector finds in the image: A&E can only help where a neglected image shows a low peak (the
loss it descends) and a complete one a high peak.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-sd")
    ap.add_argument("--prompt", default="a red circle and a blue square")
    ap.add_argument("--nouns", default="circle,square")
    ap.add_argument("--adjectives", default="red,blue")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--pairs", type=int, default=0, help="measure peaks against neglect on this many prompts")
    ap.add_argument("--scale-factor", type=float, default=0.0,
                    help="with --pairs: A&E's step size (0: plain images; 20: the official guidance, peaks read "
                         "before each step's update, images guided)")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.steps < 22:
        ap.error(f"--seeds {args.seeds} (at least 1) / --steps {args.steps} (at least 22: A&E guides the first "
                 "half of the steps and step 10 is reported)")
    torch.set_num_threads(1)
    import attnedit

    pipe = attnedit.load(args.model)
    if args.pairs:
        return peaks_vs_neglect(pipe, args)
    for mode in ("prompt", "subjects"):
        for words in (args.nouns.split(","), args.adjectives.split(",")):
            ae = attnedit.AttendExcite(words=words, token_mode=mode, scale_factor=0.0, thresholds={})
            out = pipe(args.prompt, controls=[ae], seed=list(range(args.seeds)), num_images=args.seeds,
                       steps=args.steps, guidance=args.guidance)
            log = {entry["step"]: entry for entry in out.records["attend_excite"]["guidance"]}
            peaks = {k: [round(1 - v, 3) for v in log[k]["loss"]] for k in (0, 5, 10)}
            print(f"token_mode={mode:<9} subjects {words}: weakest peak per seed at step 0 {peaks[0]}, "
                  f"step 5 {peaks[5]}, step 10 {peaks[10]}")
    return 0


def peaks_vs_neglect(pipe, args) -> int:
    """Weakest noun peak (token_mode "prompt") of complete vs neglected two-object images, plain or guided."""
    import statistics
    import sys
    from pathlib import Path

    import numpy as np

    import attnedit
    from attnedit.testbed.detector import all_present, detect

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality_multisubject as qm

    rows: dict[bool, dict[int, list[float]]] = {True: {0: [], 5: [], 10: []}, False: {0: [], 5: [], 10: []}}
    for objects in qm.prompts(args.pairs, 0):
        text = qm.caption(objects)
        ae = attnedit.AttendExcite(words=[s for s, _ in objects], scale_factor=args.scale_factor,
                                   **({} if args.scale_factor else {"thresholds": {}}))
        out = pipe(text, controls=[ae], seed=list(range(args.seeds)), num_images=args.seeds, steps=args.steps,
                   guidance=args.guidance)
        log = {entry["step"]: entry for entry in out.records["attend_excite"]["guidance"]}
        for i, image in enumerate(out.images):
            complete = all_present(text, detect(np.asarray(image.convert("RGB"))))
            for k in (0, 5, 10):
                rows[complete][k].append(1 - log[k]["loss"][i])
    what = f"A&E-guided images (scale_factor {args.scale_factor:g})" if args.scale_factor else "the plain images"
    print(f"{args.pairs} prompts x {args.seeds} seeds, weakest shape-noun peak (x100 softmax over the prompt's "
          f"tokens, smoothed) of {what}:")
    print("| images | n | step 0 | step 5 | step 10 | share >= 0.8 at step 10 |")
    print("|---|---|---|---|---|---|")
    for complete, label in ((True, "every object present"), (False, "some object missing")):
        r = rows[complete]
        if not r[0]:
            continue
        high = sum(v >= 0.8 for v in r[10]) / len(r[10])
        print(f"| {label} | {len(r[0])} | " + " | ".join(f"{statistics.fmean(r[k]):.3f}" for k in (0, 5, 10))
              + f" | {high:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
