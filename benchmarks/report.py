"""The Markdown report of a benchmark script: printed line by line as it is measured, written to `--out` at the end.

Why one helper: every benchmark that writes a results file records the exact command that produced it, shows
progress as it goes, and must write the same text it printed.
"""

from __future__ import annotations

import sys
from pathlib import Path


class Report:
    """`log = Report("speed.py", argv)`; `log(line)` prints and keeps a line; `log.save(args.out)` writes them."""

    def __init__(self, script: str, argv: list[str] | None) -> None:
        self.lines: list[str] = []
        self.command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, out: str | None) -> None:
        """Write the kept lines to `out` (folders made as needed); nothing when `out` is None."""
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text("\n".join(self.lines) + "\n")
