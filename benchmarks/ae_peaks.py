"""Attend-and-Excite's view of a model: the subject peaks its loss reads, step by step, without any update.

    HF_HUB_OFFLINE=1 python benchmarks/ae_peaks.py --model shapes-sd

For one two-object prompt and a few seeds, A&E runs with `scale_factor=0` and no refinement (the images are the
plain model's) and records its loss, 1 - the weakest subject's smoothed peak, at guided steps 0, 5 and 10; for
the shape nouns and the colour words, with the official softmax over the prompt's tokens (`token_mode="prompt"`)
and over the subjects only (`"subjects"`, attnedit's option). A&E's refinement thresholds ask for peaks of 0.5 and
0.8 by the middle of the guided steps; a subject that loses the x100 softmax to another word of its own object
never gets there (`benchmarks/results/quality_multisubject.md`).
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
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.steps < 22:
        ap.error(f"--seeds {args.seeds} (at least 1) / --steps {args.steps} (at least 22: A&E guides the first "
                 "half of the steps and step 10 is reported)")
    torch.set_num_threads(1)
    import attnedit

    pipe = attnedit.load(args.model)
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


if __name__ == "__main__":
    raise SystemExit(main())
