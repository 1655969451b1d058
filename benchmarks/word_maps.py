"""Do a model's word maps mark their objects? Cross-attention of each object word inside / outside its object.

    HF_HUB_OFFLINE=1 python benchmarks/word_maps.py --model shapes-sd --seeds 3

For two-object prompts ("a red circle and a blue square", ...), every seed generates an image with an
`attnedit.AttentionStore`; the testbed detector finds each requested object, and for its shape word, its
colour word and the other object's shape word the script prints the mean attention inside the object's box
divided by the mean outside (16x16 grid, averaged over layers and steps). Attend-and-Excite, A-STAR and
AttenCraft's masks assume a word's map is higher on its own object (ratio well above 1).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

PROMPTS = ("a red circle and a blue square", "a green triangle and a yellow star", "a cyan ring and a magenta square",
           "a blue circle and a red triangle")
GRID = 16


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-sd")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import attnedit
    from attnedit.testbed.detector import box_mask, detect
    from attnedit.testbed.world import parse_prompt

    pipe = attnedit.load(args.model)
    ratios: dict[str, list[float]] = {"shape word": [], "colour word": [], "other object's shape word": []}
    for prompt in PROMPTS:
        objects = parse_prompt(prompt).objects  # [(shape, colour), (shape, colour)]
        for seed in range(args.seeds):
            store = attnedit.AttentionStore()
            image = pipe(prompt, controls=[store], seed=seed).image
            found = {d.label: d.box for d in detect(np.asarray(image))}
            maps = store.word_maps(grid=(GRID, GRID))
            for i, label in enumerate(objects):
                if label not in found:
                    continue
                inside = box_mask(found[label], (GRID, GRID))
                for key, word in (("shape word", label[0]), ("colour word", label[1]),
                                  ("other object's shape word", objects[1 - i][0])):
                    m = maps[word].numpy()
                    ratios[key].append(float(m[inside].mean() / m[~inside].mean()))
    for key, values in ratios.items():
        v = np.array(values)
        print(f"{key}: mean inside / outside {v.mean():.2f} "
              f"(objects found: {len(v)}, share above 1: {(v > 1).mean():.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
