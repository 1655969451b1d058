"""The batch's real-image edit job: a photo inverted to noise, then denoised as the source (its
reconstruction) and as the targets with MasaCtrl (`EditPipeline.edit`), from a job file.

    {"image": "photo.png", "source_prompt": "a red circle", "prompt": "a blue circle"}

Size and noise come from the image: such a job takes no `size`, `seed(s)` or `together` (nor
`--height` / `--width`); its first control is the edit's control (default MasaCtrl).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..batch.data import Unit
from ..batch.files import input_file, resolve
from ..batch.kinds import JobKind, control_spec, image_size, register_kind
from ..validate import InputError


class EditJob(JobKind):
    """`image` + `source_prompt`: the image's reconstruction and its edits (`prompt` / `prompts`), one call."""

    name = "edit"
    title = "a real-image edit"
    keys = ("image", "source_prompt")
    inputs = ("image",)
    together = True  # the source (the inverted image) and its targets are one call
    fixed_seeds = (0,)  # an edit starts from its image's inverted noise

    def stray(self, key: str) -> str:
        return f"{key} describes the photo of a real-image edit: add image: or drop {key}"

    def check_job(self, job: dict[str, Any], cli: dict[str, Any]) -> None:
        fixed = [k for k in ("seed", "seeds", "size", "height", "width", "together") if k in job]
        if fixed:
            raise ValueError(f"an edit job takes its size and noise from its image: drop {fixed[0]!r}")
        forced = [f"--{k}" for k in ("height", "width") if k in cli]
        if forced:
            raise ValueError(f"an edit job takes its size from its image, so {forced[0]} (which sets every job's size) "
                             "cannot apply to it: run edit jobs without --height/--width")

    def default_controls(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return specs or [{"name": "masactrl"}]  # what `EditPipeline.edit` uses when given no control

    def expand(self, job: dict[str, Any], prompts: list[str], settings: dict[str, Any], pipe: Any,
               base: Path | None, files: dict[str, str]) -> list[str]:
        source = job.get("source_prompt", "")
        if not isinstance(source, str):
            raise InputError("source_prompt", source, "a string (what the image shows)")
        settings["height"], settings["width"] = image_size(input_file(base, job["image"], "image", files), pipe)
        settings["image"] = job["image"]
        return [source, *prompts]

    def run(self, pipe: Any, batch: Sequence[Unit], controls: list[Any], common: dict[str, Any]) -> Any:
        if common["negative_prompt"] is None:
            common = {k: v for k, v in common.items() if k != "negative_prompt"}
        image = resolve(batch[0].base, batch[0].settings["image"])
        return pipe.edit(image, batch[0].prompt, [u.prompt for u in batch[1:]], control=controls[0],
                         controls=controls[1:], **common)

    def to_job(self, image: str, source_prompt: str, prompts: str | Sequence[str], *, steps: int, guidance: float,
               controls: Sequence[Any] = ()) -> dict[str, Any]:
        """An edit job: `image` is the photo's file name beside the job file."""
        return {"image": image, "source_prompt": source_prompt,
                **({"prompt": prompts} if isinstance(prompts, str) else {"prompts": list(prompts)}),
                "steps": steps, "guidance": guidance,
                "controls": [c if isinstance(c, dict) else control_spec(c) for c in controls]}


EDIT = register_kind(EditJob())
