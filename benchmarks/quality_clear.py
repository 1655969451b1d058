"""CLEAR distillation quality: the distilled student against its teacher, and the same window untrained.

Distils a CLEAR student (`attnedit.train.clear.distill_clear`) and measures, against the
full-attention teacher with the same prompts and seeds:
- the denoiser-output error on held-out teacher samples (relative MSE of the velocity prediction),
- PSNR/SSIM of the final images,
for the untrained window (teacher weights + CLEAR) and for the student (adapter + CLEAR).

    python benchmarks/quality_clear.py --model shapes-dit --size 64 --radius 2 --down-factor 2 --steps 300
    python benchmarks/quality_clear.py --model tiny-flux --size 128 --radius 2 --down-factor 2 --steps 300

The testbed DiT (`shapes-dit`) is the intended model; the tiny random FLUX only shows the
mechanics (its teacher is random, so its images are noise and the flow-matching term of the recipe
cannot be fitted: rows with the distillation-only weights (0, 1, 1) show the pull towards the teacher).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from report import Report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from speed import _tensor, psnr, ssim  # noqa: E402

import attnedit  # noqa: E402
from attnedit.controller import Controller  # noqa: E402
from attnedit.methods.clear import CLEAR  # noqa: E402
from attnedit.testbed.detector import all_present, detect  # noqa: E402
from attnedit.train.clear import distill_clear, sample_condition, teacher_samples  # noqa: E402

HELD_OUT = ("a yellow square below a red triangle", "three blue circles", "a green square and a magenta circle")
#: world captions (assets/testbed/prompts/fast.json): the testbed detector can read their images
PROMPTS = tuple(json.loads((ROOT / "assets" / "testbed" / "prompts" / "fast.json").read_text())["prompts"])


@torch.no_grad()
def velocity_error(edit_pipe, controls: list, data: dict, size: int, seed: int = 123) -> float:
    """Relative MSE of the denoiser's velocity against the teacher's (`data["teacher"]`), same x_t and t."""
    ctrl = Controller(edit_pipe.pipe, controls, denoiser=edit_pipe.denoiser).install()
    errs = []
    try:
        ctrl.begin_run(None, num_steps=1, height=size, width=size)
        for i in range(data["x0"].shape[0]):
            with ctrl.pass_phase("guidance", step=0):
                pred = _velocity(edit_pipe, data, i)
            ref = data["teacher"][i : i + 1]
            errs.append(float(((pred - ref) ** 2).mean() / (ref**2).mean()))
    finally:
        ctrl.remove()
    return statistics.mean(errs)


@torch.no_grad()
def held_out(teacher, size: int, n: int, seed: int = 1000) -> dict[str, torch.Tensor]:
    """Held-out teacher samples with fixed (x_t, t) and the teacher's velocity on them."""
    data = teacher_samples(teacher, HELD_OUT, n, steps=teacher.default_steps(), height=size, width=size,
                           guidance=teacher.recommended()["guidance"], seed=seed)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(data["x0"].shape, generator=g)
    t = torch.rand(n, generator=g) * 0.8 + 0.1
    data["xt"] = (1 - t[:, None, None]) * data["x0"] + t[:, None, None] * noise
    data["t"] = t
    data["teacher"] = torch.cat([_velocity(teacher, data, i) for i in range(n)])
    return data


@torch.no_grad()
def _velocity(edit_pipe, data: dict, i: int) -> torch.Tensor:
    """The denoiser's velocity on held-out sample `i` (its x_t, t and text condition), through the family adapter."""
    dev, dtype = edit_pipe.device, edit_pipe.dtype
    index = torch.tensor([i])
    cond = sample_condition(data, index, dev, dtype)
    family = edit_pipe.family
    t = data["t"][index].to(dev, dtype) * family.schedule_value(1.0)
    return family.denoise(data["xt"][index].to(dev, dtype), t, cond)[0].float().cpu()


def objects_right(prompt: str, image) -> bool:
    """The testbed detector finds every object the caption names (meaningful on shapes-dit only)."""
    return all_present(prompt, detect(np.asarray(image.convert("RGB"))))


