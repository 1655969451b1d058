"""Detector rates of a trained testbed model, with plain diffusers (no attnedit control involved).

    HF_HUB_OFFLINE=1 python benchmarks/testbed_eval.py --model assets/models/shapes-sd --seeds 2
    HF_HUB_OFFLINE=1 python benchmarks/testbed_eval.py --model assets/models/shapes-dit --seeds 2

Single-object prompts: every (colour, shape) pair of the world, ``--seeds`` images each; the sample
counts when the detector finds the requested object (right shape AND colour). Two- and three-object
prompts: captions of the world's "pair" and "triple" styles (world seed 99); a sample counts when all
named objects are present. "exact" also requires nothing else to be detected. Also prints
attribute binding (colour on the right shape), the share of samples where some named object is
missing (neglect) and, for single objects, the rate per shape. Steps, guidance and call arguments default to
the model folder's `attnedit.json`; a FLUX model without a guidance embedding (shapes-dit) gets true CFG
against an empty prompt.
Why plain diffusers: these are the numbers of the model itself, the baseline every
attention-control method is compared against.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from attnedit.testbed.detector import all_present, attribute_binding, detect, object_recall
from attnedit.testbed.world import COLOURS, SHAPES, World, parse_prompt

#: --scheduler choices -> diffusers class names
SCHEDULERS = {"ddim": "DDIMScheduler", "dpmsolver": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}


def call_kwargs(pipe, guidance: float, call: dict) -> dict:
    """Guidance as the pipeline takes it: `guidance_scale`, or true CFG for FLUX without a guidance embedding."""
    transformer = getattr(pipe, "transformer", None)
    if type(pipe).__name__ == "FluxPipeline" and not transformer.config.guidance_embeds:
        return {**call, "true_cfg_scale": guidance}
    return {**call, "guidance_scale": guidance}


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, chunk: int,
             call: dict | None = None) -> list:
    """uint8 images for (prompt, seed) pairs, in chunks (one generator per image: order-independent)."""
    out = []
    kw = call_kwargs(pipe, guidance, call or {})
    for i in range(0, len(prompts), chunk):
        ps, ss = prompts[i:i + chunk], seeds[i:i + chunk]
        gens = [torch.Generator().manual_seed(s) for s in ss]
        if "true_cfg_scale" in kw:
            kw["negative_prompt"] = [""] * len(ps)
        images = pipe(ps, num_inference_steps=steps, generator=gens, height=64, width=64, output_type="np",
                      **kw).images
        out.extend((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return out


def evaluate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, chunk: int,
             call: dict | None = None) -> dict:
    images = generate(pipe, prompts, seeds, steps, guidance, chunk, call)
    found = [detect(im) for im in images]
    present = [all_present(p, f) for p, f in zip(prompts, found)]
    requested = [parse_prompt(p).objects for p in prompts]
    # exact: the detected objects are the requested ones and nothing else (no extra blobs, no unknowns)
    exact = [sorted(d.label for d in f) == sorted(objs) for objs, f in zip(requested, found)]
    recall = [object_recall(p, f) for p, f in zip(prompts, found)]
    binding = [b for b in (attribute_binding(p, f) for p, f in zip(prompts, found)) if b is not None]
    # single-object sets: the rate per requested shape (which shapes a model has not learned yet)
    by_shape = None
    if requested and all(len(objs) == 1 for objs in requested):
        hits: dict[str, list[bool]] = {}
        for objs, ok in zip(requested, present):
            hits.setdefault(objs[0][0], []).append(ok)
        by_shape = {shape: float(np.mean(v)) for shape, v in hits.items()}
    return {"n": len(prompts), "exact": float(np.mean(exact)), "all_present": float(np.mean(present)),
            "object_recall": float(np.mean(recall)),
            "binding": float(np.mean(binding)) if binding else None,
            "neglect": float(np.mean([r < 1.0 for r in recall])), "by_shape": by_shape, "images": images}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/models/shapes-sd")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per single-object prompt (0: skip them)")
    ap.add_argument("--multi", type=int, default=40, help="two- and three-object prompts each (0: skip them)")
    ap.add_argument("--steps", type=int, default=None, help="default: the model's attnedit.json")
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's attnedit.json")
    ap.add_argument("--chunk", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rates here")
    ap.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                    help="sample with this diffusers scheduler (built from the model's config) instead of its own")
    args = ap.parse_args(argv)
    if args.seeds < 0 or args.multi < 0:
        ap.error(f"--seeds {args.seeds} / --multi {args.multi}: counts must be 0 or more")
    torch.set_num_threads(args.threads)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    settings_file = Path(args.model) / "attnedit.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    args.steps = args.steps or int(settings.get("steps", 25))
    args.guidance = args.guidance if args.guidance is not None else float(settings.get("guidance", 5.0))
    call = settings.get("call", {})
    single = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    sets = {"single": ([p for p in single for _ in range(args.seeds)],
                       [k for _ in single for k in range(args.seeds)])}
    for style in ("pair", "triple"):
        world = World(seed=99, style_probs={style: 1.0})
        caps = [world.scene(i).caption for i in range(args.multi)]
        sets[style] = (caps, list(range(args.multi)))
    rows = {}
    for name, (prompts, seeds) in sets.items():
        if not prompts:  # --seeds 0 or --multi 0: nothing to rate (a mean over nothing is NaN)
            continue
        t0 = time.perf_counter()
        res = evaluate(pipe, prompts, seeds, args.steps, args.guidance, args.chunk, call)
        res.pop("images")
        res["seconds"] = round(time.perf_counter() - t0, 1)
        rows[name] = res
        binding = "n/a" if res["binding"] is None else f"{res['binding']:.1%}"
        print(f"{name:<7} n={res['n']:<4} exact {res['exact']:.1%}  "
              f"all named objects present {res['all_present']:.1%}  "
              f"object recall {res['object_recall']:.1%}  binding {binding}  neglect {res['neglect']:.1%}  "
              f"({res['seconds']} s)", flush=True)
        if res["by_shape"]:
            print("        by shape: " + "  ".join(f"{k} {v:.1%}" for k, v in res["by_shape"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "scheduler": type(pipe.scheduler).__name__, "steps": args.steps,
                       "guidance": args.guidance, **rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
