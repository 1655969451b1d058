"""The testbed quality benchmark: every method against the plain model, read back by the detector.

    python benchmarks/quality.py --model shapes-sd --seeds 8 --steps 25 --out benchmarks/results/quality

Prompt sets live in `assets/testbed/prompts/` (single.json, multi.json, edit.json, fast.json).
Sections:
- plain:   the model itself. Single objects: shape and colour right (target >= 90 %); two and
           three objects: all present, attribute binding (the failure modes the methods target);
- multi:   plain / Attend-and-Excite / A-STAR / Bounded Attention / diffusers' own A&E pipeline on
           multi.json: object recall, attribute binding, layout IoU against the boxes
           (`benchmarks/quality_multisubject.py`);
- masactrl: identity kept between a source and its edits vs independent generation with the same
           seeds, and the inversion round trip (`benchmarks/quality_masactrl.py`);
- fast:    PSNR/SSIM of ToDo / Agent / CLEAR final images against full attention
           (`benchmarks/speed.py`; speed ratios come from `benchmarks/speed.py` itself).
Writes `<out>.md` (the tables) and `<out>.png` (example images, plain vs methods, same seeds) and
prints the tables. `--quick` runs one prompt and one seed per set (the CI smoke run).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "assets" / "testbed" / "prompts"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attnedit  # noqa: E402
from attnedit.testbed.detector import all_present, attribute_binding, detect  # noqa: E402
from attnedit.testbed.world import parse_prompt  # noqa: E402


def load_prompts(name: str) -> dict:
    return json.loads((PROMPTS / f"{name}.json").read_text())


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def _fmt(mean: float, se: float | None = None, pct: bool = True) -> str:
    if mean != mean:
        return "n/a"
    if pct:
        return f"{100 * mean:.1f} %" + (f" ± {100 * se:.1f}" if se is not None and se == se else "")
    return f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None and se == se else "")


def plain_section(pipe, seeds, steps, guidance, quick) -> tuple[str, dict]:
    """The model alone: single objects right, and how often 2-3 objects come out right."""
    single = load_prompts("single")["prompts"]
    multi = load_prompts("multi")["captions"]
    sets = {
        "single object": single[:1] if quick else single,
        "two objects": [c for c in multi if len(parse_prompt(c).objects) == 2][: 1 if quick else None],
        "three objects": [c for c in multi if len(parse_prompt(c).objects) == 3][: 1 if quick else None],
    }
    rows, numbers = [], {}
    for name, prompts in sets.items():
        ok, binding, per_seed = [], [], {s: [] for s in seeds}
        for p in prompts:
            images = pipe(p, seed=list(seeds), num_images=len(seeds), steps=steps, guidance=guidance).images
            for s, img in zip(seeds, images):
                found = detect(np.asarray(img))
                hit = float(all_present(p, found))
                ok.append(hit)
                per_seed[s].append(hit)
                b = attribute_binding(p, found)
                if b is not None:
                    binding.append(b)
        seed_means = [statistics.fmean(v) for v in per_seed.values() if v]
        mean = statistics.fmean(ok)
        numbers[name] = {"all_present": mean, "binding": statistics.fmean(binding) if binding else float("nan"),
                         "n": len(ok)}
        rows.append(f"| {name} | {len(prompts)} x {len(seeds)} | {_fmt(mean, _se(seed_means))} | "
                    f"{_fmt(numbers[name]['binding'])} |")
    table = ("| prompt set | prompts x seeds | all objects right (± s.e. over seeds) | attribute binding |\n"
             "|---|---|---|---|\n" + "\n".join(rows))
    return table, numbers


def multi_section(pipe, seeds, steps, guidance, quick) -> tuple[str, dict]:
    import quality_multisubject as qm

    data = load_prompts("multi")
    requests = [[tuple(o) for o in r] for r in data["requests"]]
    methods = [m for m in qm.METHODS if m != "diffusers A&E" or qm.diffusers_ae_supported(pipe)]
    summary = qm.evaluate(pipe, methods=methods, requests=requests[:1] if quick else requests, seeds=seeds,
                          steps=steps, guidance=guidance)
    text = qm.table(summary)
    if "diffusers A&E" not in methods:
        text += (f"\n\n(diffusers' own A&E pipeline is for Stable Diffusion only; not run on a "
                 f"{type(pipe.pipe).__name__})")
    moves = qm.from_plain_table(summary)
    if moves:
        text += "\n\nPer requested object of the two-object prompts, against plain from the same seed:\n\n" + moves
    return text, summary


def masactrl_section(pipe, seeds, steps, guidance, quick) -> tuple[str, dict]:
    import quality_masactrl as qmc

    pairs = [tuple(tuple(o) for o in p) for p in load_prompts("edit")["pairs"]]
    summary = qmc.consistency(pipe, pairs=pairs[:1] if quick else pairs, seeds=seeds, steps=steps,
                              guidance=guidance)
    trip = qmc.round_trip(pipe, n_images=1 if quick else 16, steps=steps,
                          detect=lambda image: detect(np.asarray(image)))
    return qmc.table(summary, trip), {"consistency": summary, "round_trip": trip}


def fast_section(pipe, seeds, steps, guidance, quick) -> tuple[str, dict]:
    import speed

    prompts = load_prompts("fast")["prompts"]
    rows = speed.fidelity_rows(prompts=prompts[:1] if quick else prompts, seeds=list(seeds), steps=steps,
                               edit_pipe=pipe)
    lines = [f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['identical']} / {r['n']} |" for r in rows]
    table = ("| method | PSNR vs full attention (dB) | SSIM | identical images |\n|---|---|---|---|\n"
             + "\n".join(lines))
    return table, {"rows": rows}


SECTIONS = {"plain": plain_section, "multi": multi_section, "masactrl": masactrl_section, "fast": fast_section}


def figure(pipe, steps: int, guidance: float, seed: int, path: Path, n_prompts: int = 4) -> None:
    """Example images: plain vs each of attnedit's multi-subject methods, one column per prompt (diffusers' own
    A&E pipeline has a row in the table, not here)."""
    import quality_multisubject as qm

    data = load_prompts("multi")
    requests = [[tuple(o) for o in r] for r in data["requests"]][:n_prompts]
    methods = [m for m in qm.METHODS if m != "diffusers A&E"]
    tile, label_w = 96, 90
    canvas = Image.new("RGB", (label_w + tile * len(requests), (tile + 14) * len(methods) + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for j, req in enumerate(requests):
        draw.text((label_w + j * tile + 2, 1), qm.caption(req)[:22], fill="black")
    for i, m in enumerate(methods):
        y = 14 + i * (tile + 14)
        draw.text((4, y + tile // 2), m, fill="black")
        for j, req in enumerate(requests):
            control = qm.make_control(m, req)
            img = pipe(qm.caption(req), controls=[control] if control else [], seed=seed, steps=steps,
                       guidance=guidance).image
            canvas.paste(img.resize((tile, tile), Image.NEAREST), (label_w + j * tile, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-sd")
    ap.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 per prompt")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (model default)")
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    ap.add_argument("--out", default="benchmarks/results/quality", help="writes <out>.md and <out>.png")
    ap.add_argument("--quick", action="store_true", help="one prompt and one seed per set (smoke run)")
    args = ap.parse_args(argv)
    pipe = attnedit.load(args.model)
    meta = pipe.recommended()
    steps = args.steps or meta.get("steps") or pipe.default_steps()
    guidance = args.guidance if args.guidance is not None else meta.get("guidance", 5.0)
    seeds = list(range(1 if args.quick else args.seeds))
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    started = time.time()
    parts = [f"# Testbed quality: {args.model}\n",
             f"`python benchmarks/quality.py --model {args.model} --seeds {len(seeds)} --steps {steps}"
             f"{' --quick' if args.quick else ''}` · guidance {guidance} · seeds 0..{len(seeds) - 1}\n"]
    results: dict[str, object] = {}
    for name in wanted:
        fn = SECTIONS[name]
        t0 = time.time()
        table, numbers = fn(pipe, seeds, steps, guidance, args.quick)
        results[name] = numbers
        parts.append(f"## {name}\n\n{table}\n\n({time.time() - t0:.0f} s)\n")
        print(parts[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "multi" in wanted or "plain" in wanted:
        figure(pipe, steps, guidance, seed=0, path=out.with_suffix(".png"), n_prompts=1 if args.quick else 4)
        parts.append(f"![examples]({out.with_suffix('.png').name})\n")
    parts.append(f"total {time.time() - started:.0f} s\n")
    out.with_suffix(".md").write_text("\n".join(parts))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
