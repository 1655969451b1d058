"""Images per second of `attnedit batch` against a plain loop over the diffusers pipeline.

    python benchmarks/batch_speed.py --model tiny-sd --steps 10 --images 24 --batch-size 8

Same model object, settings, seeds and machine for every variant, measured in one run. Rounds
run every variant back to back (in alternating order) and ratios are taken within a round, then
the median over rounds: load from other processes (a shared machine) drifts slowly, so adjacent
measurements see the same load:

- `diffusers loop`: `pipe(prompt, generator=...)`, one image per call, PNG saved;
- `diffusers batched`: the same with `--batch-size` prompts and generators per call;
- `generate loop`: `EditPipeline.generate` (attnedit's processor, no controls), PNG + sidecar;
- `batch --batch-size 1` / `batch --batch-size B`: `attnedit.batch.run_batch` on a job file with
  the same prompts and seeds (job parsing and checks, sidecars, manifest, resumability included).

The overhead of `batch` is the ratio to the diffusers variant with the same images per call.
Wall-clock time and process CPU time (all threads of this process, so the file-writer thread is
included) are both reported: on a shared, overloaded machine CPU time is the steadier measure of
the work each variant does, wall-clock time what a user waits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a red square and a blue circle",
           "a purple circle above a green square"]


def _plain(pipe, prompts, seeds, steps, guidance, size, per_call, out: Path) -> None:
    import torch

    call = {**pipe.call_defaults()}
    for i in range(0, len(prompts), per_call):
        chunk = list(range(i, min(i + per_call, len(prompts))))
        gens = [torch.Generator().manual_seed(seeds[j]) for j in chunk]
        images = pipe.pipe([prompts[j] for j in chunk], num_inference_steps=steps, guidance_scale=guidance,
                           height=size, width=size, generator=gens, **call).images
        for j, im in zip(chunk, images):
            im.save(out / f"{j}.png")


def _generate_loop(pipe, prompts, seeds, steps, guidance, size, out: Path) -> None:
    for j, (p, s) in enumerate(zip(prompts, seeds)):
        pipe.generate(p, seed=s, steps=steps, guidance=guidance, height=size, width=size).save(out / f"{j}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sd")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--size", type=int, default=None, help="image side (model default)")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()

    import torch

    import attnedit
    from attnedit.batch import run_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = attnedit.load(args.model)
    size = args.size or pipe.default_size()[0]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    seeds = list(range(args.images))
    work = Path(tempfile.mkdtemp(prefix="batch_speed_"))
    jobs = work / "jobs.jsonl"
    jobs.write_text("".join(
        json.dumps({"prompt": p, "seeds": [s], "steps": args.steps, "guidance": args.guidance, "size": size}) + "\n"
        for p, s in zip(prompts, seeds)))
    b = args.batch_size
    variants = {
        "diffusers loop": lambda out: _plain(pipe, prompts, seeds, args.steps, args.guidance, size, 1, out),
        f"diffusers batched x{b}": lambda out: _plain(pipe, prompts, seeds, args.steps, args.guidance, size, b, out),
        "generate loop": lambda out: _generate_loop(pipe, prompts, seeds, args.steps, args.guidance, size, out),
        "batch --batch-size 1": lambda out: run_batch(jobs, out, model=args.model, pipe=pipe, batch_size=1,
                                                      progress=False),
        f"batch --batch-size {b}": lambda out: run_batch(jobs, out, model=args.model, pipe=pipe, batch_size=b,
                                                         progress=False),
    }
    # warm-up: every variant once on a short list (first calls build kernels and caches)
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for rnd in range(args.rounds + 1):
        order = list(variants.items())
        for name, fn in order if rnd % 2 else order[::-1]:
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(out)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if rnd > 0:
                times[name].append(dt)
                cpu[name].append(dc)
            n = len(list(out.glob("*.png")))
            assert n == args.images, (name, n)
    shutil.rmtree(work, ignore_errors=True)

    print(f"model {args.model}, {size}x{size}, {args.steps} steps, guidance {args.guidance}, {args.images} images, "
          f"torch threads {torch.get_num_threads()}, {args.rounds} rounds")
    pairs = [
        ("batch --batch-size 1", "diffusers loop", "overhead of batch, one image per call"),
        (f"batch --batch-size {b}", f"diffusers batched x{b}", f"overhead of batch, {b} images per call"),
        ("generate loop", "diffusers loop", "EditPipeline.generate (attnedit processor), no controls"),
        ("batch --batch-size 1", "generate loop", "the batch runner alone (files, sidecars, manifest, checks)"),
        (f"batch --batch-size {b}", "batch --batch-size 1", "batching compatible jobs"),
    ]
    ratios: dict[str, dict[str, float]] = {}
    for label, data in (("wall-clock", times), ("process CPU time", cpu)):
        rate = {k: args.images / statistics.median(v) for k, v in data.items()}
        print(f"\n{label}: {'images/s (median)':>17} {'(best)':>8}   seconds per round")
        for k, r in rate.items():
            print(f"  {k:<24} {r:>17.3f} {args.images / min(data[k]):>8.3f}   " + " ".join(f"{t:.2f}" for t in data[k]))
        print(f"{label} speed ratios, per round then median (>1: the first is faster)")
        for a, c, what in pairs:
            r = statistics.median(tc / ta for ta, tc in zip(data[a], data[c]))
            ratios.setdefault(label, {})[f"{a} / {c}"] = r
            print(f"  {a:<22} vs {c:<22} {r:6.3f}x  ({100 * (1 / r - 1):+5.1f}% time)  {what}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "wall": times, "cpu": cpu, "ratios": ratios},
                                              indent=1))


if __name__ == "__main__":
    main()
