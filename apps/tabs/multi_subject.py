"""The Multi-subject tab: A-STAR, Attend-and-Excite or Bounded Attention against the plain image."""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

import attnedit
from attnedit.visualize import map_grid

from ..common import (
    PROGRESS,
    Page,
    Settings,
    box_canvas,
    click_box,
    draw_boxes,
    job_of,
    need_prompt,
    parse_boxes,
    readable,
    step_progress,
    timing,
    words_of,
)

DEFAULT_BOXES = "0.05,0.20,0.45,0.80; 0.55,0.20,0.95,0.80"
MULTI_SUBJECT = {"astar": "A-STAR", "attend_excite": "Attend-and-Excite", "bounded": "Bounded Attention"}


class MultiSubjectTab:
    """Multi-subject: the plain image and the controlled one (same seed), boxes drawn.

    A mixin of `AttnEditApp`: it uses the app's `pool`, `outputs`, `controls` and `_jobs`.
    """

    def multi_methods(self) -> list[str]:
        return [n for n in MULTI_SUBJECT if n in self.controls]

    def multi_subject(self, model: str, prompt: str, method: str, words: str, boxes: str, seed: float,
                      steps: float, guidance: float, height: float, width: float,
                      progress: gr.Progress = PROGRESS):
        """The plain image and the controlled one (same seed), boxes drawn, and each word's map."""
        prompt = need_prompt(prompt)
        settings = Settings.parse(seed, steps, guidance, height, width)
        if method not in self.multi_methods():
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(self.multi_methods())}")
        subjects = words_of(words)
        if not subjects:
            raise ValueError("name the subject words of the prompt, comma-separated (e.g. circle, square)")
        parsed = parse_boxes(boxes)
        options: dict[str, Any] = {"words": subjects}
        if method == "bounded":
            if parsed is None:
                raise ValueError("Bounded Attention needs one box per subject word: x0,y0,x1,y1; x0,y0,x1,y1")
            if len(parsed) != len(subjects):
                raise ValueError(f"{len(parsed)} boxes for {len(subjects)} subject words; give one box per word")
            options["boxes"] = parsed
        control = attnedit.make_control(method, options)
        store = attnedit.AttentionStore(words=subjects)
        with self.pool.use(model) as pipe:
            start = time.perf_counter()
            plain = pipe.generate(prompt, controls=[step_progress(progress, "plain image")], **settings.kwargs())
            result = pipe.generate(prompt, controls=[control, store, step_progress(progress, MULTI_SUBJECT[method])],
                                   **settings.kwargs())
            seconds = time.perf_counter() - start
        shown = draw_boxes(result.image, options.get("boxes"), subjects) if method == "bounded" else result.image
        grid = map_grid(store.word_maps(0), result.image)
        info = timing(seconds, settings, f" (plain + {MULTI_SUBJECT[method]})")
        return (plain.image, shown, grid, info, self.outputs.png(result.image),
                self._jobs(model, [job_of(result.params, [control])]))

    def build_multi_subject_tab(self, page: Page) -> None:
        """Prompt, method, subject words and boxes (typed or clicked on a canvas)."""
        if not (self.multi_methods()):
            return
        model, run = page.model, page.run
        with gr.Tab("Multi-subject", id="multi"):
            with gr.Row():
                with gr.Column():
                    s_prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square")
                    s_method = gr.Radio([(MULTI_SUBJECT[n], n) for n in self.multi_methods()],
                                        value=self.multi_methods()[0], label="Method")
                    s_words = gr.Textbox(label="Subject words (comma-separated)", value="circle, square")
                    s_boxes = gr.Textbox(label="Boxes, one per word: x0,y0,x1,y1 as fractions; "
                                         "separated by ';' (Bounded Attention)",
                                         value=DEFAULT_BOXES, elem_id="multi-boxes")
                    s_common = page.settings_row("multi")
                    s_pending = gr.State(None)
                    s_canvas = gr.Image(box_canvas(DEFAULT_BOXES, "circle, square", page.height, page.width),
                                        label="Draw boxes: click two opposite corners per subject",
                                        type="pil", format="png", interactive=False, height=340,
                                        elem_id="multi-canvas")
                    s_clear = gr.Button("Clear boxes", size="sm")
                    s_go = gr.Button("Generate both", variant="primary")
                    s_info = gr.Markdown(label="Run info")
                with gr.Column():
                    with gr.Row():
                        s_plain = gr.Image(label="Plain (same seed)", type="pil", format="png",
                                           interactive=False, elem_classes="attnedit-image")
                        s_image = gr.Image(label="With the method", type="pil", format="png",
                                           interactive=False, elem_classes="attnedit-image")
                    s_grid = gr.Image(label="Each subject word's attention", type="pil", format="png",
                                      interactive=False)
                    with gr.Row():
                        s_png = gr.DownloadButton("Download PNG")
                        s_job = gr.DownloadButton("Download parameters (batch job)")
            s_h, s_w = s_common[3], s_common[4]

            def on_click(boxes, words, pending, height, width, canvas, evt: gr.SelectData):
                x, y = evt.index[:2]
                text, pending = click_box(boxes, pending, x, y, canvas.width, canvas.height)
                return text, pending, box_canvas(text, words, height, width, pending)

            s_canvas.select(on_click, [s_boxes, s_words, s_pending, s_h, s_w, s_canvas],
                            [s_boxes, s_pending, s_canvas], api_visibility="private")
            for trigger in (s_boxes.change, s_words.change, s_h.change, s_w.change):
                trigger(lambda b, wd, h, w, p: box_canvas(b, wd, h, w, p),
                        [s_boxes, s_words, s_h, s_w, s_pending], s_canvas, api_visibility="private",
                        queue=False)
            s_clear.click(lambda: ("", None), None, [s_boxes, s_pending], api_visibility="private",
                          queue=False)
            s_go.click(readable(self.multi_subject), [model, s_prompt, s_method, s_words, s_boxes, *s_common],
                       [s_plain, s_image, s_grid, s_info, s_png, s_job], api_name="multi_subject", **run)
