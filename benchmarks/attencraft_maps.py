"""What AttenCraft's masks are built from on a model: word maps per level, self-attention spread, masks per power.

    HF_HUB_OFFLINE=1 python benchmarks/attencraft_maps.py --model shapes-sd --words red,magenta
    HF_HUB_OFFLINE=1 python benchmarks/attencraft_maps.py --model shapes-sd --words circle,square

On the testbed image of `attencraft_testbed.py` (orange striped circle top left, pink square bottom right), noised
at `--t`, one UNet forward with the prompt "a w1 circle and a w2 square". A new AttenCraft token starts from its
initializer word's embedding, so on the testbed's word-local text encoder these maps are the new tokens' maps at
mask initialisation. Printed:
- per cross-attention level: the mean map of w1, w2 and the start token (background) inside the circle, inside the
  square and on the background (the circle / square regions of the drawn image);
- the mean row entropy of the head-averaged self-attention at AttenCraft's self level (ln N = uniform), and
  for affinity powers 1, 2, 4 how many cells the margin rule (`--margin`) gives each class.
Why: the official recipe's grids (latent/4 cross, latent/2 self) and 4-step affinity walk were tuned on SD at
512 px; this shows what a small model's maps support (`benchmarks/results/attencraft.md`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))


def regions(size: int, grid: int) -> dict[str, np.ndarray]:
    """Boolean (grid, grid) masks of the circle, the square and the rest, from the drawing of `make_image`."""
    s = size / 64
    circle, square = Image.new("L", (size, size)), Image.new("L", (size, size))
    ImageDraw.Draw(circle).ellipse((int(6 * s), int(8 * s), int(30 * s), int(32 * s)), fill=255)
    ImageDraw.Draw(square).rectangle((int(36 * s), int(34 * s), int(58 * s), int(56 * s)), fill=255)
    out = {}
    for name, im in (("circle", circle), ("square", square)):
        frac = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None, None]
        out[name] = (F.adaptive_avg_pool2d(frac, grid)[0, 0] > 0.5).numpy()
    out["background"] = ~(out["circle"] | out["square"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-sd")
    ap.add_argument("--words", default="red,magenta", help="initializer words of the circle and the square")
    ap.add_argument("--t", type=int, default=100, help="noise timestep (AttenCraft draws it from [0, 300))")
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    words = [w.strip() for w in args.words.split(",") if w.strip()]
    if len(words) != 2:
        ap.error(f"--words takes two comma-separated words (circle, square), got {args.words!r}")
    torch.set_num_threads(1)
    from attencraft_testbed import make_image
    from diffusers import DDPMScheduler

    import attnedit
    from attnedit.controller import Controller
    from attnedit.layout import BatchLayout
    from attnedit.methods.attencraft import MapRecorder, extract_masks, map_levels
    from attnedit.tokens import index_prompt

    edit = attnedit.load(args.model)
    pipe = edit.pipe.to(torch.float32)
    size = edit.default_size()[0]
    prompt = f"a {words[0]} circle and a {words[1]} square"
    index = index_prompt(prompt, edit.family.text_segments(), warn=False)
    keys = [0] + [index.find(w)[0] for w in words]  # start token, w1, w2
    img = np.asarray(make_image(size), dtype=np.float32) / 127.5 - 1.0
    with torch.no_grad():
        lat = pipe.vae.encode(torch.from_numpy(img).permute(2, 0, 1)[None]).latent_dist.mean
        lat = (lat - (getattr(pipe.vae.config, "shift_factor", None) or 0.0)) * pipe.vae.config.scaling_factor
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(args.seed))
        t = torch.tensor([args.t])
        noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(lat, noise, t)
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        cond = pipe.text_encoder(ids)[0]
    controller = Controller(pipe, [])
    registry = list(controller.registry)
    cross_level, self_level = map_levels(registry, tuple(lat.shape[-2:]))
    print(f"{args.model}: prompt {prompt!r}, t={args.t}; AttenCraft levels: cross {cross_level}, self {self_level}")
    levels = sorted({i.level for i in registry if i.kind == "cross" and i.block in ("down", "up")})
    try:
        for level in levels:
            rec = MapRecorder(registry, level, self_level)
            rec.positions = torch.tensor(keys)
            rec.record_self = True
            controller.controls = [rec]
            controller.install()
            controller.begin_run(None)
            with torch.no_grad(), controller.pass_phase("guidance", layout=BatchLayout.standard(1, False), step=0):
                pipe.unet(noisy, t, encoder_hidden_states=cond)
            controller.remove()
            maps = rec.cross_maps().float()  # (h, w, 3): start token, w1, w2
            h = maps.shape[0]
            reg = regions(size, h)
            print(f"cross level {level} ({h}x{h}), mean map inside circle / square / background:")
            for k, name in enumerate(["start token", *words]):
                m = maps[..., k].numpy()
                print(f"  {name:<12}" + "".join(f"{m[reg[r]].mean():8.3f}" for r in ("circle", "square", "background")))
            if level == cross_level:
                aff = rec.affinity().float()
                n = aff.shape[0]
                ent = float(-(aff * aff.clamp_min(1e-12).log()).sum(-1).mean())
                print(f"self level {self_level} ({rec.self_grid[0]}x{rec.self_grid[1]}): mean row entropy {ent:.2f} "
                      f"nats (uniform: ln {n} = {np.log(n):.2f})")
                cross = maps[..., [1, 2, 0]]  # concepts first, background last, as the trainer orders them
                for power in (1, 2, 4):
                    res = extract_masks(cross, aff, rec.self_grid, power=power, margin=args.margin,
                                        names=[*words, "background"])
                    counts = [int(m.sum()) for m in res.masks]
                    print(f"  power {power}: cells {dict(zip([*words, 'background'], counts))}"
                          + (f" ({res.problem})" if res.problem else ""))
    finally:
        controller.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