def image_scores(edit_pipe, controls_fn, base: dict, size: int) -> tuple[float, float, float]:
    """Mean PSNR/SSIM against the teacher's images, and the share with every named object detected."""
    ps, ss, ok = [], [], []
    for (prompt, seed), ref in base.items():
        image = edit_pipe.generate(prompt, seed=seed, height=size, width=size, controls=controls_fn()).image
        img = _tensor(image)
        ps.append(min(psnr(img, ref), 100.0))
        ss.append(ssim(img, ref))
        ok.append(objects_right(prompt, image))
    return statistics.mean(ps), statistics.mean(ss), statistics.mean(ok)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-flux")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--radius", type=float, default=2)
    ap.add_argument("--down-factor", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=16, help="teacher samples to distil on")
    ap.add_argument("--held-out", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    radius = int(args.radius) if float(args.radius).is_integer() else args.radius
    df = args.down_factor or None
    log = Report("quality_clear.py", argv)
    cmd = log.command
    log(f"# CLEAR distillation on `{args.model}` ({_dt.date.today().isoformat()})\n")
    log(f"- command: `{cmd}`")
    log(f"- {args.size}x{args.size} px, radius {radius}, down_factor {df}, {args.steps} steps (AdamW lr {args.lr}), "
        f"{args.samples} self-generated teacher samples; held-out: {args.held_out} other samples; images: "
        f"{len(PROMPTS)} prompts (assets/testbed/prompts/fast.json, also the distillation prompts) x seeds "
        f"{args.seeds}")
    log("- velocity error = MSE(pred, teacher) / mean(teacher^2) on held-out (x_t, t); PSNR/SSIM of final images "
        "against the teacher's (same prompt and seed)\n")
    teacher = attnedit.load(args.model)
    data = held_out(teacher, args.size, args.held_out)
    teacher_images = {(p, s): teacher.generate(p, seed=s, height=args.size, width=args.size).image
                      for p in PROMPTS for s in args.seeds}
    base = {k: _tensor(v) for k, v in teacher_images.items()}
    right = statistics.mean(objects_right(p, im) for (p, _), im in teacher_images.items())
    log("| model | loss weights (flow, distill, attention) | velocity error | image PSNR dB | image SSIM "
        "| objects right | train s |")
    log("|---|---|---|---|---|---|---|")
    log(f"| teacher (full attention) | - | 0 | - | - | {right:.0%} | - |")
    window = lambda: [CLEAR(radius=radius, down_factor=df)]  # noqa: E731
    err = velocity_error(teacher, window(), data, args.size)
    p, s, ok = image_scores(teacher, window, base, args.size)
    log(f"| window, not distilled | - | {err:.4f} | {p:.2f} | {s:.4f} | {ok:.0%} | - |")
    with tempfile.TemporaryDirectory() as tmp:
        for weights in ((1.0, 0.5, 0.5), (0.0, 1.0, 1.0)):
            path = Path(tmp) / f"student-{weights[0]}.safetensors"
            t0 = time.perf_counter()
            res = distill_clear(args.model, path, radius=radius, down_factor=df, num_samples=args.samples,
                                height=args.size, width=args.size, max_steps=args.steps, lr=args.lr,
                                loss_weights=weights, progress=False, seed=0, prompts=PROMPTS,
                                guidance=teacher.recommended()["guidance"])
            secs = time.perf_counter() - t0
            student = attnedit.load(args.model, clear=path)
            err = velocity_error(student, list(student.default_controls), data, args.size)  # its CLEAR window
            p, s, ok = image_scores(student, list, base, args.size)  # generate() adds the window itself
            first, last = statistics.mean(res.losses[:10]), statistics.mean(res.losses[-10:])
            log(f"| distilled student (loss {first:.4f} -> {last:.4f}) | {weights} | {err:.4f} | {p:.2f} | {s:.4f} "
                f"| {ok:.0%} | {secs:.0f} |")
    log.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
