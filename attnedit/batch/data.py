"""The records every part of the batch shares: problems, raw jobs, units (one image each), plans, summaries."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"
SIDECAR_TAG = "attnedit_batch"  # marks sidecars written by the batch (with the image key)
LOCK = ".attnedit-batch.lock"  # inside the output folder, held (flock) for the whole run
MESSAGE_MAX = 500  # no problem message prints more than this (a value is shown short, never whole)
SEEDS_COUNT_MAX = 100_000  # `seeds: N` makes N images per prompt
ID_MAX = 80  # a job id is part of file names
SIZE_FAR = 2.0  # --validate warns when a side is more than this factor from the model's native size
# the keys every job takes; a `JobKind` adds its own (`attnedit.batch.kinds.job_keys`)
BASE_KEYS = ("id", "prompt", "prompts", "negative_prompt", "seeds", "seed", "size", "height", "width", "steps",
             "guidance", "controls", "maps", "together")
_JOB_ONLY = ("id", "prompt", "prompts")  # what one job makes (a kind's own keys are job-only too)
DEFAULT_KEYS = (*(k for k in BASE_KEYS if k not in _JOB_ONLY), "model", "concepts")


def _cap(text: str, limit: int = MESSAGE_MAX) -> str:
    """`text` cut to `limit` characters, saying how much was left out."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}... ({len(text) - limit + 40} more characters)"


def _close(word: Any, choices: Sequence[str]) -> str:
    """` (did you mean 'x'?)` for a near miss among `choices`, else ""."""
    if not isinstance(word, str) or len(word) > 100:
        return ""
    near = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


@dataclass
class Problem:
    """A bad job line: where it is and what is wrong."""

    line: int
    message: str

    def __post_init__(self) -> None:
        self.message = _cap(self.message)

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass
class Entry:
    """One raw job of the file with the line it starts on."""

    line: int
    data: Any


@dataclass
class Unit:
    """One image to make: prompt, seed and the settings it shares with its batch."""

    line: int
    job_id: str | None
    prompt: str
    seed: int
    settings: dict[str, Any]  # steps, guidance, height, width, negative_prompt, controls, maps
    key: str
    stem: str
    group: str | None = None  # images of a `together` job made in one call (one group per seed)
    role: str = "plain"  # "source" (its first prompt) or "target" inside a group
    base: Path | None = None  # the job file's folder: relative file names in `settings` are read from it
    kind: str = "generate"  # the `JobKind` that expanded it and runs its batch (not part of the key)

    def signature(self) -> str:
        return json.dumps(self.settings, sort_keys=True)


@dataclass
class Plan:
    """Everything a run needs from the job file: units in file order and the problems found."""

    units: list[Unit] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    jobs: int = 0
    duplicates: int = 0
    model: str | None = None
    warnings: list[Problem] = field(default_factory=list)  # valid but likely unwanted (a size far from native)


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # (line, file stem, reason)
    invalid: list[Problem] = field(default_factory=list)
    duplicates: int = 0  # images asked for twice in the file (made once)
    seconds: float = 0.0
    interrupted: int | None = None  # the signal (SIGTERM / SIGINT) that stopped the run early

    @property
    def exit_status(self) -> int:
        """The CLI's status: 128 + signal when interrupted, 1 when an image failed or a line was bad, else 0."""
        if self.interrupted:
            return 128 + int(self.interrupted)
        return 0 if self.ok else 1

    def merge(self, other: Summary) -> None:
        self.done += other.done
        self.skipped += other.skipped
        self.failed += other.failed

    @property
    def ok(self) -> bool:
        return not self.failed and not self.invalid and not self.interrupted
