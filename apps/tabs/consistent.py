"""The Consistent & edit tab: MasaCtrl from one noise (source and targets) and on a real photo (inverted)."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr
from PIL import Image

import attnedit
from attnedit.batch import GENERATE, control_spec, kind_named

from ..common import (
    MAX_STEPS,
    PROGRESS,
    Page,
    Settings,
    as_guidance,
    as_int,
    editor_value,
    enlarge,
    fit_upload,
    lines_of,
    load_upload,
    mask_canvas,
    mask_options,
    need_prompt,
    readable,
    step_progress,
    timing,
    with_mask_file,
)


class ConsistentTab:
    """Consistent & edit: MasaCtrl on generated images and on an uploaded photo.

    A mixin of `AttnEditApp`: it uses the app's `pool`, `outputs`, `controls` and `_jobs`.
    """

    def consistent(self, model: str, source: str, targets: str, mask_word: str, seed: float, steps: float,
                   guidance: float, height: float, width: float, use_drawn: bool = False, drawn: Any = None,
                   progress: gr.Progress = PROGRESS):
        """MasaCtrl: a source and several targets from one noise; targets keep the source's look.

        Optional mask (mask-guided MasaCtrl): `mask_word`'s cross-attention, or with `use_drawn` the
        mask painted on `drawn` (an ImageEditor value), the foreground of the source and every target.
        """
        from attnedit.methods.masactrl import consistent

        source = need_prompt(source, "source prompt")
        prompts = lines_of(targets)
        if not prompts:
            raise ValueError("give at least one target prompt (one per line)")
        settings = Settings.parse(seed, steps, guidance, height, width)
        options, mask = mask_options(mask_word, use_drawn, drawn, (settings.height, settings.width),
                                      1 + len(prompts))
        control = attnedit.make_control("masactrl", options)
        with self.pool.use(model) as pipe:
            start = time.perf_counter()
            kw = settings.kwargs()
            seed_ = kw.pop("seed")
            kw.pop("negative_prompt")
            result = consistent(pipe, source, prompts, control=control, seed=seed_,
                                controls=[step_progress(progress, "MasaCtrl")], **kw)
            seconds = time.perf_counter() - start
        captions = ["source: " + source] + ["target: " + t for t in prompts]
        job = GENERATE.to_job([source, *prompts], together=True, seeds=[settings.seed], steps=settings.steps,
                              guidance=settings.guidance, height=settings.height, width=settings.width,
                              controls=[with_mask_file(control_spec(control), mask)])
        pngs = [self.outputs.png(im, f"masactrl-{i}") for i, im in enumerate(result.images)]
        extra = f" ({len(result.images)} images)" + (", drawn mask" if mask is not None else "")
        return (list(zip(result.images, captions)), timing(seconds, settings, extra), pngs,
                self._jobs(model, [job], {"mask.png": mask} if mask is not None else None, "masactrl"))

    def edit_input(self, model: str, image: Any) -> tuple[Image.Image, list[str]]:
        """The upload as it is inverted: at most the model's size and sides multiples of its stride."""
        import warnings

        from attnedit.inversion import prepare_image

        pipe = self.pool.get(model)
        fitted, notes = fit_upload(load_upload(image, "the image to edit"), pipe.default_size(), pipe.pixel_stride)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said in the page instead
            fitted, more = prepare_image(fitted, pipe.pixel_stride)
        return fitted, notes + more

    def edit_canvas(self, model: str, image: Any) -> dict[str, Any] | None:
        """The mask canvas of the edit: the upload as it will be edited, enlarged like the results."""
        if image is None:
            return None
        try:
            fitted, _ = self.edit_input(model, image)
        except ValueError:
            return None
        return editor_value(enlarge(fitted))

    def edit(self, model: str, image: Any, source: str, target: str, steps: float, guidance: float,
             mask_word: str = "", use_drawn: bool = False, drawn: Any = None, progress: gr.Progress = PROGRESS):
        """Real-image edit: invert the upload, then denoise source and target with MasaCtrl.

        Optional mask: `mask_word`, a word of both prompts whose cross-attention separates foreground
        and background, or with `use_drawn` the foreground painted on `drawn` (the upload's canvas).
        """
        source = (source or "").strip()
        target = need_prompt(target, "target prompt")
        n_steps = as_int(steps, "steps", 1, MAX_STEPS)
        scale = as_guidance(guidance)
        image = load_upload(image, "the image to edit")
        fitted, notes = self.edit_input(model, image)
        upload = (image.height, image.width) if image is not None else None
        options, mask = mask_options(mask_word, use_drawn, drawn, (fitted.height, fitted.width), 2, upload)
        control = attnedit.make_control("masactrl", options)
        with self.pool.use(model) as pipe:
            progress(0.0, desc="inverting the image")
            start = time.perf_counter()
            result = pipe.edit(fitted, source, target, control=control, steps=n_steps, guidance=scale,
                               controls=[step_progress(progress, "editing")])
            seconds = time.perf_counter() - start
        notes += list(result.records.get("inversion", {}).get("notes", []))
        h, w = result.records.get("inversion", {}).get("size", [fitted.height, fitted.width])
        info = (f"{n_steps} steps, {h}x{w}: **{seconds:.2f} s**" + (", drawn mask" if mask is not None else "")
                + "".join(f"\n\n_{n}_" for n in notes))
        job = kind_named("edit").to_job("image.png", source, target, steps=n_steps, guidance=scale,
                                        controls=[with_mask_file(control_spec(control), mask)])
        files = {"image.png": fitted, **({"mask.png": mask} if mask is not None else {})}
        gallery = [(result.images[0], "reconstruction"), *((im, "edit") for im in result.images[1:])]
        return gallery, info, self.outputs.png(result.images[-1], "edit"), self._jobs(model, [job], files, "edit")

    def build_consistent_tab(self, page: Page) -> None:
        """Source and target prompts with an optional mask (word or painted); the photo edit."""
        if "masactrl" not in self.controls:
            return
        model, run = page.model, page.run
        with gr.Tab("Consistent & edit", id="consistent"):
            gr.Markdown("**MasaCtrl**: the targets start from the source's noise and read its "
                        "self-attention keys/values, so they keep its look while their prompts change it.")
            with gr.Row():
                with gr.Column():
                    c_source = gr.Textbox(label="Source prompt", value="a red circle")
                    c_targets = gr.Textbox(label="Target prompts (one per line)", lines=3,
                                           value="a red circle on the left\na red circle on the right")
                    c_mask = gr.Textbox(label="Mask word (optional: foreground from its attention)", value="")
                    c_common = page.settings_row("consistent")
                    c_use, c_draw = page.mask_inputs("consistent", mask_canvas(page.height, page.width),
                                                "Or paint the foreground (of the source and every target)")
                    c_go = gr.Button("Generate source and targets", variant="primary")
                    c_info = gr.Markdown(label="Run info", elem_id="consistent-info")
                with gr.Column():
                    c_gallery = gr.Gallery(label="Source, then targets", format="png", columns=3)
                    c_files = gr.File(label="PNG files", file_count="multiple")
                    c_job = gr.DownloadButton("Download parameters (batch job)")
            c_go.click(readable(self.consistent),
                       [model, c_source, c_targets, c_mask, *c_common, c_use, c_draw],
                       [c_gallery, c_info, c_files, c_job], api_name="consistent", **run)
            for trigger in (c_common[3].change, c_common[4].change):  # a new size, a new blank canvas
                trigger(lambda h, w: editor_value(mask_canvas(h, w)), [c_common[3], c_common[4]], c_draw,
                        api_visibility="private", queue=False)
            gr.Markdown("**Edit a real image**: it is inverted to noise, then denoised as the source "
                        "(reconstruction) and as the target with MasaCtrl.")
            with gr.Row():
                with gr.Column():
                    e_image = gr.Image(label="Image to edit", type="filepath", sources=["upload", "clipboard"],
                                       elem_id="edit-image")
                    e_source = gr.Textbox(label="What the image shows (source prompt)", value="a red circle")
                    e_target = gr.Textbox(label="Target prompt", value="a red circle on the left")
                    with gr.Row():
                        e_steps = gr.Slider(1, MAX_STEPS, value=page.steps, step=1, label="Steps",
                                            elem_id="edit-steps")
                        e_guidance = gr.Slider(0.0, 20.0, value=page.guidance, step=0.5, label="Guidance",
                                               elem_id="edit-guidance")
                    page.per_model.append([e_steps, e_guidance])
                    e_mask = gr.Textbox(label="Mask word (optional: foreground from its attention)",
                                        value="")
                    e_use, e_draw = page.mask_inputs("edit", None, "Or paint the foreground on the image "
                                                "(it appears here once uploaded)")
                    e_go = gr.Button("Invert and edit", variant="primary")
                    e_info = gr.Markdown(label="Edit info", elem_id="edit-info")
                with gr.Column():
                    e_gallery = gr.Gallery(label="Reconstruction, edit", format="png", columns=2)
                    with gr.Row():
                        e_png = gr.DownloadButton("Download PNG")
                        e_job = gr.DownloadButton("Download parameters (batch job zip)")
            e_go.click(readable(self.edit),
                       [model, e_image, e_source, e_target, e_steps, e_guidance, e_mask, e_use, e_draw],
                       [e_gallery, e_info, e_png, e_job], api_name="edit", **run)
            e_image.change(self.edit_canvas, [model, e_image], e_draw, api_visibility="private")
