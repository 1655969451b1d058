"""The Generate tab: a prompt, its image, and the speed-up controls (ToDo, agent attention, CLEAR)."""

from __future__ import annotations

import time

import gradio as gr

import attnedit

from ..common import (
    PROGRESS,
    SPEEDUPS,
    Page,
    Settings,
    as_int,
    job_of,
    need_prompt,
    readable,
    step_progress,
    timing,
)


class GenerateTab:
    """Generate: prompt -> image, with the speed-up toggles whose controls exist.

    A mixin of `AttnEditApp`: it uses the app's `pool`, `outputs`, `controls` and `_jobs`.
    """

    def speedups(self) -> list[str]:
        return [n for n in SPEEDUPS if n in self.controls and (n != "clear" or self.has_clear_adapter())]

    def has_clear_adapter(self, model: str | None = None) -> bool:
        """CLEAR needs the model's trained adapter (`attnedit.load(..., clear=path)` attaches it)."""
        return hasattr(self.pool.get(model or self.pool.default).denoiser, "attnedit_clear")

    def generate(self, model: str, prompt: str, negative_prompt: str, seed: float, steps: float, guidance: float,
                 height: float, width: float, todo: bool = False, todo_factor: float = 2, agent: bool = False,
                 clear: bool = False, progress: gr.Progress = PROGRESS):
        """Prompt -> image, PNG and job JSON downloads, and how long the run took."""
        prompt = need_prompt(prompt)
        settings = Settings.parse(seed, steps, guidance, height, width, negative_prompt)
        controls = self._speed_controls(model, todo=todo, todo_factor=todo_factor, agent=agent, clear=clear)
        with self.pool.use(model) as pipe:
            start = time.perf_counter()
            result = pipe.generate(prompt, controls=[*controls, step_progress(progress, "generating")],
                                   **settings.kwargs())
            seconds = time.perf_counter() - start
        names = ", ".join(c.name for c in controls)
        info = timing(seconds, settings, f" with {names}" if names else "")
        job = job_of(result.params, controls)
        return result.image, info, self.outputs.png(result.image), self._jobs(model, [job])

    def _speed_controls(self, model: str, *, todo: bool, todo_factor: float, agent: bool,
                        clear: bool) -> list[attnedit.Control]:
        wanted = {"todo": bool(todo), "agent": bool(agent), "clear": bool(clear)}
        controls = []
        for name, on in wanted.items():
            if not on:
                continue
            if name not in self.controls:
                raise ValueError(f"the speed-up {name!r} is not available in this attnedit build; "
                                 f"available: {', '.join(self.speedups()) or 'none'}")
            if name == "clear" and not self.has_clear_adapter(self.pool.check(model)):
                raise ValueError(f"CLEAR needs a trained adapter and model {model!r} has none "
                                 "(load one with attnedit.load(..., clear=path))")
            options = {"factor": as_int(todo_factor, "ToDo factor", 1, 8)} if name == "todo" else {}
            controls.append(attnedit.make_control(name, options))
        return controls

    def build_generate_tab(self, page: Page) -> None:
        """Prompt, settings and speed-up toggles; the image and its downloads."""
        model, run = page.model, page.run
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square", elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", value="")
                    common = page.settings_row("generate")
                    # every toggle is always an input (a stable API); hidden when its control is absent
                    with gr.Row(visible=bool(self.speedups())):
                        has = self.controls.__contains__
                        speed = [
                            gr.Checkbox(label="ToDo (token downsampling)", value=False, visible=has("todo")),
                            gr.Slider(1, 4, value=2, step=1, label="ToDo factor", visible=has("todo")),
                            gr.Checkbox(label="Agent attention", value=False, visible=has("agent")),
                            gr.Checkbox(label="CLEAR (local attention)", value=False,
                                        visible="clear" in self.speedups()),
                        ]
                    go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    image = gr.Image(label="Image", type="pil", format="png", interactive=False, height=320,
                                     buttons=["download"], elem_id="generate-image", elem_classes="attnedit-image")
                    info = gr.Markdown(label="Run info", elem_id="generate-info")
                    with gr.Row():
                        png = gr.DownloadButton("Download PNG")
                        job = gr.DownloadButton("Download parameters (batch job)")
            go.click(readable(self.generate), [model, prompt, negative, *common, *speed],
                     [image, info, png, job], api_name="generate", **run)
