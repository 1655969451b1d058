"""The batch's IR-Diffusion job: reference images, then a scene whose subjects keep their look
(`ir_diffusion`), from a job file.

    {"prompt": "a red circle and a blue square",
     "references": {"prompts": ["a red circle", "a blue square"], "subjects": ["circle", "square"],
                    "boxes": [[0, 0.2, 0.5, 0.8], [0.5, 0.2, 1, 0.8]], "images": ["ref.png", ...],
                    "options": {"isolate": true}}}

`prompt` is the scene; one reference prompt and one subject word per subject; `boxes` (where each goes in
the scene) and `images` (real reference photos, the scene's size) are optional; `options` are
RepositionAttention's. The job builds its own control: no `prompts`, `controls` or `maps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..batch.data import Unit, _close
from ..batch.files import input_file, resolve
from ..batch.kinds import JobKind, check_size, check_with_model, image_size, register_kind
from ..validate import short

REFERENCE_KEYS = ("prompts", "subjects", "boxes", "images", "options")
_WHOLE = [0.0, 0.0, 1.0, 1.0]  # a box over the whole image


class ReferencesJob(JobKind):
    """`references` + the scene `prompt`: the references first, then the scene, in one group."""

    name = "references"
    title = "IR-Diffusion"
    keys = ("references",)
    inputs = ("references",)
    together = True  # the scene reads the references of its call

    def expand(self, job: dict[str, Any], prompts: list[str], settings: dict[str, Any], pipe: Any,
               base: Path | None, files: dict[str, str]) -> list[str]:
        bad = [k for k in ("prompts", "controls", "maps") if k in job]
        if bad:
            raise ValueError(f"an IR-Diffusion job has one scene prompt and builds its own control: drop {bad[0]!r} "
                             "(control options go under references.options)")
        settings["controls"], settings["maps"] = [], False  # inherited ones do not apply
        settings["references"] = _references(job["references"], settings, pipe, base, files)
        return [*settings["references"]["prompts"], prompts[0]]

    def roles(self, n: int) -> list[str]:
        return ["source"] * (n - 1) + ["target"]  # the references, then the scene

    def check_with_model(self, pipe: Any, prompts: list[str], settings: dict[str, Any], controls: list[Any],
                         together: bool) -> None:
        """What `ir_diffusion` checks before denoising: the size, subject words in their prompts, the control."""
        from ..controls import make_control
        from .ir_diffusion import check_subject_words

        check_size(pipe, settings)
        refs, scene = settings["references"], prompts[-1]
        max_len = pipe.call_defaults().get("max_sequence_length")
        check_subject_words(pipe, refs["prompts"], [[w] for w in refs["subjects"]], max_len)
        check_subject_words(pipe, [scene], [refs["subjects"]], max_len)
        full = [_WHOLE] * len(refs["prompts"])
        control = make_control("reposition", {**refs["options"], "target_boxes": refs.get("boxes") or full,
                                              "reference_boxes": full})
        check_with_model(pipe, prompts, settings, [control], roles=self.roles(len(prompts)))

    def run(self, pipe: Any, batch: Sequence[Unit], controls: list[Any], common: dict[str, Any]) -> Any:
        from .ir_diffusion import ir_diffusion

        s, base = batch[0].settings, batch[0].base
        refs = s["references"]
        photos = [resolve(base, name) for name in refs["images"]] if "images" in refs else None
        return ir_diffusion(pipe, refs["prompts"], batch[-1].prompt, refs["subjects"], target_boxes=refs.get("boxes"),
                            reference_images=photos, seed=batch[-1].seed, height=s["height"], width=s["width"],
                            control_options=refs["options"], **common)

    def to_job(self, scene: str, prompts: Sequence[str], subjects: Sequence[str], *, seeds: Sequence[int],
               steps: int, guidance: float, height: int, width: int, boxes: Sequence[Sequence[float]] | None = None,
               images: Sequence[str] | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """An IR-Diffusion job: `images` are the reference photos' file names beside the job file."""
        block: dict[str, Any] = {"prompts": list(prompts), "subjects": list(subjects)}
        if boxes is not None:
            block["boxes"] = [list(b) for b in boxes]
        if images:
            block["images"] = list(images)
        block["options"] = dict(options or {})
        return {"prompt": scene, "seeds": list(seeds), "steps": steps, "guidance": guidance, "height": height,
                "width": width, "references": block}


def _references(block: Any, settings: dict[str, Any], pipe: Any, base: Path | None,
                files: dict[str, str]) -> dict[str, Any]:
    """The `references` block of a job, checked (lengths, words, boxes, files, options)."""
    from ..controls import CONTROLS, make_control
    from ..masks import check_boxes

    if "reposition" not in CONTROLS:
        raise ValueError("IR-Diffusion (references) is not available in this attnedit build")
    if not isinstance(block, dict):
        raise ValueError("references must be a mapping: {prompts: [...], subjects: [...], boxes, images, options}")
    unknown = [k for k in block if k not in REFERENCE_KEYS]
    if unknown:
        raise ValueError(f"unknown key {short(unknown[0])} in references{_close(unknown[0], REFERENCE_KEYS)}; "
                         f"valid keys: {', '.join(REFERENCE_KEYS)}")
    refs, subjects = block.get("prompts"), block.get("subjects")
    if not isinstance(refs, list) or not refs or not all(isinstance(p, str) and p.strip() for p in refs):
        raise ValueError("references.prompts must be a non-empty list of prompts, one per subject")
    if not isinstance(subjects, list) or len(subjects) != len(refs) or not all(isinstance(w, str) for w in subjects):
        raise ValueError(f"references.subjects must list one word per reference prompt ({len(refs)}), "
                         f"got {short(subjects)}")
    out: dict[str, Any] = {"prompts": refs, "subjects": subjects}
    boxes = block.get("boxes")
    if boxes is not None:
        if not isinstance(boxes, list) or len(boxes) != len(refs):
            raise ValueError(f"references.boxes must give one scene box per subject ({len(refs)}), got {short(boxes)}")
        out["boxes"] = [list(b) for b in check_boxes(boxes, "references.boxes")]
    images = block.get("images")
    if images is not None:
        if not isinstance(images, list) or len(images) != len(refs):
            raise ValueError(f"references.images must give one photo per reference prompt ({len(refs)}), "
                             f"got {short(images)}")
        for i, name in enumerate(images):
            found = input_file(base, name, f"references.images[{i}]", files)
            if settings["height"] is not None and pipe is not None:
                h, w = image_size(found, pipe)
                if (h, w) != (settings["height"], settings["width"]):
                    raise ValueError(f"references.images[{i}] {short(name)} is {w}x{h} (W x H) but the scene is "
                                     f"{settings['width']}x{settings['height']}: give photos of the scene's size")
        out["images"] = list(images)
    options = block.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"references.options must be a mapping of RepositionAttention options, got {short(options)}")
    placed = [k for k in options if k.startswith(("target_", "reference_"))]
    if placed:
        raise ValueError(f"references.options: {short(placed[0])} is set from references (boxes) or the subjects' "
                         "attention; drop it")
    full = [_WHOLE] * len(refs)
    make_control("reposition", {**options, "target_boxes": full, "reference_boxes": full})  # bad names/values
    out["options"] = dict(options)
    return out


REFERENCES = register_kind(ReferencesJob())
