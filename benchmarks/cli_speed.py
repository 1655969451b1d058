"""How fast the command line answers: help texts, and one generation on the bundled model, side by side.

    python benchmarks/cli_speed.py                   # 3 runs each, medians
    python benchmarks/cli_speed.py --repeats 5 --source /tmp/old-checkout   # another checkout's CLI too

Each command runs in a fresh process (`python -m attnedit ...`), as a user's shell runs it; the
figures are wall-clock seconds. Rows:
- `attnedit --help` and `attnedit <cmd> --help` (these import neither torch nor diffusers now);
- `attnedit generate` on the default model (64 px, its 25 steps), whole command and, from
  `--verbose`, the load and generation times, with the CPU thread count the CLI chose (one thread for
  small models) and with `--threads 2`: on a busy 2-core machine a second thread waiting for a
  descheduled peer multiplies the generation time, which was most of the gap to the app.
With `--source`, the same rows for the CLI of another checkout (e.g. an older commit in a git
worktree), run with this environment's Python: the before/after comparison.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str], source: Path, cwd: Path) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(source), HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "attnedit", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"`attnedit {' '.join(argv)}` failed:\n{res.stderr[-2000:]}")
    return seconds, res.stdout + res.stderr


def rows(source: Path, repeats: int) -> list[tuple[str, str]]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        for argv in (["--help"], ["generate", "--help"], ["batch", "--help"], ["maps", "--help"]):
            t = statistics.median(timed(argv, source, cwd)[0] for _ in range(repeats))
            out.append((f"attnedit {' '.join(argv)}", f"{t:.2f} s"))
        base = ["generate", "a red circle and a blue square", "--out", "img.png"]
        verbose = "--verbose" in timed(["generate", "--help"], source, cwd)[1]
        for label, extra in (("chosen threads", []), ("--threads 2", ["--threads", "2"])):
            if extra and not verbose:
                continue  # an older CLI without --threads / --verbose
            runs = [timed(base + extra + (["--verbose"] if verbose else []), source, cwd) for _ in range(repeats)]
            total = statistics.median(t for t, _ in runs)
            detail = ""
            if verbose:
                loads = [float(re.search(r"in ([\d.]+) s", o.split("loaded", 1)[1]).group(1)) for _, o in runs]
                gens = [float(re.search(r"generated.* in ([\d.]+) s", o).group(1)) for _, o in runs]
                threads = re.search(r"(\d+) CPU thread", runs[0][1]).group(1)
                detail = (f" (load {statistics.median(loads):.2f} s, generation {statistics.median(gens):.2f} s, "
                          f"{threads} thread(s))")
            out.append((f"attnedit generate, {label}", f"{total:.2f} s{detail}"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--source", type=Path, action="append", default=[],
                        help="another checkout whose CLI is timed too (its repository root)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    print(f"# attnedit command line, wall-clock medians of {args.repeats} fresh processes ({os.cpu_count()} CPUs)\n")
    for source in [ROOT, *args.source]:
        print(f"## {source}\n\n| command | time |\n|---|---|")
        for name, value in rows(source.resolve(), args.repeats):
            print(f"| `{name}` | {value} |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
