"""The attnedit Gradio app: a thin page over attnedit's public API.

    attnedit app --model shapes-sd --models shapes-sd,shapes-dit,tiny-sd --port 7860

Every run builds its controls afresh (`attnedit.make_control`), takes the lock of its model (so
two requests never share one pipeline's processors or a control's state), reports its steps to
`gr.Progress`, and returns its image as PNG plus the parameters as a job line the batch CLI reads
(with the files the job names, such as an uploaded photo, a drawn mask or trained concepts, in a
zip next to it, so every result is replayable by `attnedit batch`). Each model's settings come
from `EditPipeline.recommended()` (a model folder's `attnedit.json`).
Bad input surfaces as the `ValueError` text of attnedit, shown in the page by `gr.Error`. Models
come only from the configured list (safetensors weights only); uploads are size-capped and
resized to the generation size (said in the page).

The page is one tab per module (`apps/tabs/`); what they share is in `apps/common.py`. Jobs offered for
download are built by the batch's own job kinds (`attnedit.batch`), so they are exactly what it reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr  # apps/__init__.py has set gradio's private temp folder first

import attnedit
from attnedit.pipeline import DEFAULT_MODEL

from .common import (
    MAX_STEPS,
    MAX_UPLOAD,
    RUNS,
    Outputs,
    Page,
    Settings,
    available_controls,
    job_of,
    load_upload,
    mask_canvas,
    readable,
)
from .tabs.concepts import ConceptsTab
from .tabs.consistent import ConsistentTab
from .tabs.generate import GenerateTab
from .tabs.maps import MapsTab
from .tabs.multi_subject import MultiSubjectTab
from .tabs.subjects import SubjectsTab


# ----------------------------------------------------------------------------------- models
class ModelPool:
    """The models the page may use, loaded on first use; one lock per model serialises its runs."""

    def __init__(self, names: list[str], default: str | None = None, *, device: str | None = None,
                 dtype: str | None = None) -> None:
        names = [n.strip() for n in names if n and n.strip()]
        if not names:
            raise ValueError("the app needs at least one model")
        self.names = list(dict.fromkeys(names))
        self.default = default if default is not None else self.names[0]
        if self.default not in self.names:
            self.names.insert(0, self.default)
        self.device, self.dtype = device, dtype
        self._pipes: dict[str, attnedit.EditPipeline] = {}
        self._specs: dict[str, tuple[str, dict[str, Any]]] = {}  # derived models: base + load options
        self._locks = {n: threading.Lock() for n in self.names}
        self._loading = threading.Lock()

    def add(self, name: str, base: str, **load_kw: Any) -> str:
        """Offer a model the server made itself (e.g. `base` plus trained AttenCraft concepts)."""
        self.check(base)
        with self._loading:
            self._specs[name] = (base, load_kw)
            self._locks.setdefault(name, threading.Lock())
            if name not in self.names:
                self.names.append(name)
        return name

    def derived(self, name: str) -> bool:
        return name in self._specs

    def job_defaults(self, name: str) -> tuple[dict[str, Any], dict[str, Path]]:
        """The `defaults` line that replays runs of `name` in `attnedit batch`, and the files it names
        (a model with trained concepts: the base model plus its concepts, copied into the download)."""
        base, extra = self._specs.get(self.check(name), (name, {}))
        defaults: dict[str, Any] = {"model": base}
        files: dict[str, Path] = {}
        if extra.get("concepts"):
            from attnedit.methods.attencraft import META_NAME, WEIGHTS_NAME

            found = Path(extra["concepts"])
            folder = found if found.is_dir() else found.parent
            files = {f"concepts/{n}": folder / n for n in (WEIGHTS_NAME, META_NAME) if (folder / n).is_file()}
            defaults["concepts"] = "concepts"
        return defaults, files

    def check(self, name: str) -> str:
        if name not in self.names:
            raise ValueError(f"model {name!r} is not offered by this app; choose from {', '.join(self.names)}")
        return name

    def get(self, name: str) -> attnedit.EditPipeline:
        self.check(name)
        with self._loading:
            if name not in self._pipes:
                base, extra = self._specs.get(name, (name, {}))
                # safetensors only: never unpickle weights on behalf of a web page
                self._pipes[name] = attnedit.load(base, device=self.device, dtype=self.dtype, use_safetensors=True,
                                                  **extra)
        return self._pipes[name]

    @contextmanager
    def use(self, name: str) -> Iterator[attnedit.EditPipeline]:
        pipe = self.get(name)
        with self._locks[name]:
            yield pipe



# ----------------------------------------------------------------------------------- the app
class AttnEditApp(GenerateTab, MultiSubjectTab, ConsistentTab, SubjectsTab, MapsTab, ConceptsTab):
    """The handlers of every tab (one mixin per tab, `apps/tabs/`); `build()` lays them out as a gr.Blocks page."""

    def __init__(self, pool: ModelPool, outputs: Outputs | None = None, concurrency: int | None = None) -> None:
        self.pool = pool
        # gradio workers for runs; the per-model locks keep one run per pipeline whatever this is
        self.concurrency = concurrency or len(pool.names)
        self.outputs = outputs or Outputs()
        self.controls = available_controls()

    def _jobs(self, model: str, jobs: list[dict[str, Any]], files: dict[str, Any] | None = None,
              stem: str = "attnedit-job") -> str:
        """The download replaying `jobs` with `attnedit batch` (a zip when they name files)."""
        defaults, model_files = self.pool.job_defaults(model)
        return self.outputs.jobs(defaults, jobs, {**model_files, **(files or {})}, stem)

    def model_defaults(self, model: str) -> tuple[int, float, int, int]:
        """(steps, guidance, height, width) of `model`: `EditPipeline.recommended()`, so a model folder's
        `attnedit.json` sets them (the family's defaults otherwise)."""
        rec = self.pool.get(model).recommended()
        return (min(MAX_STEPS, int(rec["steps"])), float(rec["guidance"]), int(rec["height"]), int(rec["width"]))


    # --- page ---------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        pool = self.pool
        probe = pool.get(pool.default)
        model_steps, model_guidance, dh, dw = self.model_defaults(pool.default)
        run = dict(concurrency_id=RUNS, concurrency_limit=self.concurrency)
        with gr.Blocks(title="attnedit", analytics_enabled=False) as demo:
            gr.Markdown("## attnedit — attention control for diffusers pipelines")
            # custom values are let through to ModelPool.check, which refuses anything the server did not offer
            model = gr.Dropdown(choices=pool.names, value=pool.default, label="Model", elem_id="model",
                                allow_custom_value=True)
            # every (steps, guidance[, height, width]) input goes in page.per_model, re-set when a model is chosen
            page = Page(model, model_steps, model_guidance, dh, dw, probe.pixel_stride, run)
            self.build_generate_tab(page)
            self.build_multi_subject_tab(page)
            self.build_consistent_tab(page)
            self.build_subjects_tab(page)
            self.build_maps_tab(page)
            self.build_concepts_tab(page)

            def on_model(name: str) -> list[Any]:
                steps, guidance, height, width = self.model_defaults(name)
                return [v for row in page.per_model for v in (steps, guidance, height, width)[: len(row)]]

            model.change(readable(on_model), model, [c for row in page.per_model for c in row],
                         api_name="model_defaults")

        demo.queue(max_size=64, default_concurrency_limit=self.concurrency)
        return demo


def build_app(models: list[str] | None = None, default: str | None = None, **load_kw: Any) -> gr.Blocks:
    """The page for `models` (default: the bundled default model)."""
    default = default or (models[0] if models else DEFAULT_MODEL)
    pool = ModelPool(models or [default], default, **load_kw)
    return AttnEditApp(pool).build()


CSS = ".attnedit-image img {min-width: 256px; min-height: 256px; object-fit: contain; image-rendering: pixelated;}"
THEME = dict(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, *, block: bool = True) -> str:
    """Serve `demo` (local fonts only, upload cap, errors shown); returns its URL.

    A blocking server (the `attnedit app` process) creates its files readable by this user only (umask 077):
    gradio's copies of results and uploads, in a 0700 folder (`private_gradio_dir`).
    """
    if block:
        import os

        os.umask(0o077)
    demo.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD, show_error=True, quiet=True,
                prevent_thread_lock=not block, ssr_mode=False, footer_links=["api"], css=CSS,
                theme=gr.themes.Default(**THEME))
    return demo.local_url


__all__ = ["AttnEditApp", "ModelPool", "Outputs", "Settings", "build_app", "job_of", "launch", "load_upload",
           "mask_canvas"]
