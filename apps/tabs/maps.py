"""The Attention maps tab: per-word maps of a run, step by step, and the self-attention of a clicked pixel."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image, ImageDraw

import attnedit
from attnedit.visualize import heatmap, map_grid

from ..common import (
    MAX_SELF_TOKENS,
    PROGRESS,
    Page,
    Settings,
    as_int,
    display_scale,
    enlarge,
    job_of,
    need_prompt,
    readable,
    step_progress,
    timing,
)


# ------------------------------------------------------------------------------ attention maps
@dataclass
class MapsSession:
    """What the Attention maps tab keeps between its events (per browser session)."""

    store: attnedit.AttentionStore
    image: Image.Image
    steps: int
    self_grid: tuple[int, int] | None = None


def _self_layers(latent_hw: tuple[int, int]) -> Callable[[Any], bool]:
    """Cross layers, plus UNet self layers small enough to keep whole (<= MAX_SELF_TOKENS tokens)."""

    def pick(info: Any) -> bool:
        if info.kind in ("cross", "joint"):
            return True
        if info.kind != "self" or info.block not in ("down", "mid", "up"):
            return False
        h, w = info.grid(latent_hw)
        return h * w <= MAX_SELF_TOKENS

    return pick


def _self_grid(store: attnedit.AttentionStore) -> tuple[int, int] | None:
    for grid in store.grids():  # largest first
        try:
            store.self_map(0, 0, grid=grid)
        except ValueError:
            continue
        return grid
    return None



def _mark(image: Image.Image, x: int, y: int) -> Image.Image:
    out = image.copy()
    r = max(2, image.width // 40)
    ImageDraw.Draw(out).ellipse((x - r, y - r, x + r, y + r), outline="red", width=max(1, r // 2))
    return out



class MapsTab:
    """Attention maps: record a run, then browse its steps and pixels.

    A mixin of `AttnEditApp`: it uses the app's `pool`, `outputs`, `controls` and `_jobs`.
    """

    def maps(self, model: str, prompt: str, words: str, seed: float, steps: float, guidance: float,
             height: float, width: float, progress: gr.Progress = PROGRESS):
        """Prompt -> image, one heatmap per word, a step slider and the pixel picker's maps."""
        prompt = need_prompt(prompt)
        settings = Settings.parse(seed, steps, guidance, height, width)
        chosen = [w.strip() for w in (words or "").split(",") if w.strip()] or None
        with self.pool.use(model) as pipe:
            stride = pipe.vae_scale_factor
            latent = (settings.height // stride, settings.width // stride)
            store = attnedit.AttentionStore(words=chosen, per_step=True, self_attention=True,
                                            layers=_self_layers(latent))
            start = time.perf_counter()
            result = pipe.generate(prompt, controls=[store, step_progress(progress, "recording maps")],
                                   **settings.kwargs())
            seconds = time.perf_counter() - start
        session = MapsSession(store=store, image=result.image, steps=settings.steps, self_grid=_self_grid(store))
        grid = map_grid(store.word_maps(0), result.image)
        note = "" if session.self_grid else " (no self-attention layer small enough for the pixel picker)"
        info = timing(seconds, settings, note) + " — click the image for the self-attention of a pixel."
        slider = gr.Slider(minimum=0, maximum=settings.steps - 1, value=settings.steps - 1, step=1,
                           interactive=settings.steps > 1)
        return (enlarge(result.image), grid, slider, info, session, self.outputs.png(result.image),
                self._jobs(model, [job_of(result.params, [])]))

    def maps_step(self, step: float, session: MapsSession | None):
        """Word maps of one denoising step of the last run."""
        if session is None:
            raise ValueError("run the Attention maps tab first, then move the step slider")
        step = as_int(step, "step", 0, session.steps - 1)
        return map_grid(session.store.step_word_maps(step), session.image)

    def self_attention(self, x: float, y: float, session: MapsSession | None):
        """Self-attention of the image pixel (x, y) of the last run, as a heatmap over the image."""
        if session is None:
            raise ValueError("run the Attention maps tab first, then click a pixel of its image")
        if session.self_grid is None:
            raise ValueError("this run kept no self-attention map (grids above "
                             f"{MAX_SELF_TOKENS} tokens are not kept); try a smaller size")
        w, h = session.image.size
        px, py = as_int(x, "x", 0, w - 1), as_int(y, "y", 0, h - 1)
        gh, gw = session.self_grid
        m = session.store.self_map(py * gh // h, px * gw // w, grid=session.self_grid)
        k = display_scale(session.image)
        over = enlarge(heatmap(m, session.image))
        return _mark(over, px * k + k // 2, py * k + k // 2)

    def pick_pixel(self, session: MapsSession | None, evt: gr.SelectData):
        """A click on the (enlarged) image -> that pixel of the generated image."""
        if session is None:
            raise ValueError("run the Attention maps tab first, then click a pixel of its image")
        k = display_scale(session.image)
        x, y = (int(v) // k for v in evt.index[:2])
        return x, y, self.self_attention(x, y, session)

    def build_maps_tab(self, page: Page) -> None:
        """Prompt and words; the image (click a pixel), word maps, step slider, self-attention."""
        model, run = page.model, page.run
        with gr.Tab("Attention maps", id="maps"):
            session = gr.State(None)
            with gr.Row():
                with gr.Column():
                    m_prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square")
                    m_words = gr.Textbox(label="Words (comma-separated; empty = every word)", value="")
                    m_common = page.settings_row("maps")
                    m_go = gr.Button("Record attention", variant="primary", elem_id="maps-button")
                    m_info = gr.Markdown(label="Run info")
                with gr.Column():
                    m_image = gr.Image(label="Image (click a pixel)", type="pil", format="png",
                                       interactive=False, elem_id="maps-image")
                    with gr.Row():
                        m_png = gr.DownloadButton("Download PNG")
                        m_job = gr.DownloadButton("Download parameters (batch job)")
            m_grid = gr.Image(label="Per-word attention", type="pil", format="png", interactive=False)
            m_step = gr.Slider(0, 3, value=3, step=1, label="Step (0 = first denoising step)", interactive=False)
            with gr.Row():
                m_x = gr.Number(value=0, precision=0, label="Pixel x")
                m_y = gr.Number(value=0, precision=0, label="Pixel y")
                m_pix = gr.Button("Self-attention of this pixel")
            m_self = gr.Image(label="Self-attention of the picked pixel", type="pil", format="png",
                              interactive=False, elem_id="maps-self")
            m_go.click(readable(self.maps), [model, m_prompt, m_words, *m_common],
                       [m_image, m_grid, m_step, m_info, session, m_png, m_job], api_name="maps", **run)
            m_step.release(readable(self.maps_step), [m_step, session], m_grid, api_name="maps_step")
            m_pix.click(readable(self.self_attention), [m_x, m_y, session], m_self, api_name="self_attention")
            m_image.select(readable(self.pick_pixel), [session], [m_x, m_y, m_self], api_visibility="private")
