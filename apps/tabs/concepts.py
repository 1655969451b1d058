"""The Concepts tab: AttenCraft tokens trained from one image, then offered as a model in every tab."""

from __future__ import annotations

import time
import uuid
from typing import Any

import gradio as gr
from PIL import Image

from ..common import (
    PROGRESS_TQDM,
    Page,
    as_int,
    fit_upload,
    load_upload,
    readable,
    words_of,
)


class ConceptsTab:
    """Concepts: train AttenCraft tokens; the trained model joins the model list.

    A mixin of `AttnEditApp`: it uses the app's `pool`, `outputs`, `controls` and `_jobs`.
    """

    def has_attencraft(self) -> bool:
        import importlib.util

        return importlib.util.find_spec("attnedit.train.attencraft") is not None

    def concepts(self, model: str, image: Any, concepts: str, steps: float, class_images: float,
                 progress: gr.Progress = PROGRESS_TQDM):
        """Train AttenCraft tokens from one image, then offer `model + tokens` in every tab."""
        from attnedit.train.attencraft import attencraft

        base = self.pool.check(model)
        if self.pool.derived(base):
            raise ValueError(f"{model!r} already carries trained concepts; start from a base model "
                             f"({', '.join(n for n in self.pool.names if not self.pool.derived(n))})")
        names = words_of(concepts)
        n_steps = as_int(steps, "training steps", 1, 500)
        n_class = as_int(class_images, "class images", 0, 50)
        probe = self.pool.get(model)
        fitted, notes = fit_upload(load_upload(image, "the concepts image"), probe.default_size(), probe.pixel_stride)
        run_dir = self.outputs.root / "concepts" / uuid.uuid4().hex[:10]
        run_dir.mkdir(parents=True)
        source = run_dir / "instance.png"
        fitted.save(source)
        progress(0.0, desc="AttenCraft: preparing (class images, masks)")
        start = time.perf_counter()
        result = attencraft(source, names, run_dir / "concepts", model=model, steps=n_steps,
                            num_class_images=max(1, n_class), prior_weight=1.0 if n_class else 0.0,
                            checkpoint_every=0, progress=True)
        seconds = time.perf_counter() - start
        new = self.pool.add(f"{model} + {' '.join(result.tokens)} [{run_dir.name[:6]}]", model,
                            concepts=str(result.output))
        last = result.history[-1] if result.history else {}
        losses = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if isinstance(v, float))
        info = (f"trained {n_steps} steps in **{seconds:.1f} s**; tokens "
                + ", ".join(f"`{t}`" for t in result.tokens) + f"; last losses: {losses}. "
                f"Model **{new}** is now in the model list: use the tokens in any tab."
                + "".join(f"\n\n_{n}_" for n in [*notes, *result.notes]))
        prompt = "a photo of " + " and ".join(result.tokens)
        masks = result.output / "masks.png"
        preview = Image.open(masks).convert("RGB") if masks.is_file() else None
        return (preview, info, gr.Dropdown(choices=self.pool.names, value=new), prompt,
                str(result.output / "concepts.safetensors"))

    def build_concepts_tab(self, page: Page) -> None:
        """One image and its concept names; the masks found, the tokens and the weights."""
        if not (self.has_attencraft()):
            return
        model = page.model
        with gr.Tab("Concepts", id="concepts"):
            gr.Markdown("**AttenCraft**: learn one new token per concept from a single image (each "
                        "concept kept to its own region by the model's attention); the trained model "
                        "joins the model list, so its tokens work in every tab.")
            with gr.Row():
                with gr.Column():
                    a_image = gr.Image(label="One image showing every concept", type="filepath",
                                       sources=["upload", "clipboard"])
                    a_concepts = gr.Textbox(label="Concepts (at least two, comma-separated)",
                                            value="circle, square")
                    with gr.Row():
                        a_steps = gr.Slider(1, 500, value=50, step=1, label="Training steps")
                        a_class = gr.Slider(0, 50, value=4, step=1,
                                            label="Class images (prior preservation; 0 = off)")
                    a_go = gr.Button("Train concepts", variant="primary")
                    a_info = gr.Markdown(label="Training info")
                with gr.Column():
                    a_masks = gr.Image(label="Concept masks found in the image", type="pil", format="png",
                                       interactive=False)
                    a_prompt = gr.Textbox(label="Prompt with the new tokens (paste into a tab)",
                                          interactive=False)
                    a_file = gr.DownloadButton("Download concepts (safetensors)")
            a_go.click(readable(self.concepts), [model, a_image, a_concepts, a_steps, a_class],
                       [a_masks, a_info, model, a_prompt, a_file], api_name="concepts",
                       concurrency_id="attnedit-training", concurrency_limit=1)
