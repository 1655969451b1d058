"""The Subjects across images tab: IR-Diffusion (references, then a scene with every subject)."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr
from PIL import Image

from attnedit.batch import kind_named

from ..common import (
    PROGRESS,
    Page,
    Settings,
    draw_boxes,
    lines_of,
    load_upload,
    need_prompt,
    parse_boxes,
    readable,
    timing,
    words_of,
)


class SubjectsTab:
    """Subjects across images: IR-Diffusion references and scene, optional real photos.

    A mixin of `AttnEditApp`: it uses the app's `pool`, `outputs`, `controls` and `_jobs`.
    """

    def subjects(self, model: str, references: str, subject_words: str, scene: str, boxes: str, seed: float,
                 steps: float, guidance: float, height: float, width: float, reposition: bool = True,
                 isolate: bool = True, reference_files: list[Any] | None = None, progress: gr.Progress = PROGRESS):
        """IR-Diffusion: references and one scene; the scene's subjects keep their references' look.

        `reference_files`: optional real photos, one per reference prompt (inverted, then followed).
        """
        from attnedit.methods.ir_diffusion import ir_diffusion

        refs = lines_of(references)
        words = words_of(subject_words)
        scene = need_prompt(scene, "scene prompt")
        if not refs:
            raise ValueError("give one reference prompt per subject (one per line)")
        settings = Settings.parse(seed, steps, guidance, height, width)
        target_boxes = parse_boxes(boxes)
        if target_boxes is not None and len(target_boxes) != len(refs):
            raise ValueError(f"{len(target_boxes)} scene boxes for {len(refs)} subjects; give one box per subject")
        photos, notes = self._reference_photos(reference_files, len(refs), settings)
        options = {"reposition": bool(reposition), "isolate": bool(isolate)}
        with self.pool.use(model) as pipe:
            progress(0.1, desc="IR-Diffusion: " + ("inverting the references, " if photos else "")
                     + "subject maps, references and scene")
            start = time.perf_counter()
            result = ir_diffusion(pipe, refs, scene, words, target_boxes=target_boxes, seed=settings.seed,
                                  steps=settings.steps, guidance=settings.guidance, height=settings.height,
                                  width=settings.width, reference_images=photos, control_options=options)
            seconds = time.perf_counter() - start
        captions = [f"reference: {r}" for r in refs] + [f"scene: {scene}"]
        images = list(result.images)
        if target_boxes:
            images[-1] = draw_boxes(images[-1], target_boxes, words)
        files = {f"reference-{i + 1}.png": photo for i, photo in enumerate(photos or [])}
        job = kind_named("references").to_job(scene, refs, words, seeds=[settings.seed], steps=settings.steps,
                                              guidance=settings.guidance, height=settings.height,
                                              width=settings.width, boxes=target_boxes, images=list(files),
                                              options=options)
        extra = f" ({len(images)} images)" + "".join(f"\n\n_{n}_" for n in notes)
        return (list(zip(images, captions)), timing(seconds, settings, extra),
                self.outputs.png(result.images[-1], "scene"), self._jobs(model, [job], files, "ir-diffusion"))

    def _reference_photos(self, files: list[Any] | None, n: int, settings: Settings):
        """Uploaded reference photos at the scene's size (resizes are reported), or None."""
        if not files:
            return None, []
        if len(files) != n:
            raise ValueError(f"{len(files)} reference photos for {n} reference prompts; give one per prompt or none")
        photos, notes = [], []
        for i, f in enumerate(files):
            photo = load_upload(f, f"reference photo {i + 1}")
            if photo.size != (settings.width, settings.height):
                notes.append(f"reference photo {i + 1} ({photo.width}x{photo.height}) resized to "
                             f"{settings.width}x{settings.height}, the scene's size")
                photo = photo.resize((settings.width, settings.height), Image.Resampling.LANCZOS)
            photos.append(photo)
        return photos, notes

    def build_subjects_tab(self, page: Page) -> None:
        """Reference prompts, subject words, scene and boxes; the references and the scene."""
        if "reposition" not in self.controls:
            return
        model, run = page.model, page.run
        with gr.Tab("Subjects across images", id="subjects"):
            gr.Markdown("**IR-Diffusion**: one reference image per subject and a scene with all of them; "
                        "scene subjects read their reference's features (repositioned to their box) and "
                        "never each other's.")
            with gr.Row():
                with gr.Column():
                    i_refs = gr.Textbox(label="Reference prompts (one per subject, one per line)", lines=2,
                                        value="a red circle\na blue square")
                    i_words = gr.Textbox(label="Subject words (one per reference, in the scene too)",
                                         value="circle, square")
                    i_scene = gr.Textbox(label="Scene prompt", value="a red circle and a blue square")
                    i_boxes = gr.Textbox(label="Scene boxes (optional, one per subject: x0,y0,x1,y1; ...)",
                                         value="0.0,0.2,0.5,0.8; 0.5,0.2,1.0,0.8")
                    i_common = page.settings_row("subjects")
                    with gr.Row():
                        i_repos = gr.Checkbox(label="Reposition (features pasted at the box)", value=True)
                        i_iso = gr.Checkbox(label="Isolate subjects", value=True)
                    i_files = gr.File(label="Real reference photos (optional, one per reference prompt)",
                                      file_count="multiple", file_types=["image"], type="filepath")
                    i_go = gr.Button("Generate references and scene", variant="primary")
                    i_info = gr.Markdown(label="Run info")
                with gr.Column():
                    i_gallery = gr.Gallery(label="References, then the scene", format="png", columns=3)
                    with gr.Row():
                        i_png = gr.DownloadButton("Download scene PNG")
                        i_job = gr.DownloadButton("Download parameters (batch job zip)")
            i_inputs = [model, i_refs, i_words, i_scene, i_boxes, *i_common, i_repos, i_iso, i_files]
            i_go.click(readable(self.subjects), i_inputs, [i_gallery, i_info, i_png, i_job],
                       api_name="subjects", **run)
