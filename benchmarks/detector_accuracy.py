"""Agreement of the testbed detector with the generator's ground truth.

    python benchmarks/detector_accuracy.py --n 2000 --seed 2024

An image counts as agreeing when the detected objects are exactly the rendered ones: same
(shape, colour) multiset and each box with IoU > 0.5. Prints the rate, per-style rates and the
first disagreements.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from attnedit.testbed.detector import detect, match
from attnedit.testbed.world import World


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args()
    world = World(seed=args.seed)
    ok, per_style, total_style, misses = 0, Counter(), Counter(), []
    start = time.perf_counter()
    for i in range(args.n):
        scene = world.scene(i)
        found = detect(world.image(i))
        hit = match(scene.objects, found)
        ok += hit
        per_style[scene.style] += hit
        total_style[scene.style] += 1
        if not hit and len(misses) < 10:
            misses.append((i, scene.caption, [(d.shape, d.colour) for d in found]))
    elapsed = time.perf_counter() - start
    print(f"detector agreement on {args.n} rendered images (world seed {args.seed}): {ok / args.n:.2%} "
          f"({ok}/{args.n}), {1000 * elapsed / args.n:.1f} ms/image")
    for style in sorted(total_style):
        print(f"  {style:<9} {per_style[style] / total_style[style]:.2%} of {total_style[style]}")
    for miss in misses:
        print("  miss:", miss)


if __name__ == "__main__":
    main()
