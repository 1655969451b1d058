"""Which text tokens carry a testbed object: the words, or the causal encoder's end token?

    HF_HUB_OFFLINE=1 python benchmarks/token_swap.py --model shapes-sd-clip --pairs 24 --seeds 2

Attend-and-Excite and A-STAR move a noun's cross-attention to make its object appear. That only works if the
noun's own state draws the object. A causal encoder's end token has read the whole caption too, so a UNet may
draw the object from it instead, and then the noun's map is a read-out: it follows the object without causing
it. This measures it with stock diffusers (`StableDiffusionPipeline`, `prompt_embeds`): for pairs of
single-object captions A and B ("a COLOUR SHAPE", distinct shapes and colours), the encoder states of

- **A**: A's caption as it is (the control);
- **words A, end B**: the start token and A's words from A, the end token and the padding from B;
- **words A, end empty**: A's start token and words; at the end token's position and after it, the empty
  caption's states there (its caption-free padding, which is what `testbed train --summary-drop` trains on);

and the detector reports how often the image shows A's shape, B's shape, A's colour and B's colour. A model
whose words carry the objects follows A in all three rows; one that reads the end token follows B in the
second row and loses A's object in the third.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from report import Report

VARIANTS = ("A", "words A, end B", "words A, end empty")
COLUMNS = ("shape A", "shape B", "colour A", "colour B")


def caption_pairs(n: int, seed: int = 0) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """`n` pairs of (colour, shape) requests, A and B with distinct shapes and distinct colours."""
    from attnedit.testbed.world import COLOURS, SHAPES

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        sa, sb = rng.choice(len(SHAPES), 2, replace=False)
        ca, cb = rng.choice(len(COLOURS), 2, replace=False)
        pairs.append(((COLOURS[ca], SHAPES[sa]), (COLOURS[cb], SHAPES[sb])))
    return pairs


def splice(words_from: torch.Tensor, end_from: torch.Tensor, end: int) -> torch.Tensor:
    """Encoder states: positions before `end` (start token and words) from one caption, the rest from another."""
    return torch.cat([words_from[:, :end], end_from[:, end:]], 1)


@torch.no_grad()
def encode(pipe, caption: str) -> tuple[torch.Tensor, int]:
    """The text encoder's states of `caption` (padded as the pipeline pads) and its end token's position."""
    from attnedit.testbed.train import tokenize

    ids = tokenize(pipe.tokenizer, [caption])  # padded to the full length, as the pipeline and training pad
    return pipe.text_encoder(ids)[0], int((ids[0] == pipe.tokenizer.eos_token_id).int().argmax())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-sd-clip", help="a bundled testbed name or a pipeline folder")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the report (Markdown) here")
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.seeds < 1:
        ap.error("--pairs and --seeds must be 1 or more")
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline

    from attnedit.pipeline import resolve_model
    from attnedit.testbed.detector import detect

    folder, _ = resolve_model(args.model)
    settings = json.loads((Path(folder) / "attnedit.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    empty, _ = encode(pipe, "")
    counts = {v: dict.fromkeys(COLUMNS, 0) for v in VARIANTS}
    n = 0
    for (a, b), seed in itertools.product(caption_pairs(args.pairs), range(args.seeds)):
        (ea, end), (eb, end_b) = encode(pipe, f"a {a[0]} {a[1]}"), encode(pipe, f"a {b[0]} {b[1]}")
        if end != end_b:  # every world word is one token, so both captions end at the same position
            raise RuntimeError(f"captions of different token lengths: {a} ({end}) and {b} ({end_b})")
        states = {"A": ea, "words A, end B": splice(ea, eb, end), "words A, end empty": splice(ea, empty, end)}
        n += 1
        for name, st in states.items():
            image = pipe(prompt_embeds=st, negative_prompt_embeds=empty, num_inference_steps=settings["steps"],
                         guidance_scale=settings["guidance"], height=settings["height"], width=settings["width"],
                         generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
            found = detect((image * 255).round().astype(np.uint8))
            c = counts[name]
            c["shape A"] += any(d.shape == a[1] for d in found)
            c["shape B"] += any(d.shape == b[1] for d in found)
            c["colour A"] += any(d.colour == a[0] for d in found)
            c["colour B"] += any(d.colour == b[0] for d in found)

    log = Report("token_swap.py", argv)
    cmd = log.command
    log(f"# Which tokens carry the object: `{args.model}` ({_dt.date.today().isoformat()}, CPU)\n")
    log(f"- command: `{cmd}`")
    log(f"- {args.pairs} caption pairs x {args.seeds} seeds = {n} images per row; stock `StableDiffusionPipeline`, "
        f"{settings['steps']} steps, guidance {settings['guidance']}; share of images where the detector finds\n")
    log("| encoder states | " + " | ".join(COLUMNS) + " |")
    log("|---" * (len(COLUMNS) + 1) + "|")
    for name, c in counts.items():
        log(f"| {name} | " + " | ".join(f"{c[k] / n:.2f}" for k in COLUMNS) + " |")
    log.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
