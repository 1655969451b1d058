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
"""

from __future__ import annotations

import functools
import io
import json
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnedit.app_cli import private_gradio_dir

private_gradio_dir()  # before gradio reads GRADIO_TEMP_DIR: results and uploads stay private to this user

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, UnidentifiedImageError  # noqa: E402

import attnedit  # noqa: E402
from attnedit import validate  # noqa: E402
from attnedit.pipeline import DEFAULT_MODEL  # noqa: E402
from attnedit.visualize import fit_text, heatmap, label_font, map_grid  # noqa: E402

MAX_UPLOAD = "8mb"  # gradio rejects larger uploads before they reach a handler
MAX_UPLOAD_PIXELS = 4096 * 4096  # larger images are refused before they are decoded
MAX_SIDE = 1024  # largest image side the page may ask for
MAX_STEPS = 100
MAX_SELF_TOKENS = 1024  # self-attention maps kept for the pixel picker: grids up to 32x32
SPEEDUPS = ("todo", "agent", "clear")  # toggles of the Generate tab, shown when the control exists
RUNS = "attnedit-runs"  # one gradio concurrency group for every run; the model locks do the rest


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


# ------------------------------------------------------------------------------------ helpers
def available_controls() -> dict[str, type]:
    """`attnedit.CONTROLS` after importing every method module that imports cleanly."""
    import importlib
    import pkgutil

    import attnedit.methods as methods

    for info in pkgutil.iter_modules(methods.__path__):
        try:
            importlib.import_module(f"attnedit.methods.{info.name}")
        except Exception as err:  # a method being written right now must not take the app down
            print(f"attnedit app: method module {info.name!r} not loaded: {type(err).__name__}: {err}")
    return dict(attnedit.CONTROLS)


def readable(fn: Callable) -> Callable:
    """Turn attnedit's ValueErrors (unknown word, bad box, bad size ...) into messages in the page."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as err:
            raise gr.Error(str(err), title="Cannot run this") from err

    return wrapper


class _StepProgress(attnedit.Control):
    """Reports each denoising step to the page; acts on no layer."""

    name = "app-progress"

    def __init__(self, report: Callable[[int, int], None]) -> None:
        super().__init__(layers=lambda info: False)
        self._report = report

    def begin_step(self, run: Any, step: int) -> None:
        self._report(step, run.num_steps or 1)


PROGRESS = gr.Progress()  # gradio swaps in each request's own tracker
PROGRESS_TQDM = gr.Progress(track_tqdm=True)  # training reports through its tqdm bar


def _progress(progress: gr.Progress, what: str) -> _StepProgress:
    return _StepProgress(lambda step, total: progress((step, total), desc=f"{what}: step {step + 1}/{total}"))


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    """A whole number from a page widget (gradio's numbers and sliders send floats: 3.0 is 3, 2.5 is refused)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return validate.integer(what, value, lo, hi)


def _guidance(value: Any) -> float:
    return validate.number("guidance", value, 0.0, 30.0)


def load_upload(value: Any, what: str = "the uploaded image") -> Image.Image | None:
    """An uploaded file as an RGB image, or a readable refusal: not an image, or too many pixels.

    The page passes file paths (so a bad upload reaches this check instead of failing inside gradio's
    preprocessing with its own message); the size is read from the header, before any decoding.
    """
    if value is None:
        return None
    if isinstance(value, Image.Image):
        image = value
    else:
        path = value if isinstance(value, (str, Path)) else getattr(value, "name", None) or value.get("path")
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as err:
            limit = MAX_UPLOAD_PIXELS // 2**20
            raise ValueError(f"{what} has too many pixels ({err}); the app takes images up to {limit} megapixels "
                             "(e.g. 4096x4096): make it smaller first") from None
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{what} is not an image the app can read; upload a PNG, JPEG or WebP file") from None
    w, h = image.size
    if w * h > MAX_UPLOAD_PIXELS:
        raise ValueError(f"{what} is {w}x{h} pixels; the app takes images up to {MAX_UPLOAD_PIXELS // 2**20} "
                         "megapixels (e.g. 4096x4096): make it smaller first")
    try:
        image.load()
    except (OSError, Image.DecompressionBombError):
        raise ValueError(f"{what} is damaged or cut short; upload it again") from None
    return image.convert("RGB")


@dataclass
class Settings:
    """The generation parameters common to every tab, checked against the app's limits."""

    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    negative_prompt: str | None = None

    @classmethod
    def parse(cls, seed: Any, steps: Any, guidance: Any, height: Any, width: Any,
              negative_prompt: str | None = None) -> Settings:
        return cls(
            seed=_int(seed, "seed", 0, 2**32 - 1),
            steps=_int(steps, "steps", 1, MAX_STEPS),
            guidance=_guidance(guidance),
            height=_int(height, "height", 8, MAX_SIDE),
            width=_int(width, "width", 8, MAX_SIDE),
            negative_prompt=(negative_prompt or "").strip() or None,
        )

    def kwargs(self) -> dict[str, Any]:
        return dict(seed=self.seed, steps=self.steps, guidance=self.guidance, height=self.height,
                    width=self.width, negative_prompt=self.negative_prompt)


def _prompt(text: str | None, what: str = "prompt") -> str:
    text = (text or "").strip()
    if not text:
        raise ValueError(f"the {what} is empty; type what the image should show")
    return text


def control_spec(control: attnedit.Control) -> dict[str, Any]:
    """A control as the batch CLI and `make_control` take it: its name and constructor options."""
    return {"name": control.name, **control.options()}


def job_of(params: dict[str, Any], controls: list[attnedit.Control]) -> dict[str, Any]:
    """One job line of `attnedit batch` reproducing a result (the model goes in the defaults line)."""
    job: dict[str, Any] = {
        "prompt": params["prompt"],
        "seeds": list(params["seeds"]),
        "steps": params["steps"],
        "guidance": params["guidance"],
        "height": params["height"],
        "width": params["width"],
        "controls": [control_spec(c) for c in controls],
    }
    if params.get("negative_prompt"):
        job["negative_prompt"] = params["negative_prompt"]
    return job


def jobs_file(defaults: dict[str, Any], jobs: list[dict[str, Any]]) -> str:
    """The JSONL text `attnedit batch FILE` takes: a defaults line naming the model, then the jobs."""
    lines = [{"defaults": defaults}, *jobs]
    return "".join(json.dumps(line) + "\n" for line in lines)


class Outputs:
    """Files handed to the page (PNG images, JSON jobs), in a private temp folder pruned hourly."""

    def __init__(self, root: Path | None = None, keep_s: float = 3600.0) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="attnedit-app-"))  # mkdtemp: 0700
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.keep_s = keep_s

    def _prune(self) -> None:
        now = time.time()
        for path in self.root.iterdir():
            if path.is_file() and now - path.stat().st_mtime > self.keep_s:
                path.unlink(missing_ok=True)

    def png(self, image: Image.Image, stem: str = "attnedit") -> str:
        self._prune()
        path = self.root / f"{stem}-{uuid.uuid4().hex[:8]}.png"
        image.save(path, format="PNG")
        path.chmod(0o600)
        return str(path)

    def jobs(self, defaults: dict[str, Any], jobs: list[dict[str, Any]], files: dict[str, Any] | None = None,
             stem: str = "attnedit-job") -> str:
        """A batch job file (JSONL) for the downloads; with `files` (name in the job -> PIL image or
        path), a zip of one folder holding `job.jsonl` and those files, so the job replays unzipped."""
        self._prune()
        name = f"{stem}-{uuid.uuid4().hex[:8]}"
        text = jobs_file(defaults, jobs)
        if not files:
            path = self.root / f"{name}.jsonl"
            path.write_text(text)
            path.chmod(0o600)
            return str(path)
        path = self.root / f"{name}.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{name}/job.jsonl", text)
            for rel, source in files.items():
                if isinstance(source, Image.Image):
                    buf = io.BytesIO()
                    source.save(buf, format="PNG")
                    zf.writestr(f"{name}/{rel}", buf.getvalue())
                else:
                    zf.write(source, f"{name}/{rel}")
        path.chmod(0o600)
        return str(path)


def _timing(seconds: float, settings: Settings, extra: str = "") -> str:
    return (f"{settings.steps} steps, {settings.height}x{settings.width}, seed {settings.seed}: "
            f"**{seconds:.2f} s**{extra}")


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


def display_scale(image: Image.Image, target: int = 256) -> int:
    """Whole-number enlargement that shows small (e.g. 64 px) images at about `target` px."""
    return max(1, target // max(image.size))


def enlarge(image: Image.Image) -> Image.Image:
    """Pixel-exact enlargement for display (clicks map back by integer division)."""
    k = display_scale(image)
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)


def _mark(image: Image.Image, x: int, y: int) -> Image.Image:
    out = image.copy()
    r = max(2, image.width // 40)
    ImageDraw.Draw(out).ellipse((x - r, y - r, x + r, y + r), outline="red", width=max(1, r // 2))
    return out


def parse_boxes(text: str | None) -> list[list[float]] | None:
    """`x0,y0,x1,y1; x0,y0,x1,y1` (fractions of the image, origin top-left) -> boxes, or None."""
    text = (text or "").strip()
    if not text:
        return None
    boxes = []
    for i, part in enumerate(p for p in text.replace("\n", ";").split(";") if p.strip()):
        try:
            box = [float(v) for v in part.replace(" ", ",").split(",") if v.strip()]
        except ValueError:
            box = []
        if len(box) != 4:
            raise ValueError(f"box {i} {part.strip()!r} is not 4 numbers x0,y0,x1,y1 (fractions 0..1 of the image); "
                             "separate boxes with ';'")
        boxes.append(box)
    return boxes


def draw_boxes(image: Image.Image, boxes: list[list[float]] | None, labels: list[str] | None = None) -> Image.Image:
    """The image with each normalised box outlined (and labelled), for showing where subjects go."""
    out = image.convert("RGB").copy()
    if not boxes:
        return out
    draw = ImageDraw.Draw(out)
    colours = ["red", "cyan", "yellow", "lime", "magenta", "orange"]
    w, h = out.size
    line = max(1, w // 64)
    font = label_font(max(11, w // 22))
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        c = colours[i % len(colours)]
        draw.rectangle((x0 * w, y0 * h, x1 * w - 1, y1 * h - 1), outline=c, width=line)
        if labels and i < len(labels):
            # inside the box, clear of its outline, on a dark chip so any colour reads; shortened to fit
            text = fit_text(draw, labels[i], font, max(8.0, (x1 - x0) * w - 2 * line - 6))
            tx, ty = x0 * w + line + 3, y0 * h + line + 2
            left, top, right, bottom = draw.textbbox((tx, ty), text, font=font)
            draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(30, 30, 30))
            draw.text((tx, ty), text, fill=c, font=font)
    return out


def format_boxes(boxes: list[list[float]]) -> str:
    return "; ".join(",".join(f"{v:.2f}" for v in b) for b in boxes)


def click_box(boxes: str | None, pending: tuple[float, float] | None, x: float, y: float, width: int,
              height: int) -> tuple[str, tuple[float, float] | None]:
    """Canvas clicks: the first click of a pair marks a corner, the second closes the box."""
    fx, fy = min(max(x / width, 0.0), 1.0), min(max(y / height, 0.0), 1.0)
    if pending is None:
        return boxes or "", (fx, fy)
    x0, x1 = sorted((pending[0], fx))
    y0, y1 = sorted((pending[1], fy))
    if x1 - x0 < 0.02 or y1 - y0 < 0.02:
        return boxes or "", (fx, fy)  # a click on (almost) the same spot restarts the box there
    try:
        current = parse_boxes(boxes) or []
    except ValueError:
        current = []
    return format_boxes([*current, [x0, y0, x1, y1]]), None


def box_canvas(boxes: str | None, words: str | None, height: Any, width: Any,
               pending: tuple[float, float] | None = None, side: int = 320) -> Image.Image:
    """A blank canvas of the image's aspect ratio with the typed boxes (and a started corner) drawn."""
    try:
        h, w = max(1.0, float(height)), max(1.0, float(width))
    except (TypeError, ValueError):
        h = w = 1.0
    scale = side / max(h, w)
    canvas = Image.new("RGB", (max(8, round(w * scale)), max(8, round(h * scale))), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    for i in range(1, 4):  # quarter lines to aim by
        draw.line((canvas.width * i // 4, 0, canvas.width * i // 4, canvas.height), fill=(220, 220, 220))
        draw.line((0, canvas.height * i // 4, canvas.width, canvas.height * i // 4), fill=(220, 220, 220))
    try:
        parsed = parse_boxes(boxes)
    except ValueError:
        parsed = None
    out = draw_boxes(canvas, parsed, _words(words))
    if pending is not None:
        px, py = pending[0] * out.width, pending[1] * out.height
        ImageDraw.Draw(out).ellipse((px - 4, py - 4, px + 4, py + 4), outline="black", width=2)
    return out


def _words(text: str | None) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def _lines(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").splitlines() if t.strip()]


def fit_upload(image: Image.Image | None, size: tuple[int, int], stride: int) -> tuple[Image.Image, list[str]]:
    """An uploaded image at most the model's size (larger ones resized, said in the notes)."""
    if image is None:
        raise ValueError("upload an image first")
    notes = []
    h, w = size
    if image.width > w or image.height > h:
        scale = min(w / image.width, h / image.height)
        nw = max(stride, int(image.width * scale) // stride * stride)
        nh = max(stride, int(image.height * scale) // stride * stride)
        notes.append(f"the image ({image.width}x{image.height}) is larger than the model's {w}x{h}: "
                     f"resized to {nw}x{nh}")
        image = image.convert("RGB").resize((nw, nh), Image.Resampling.LANCZOS)
    return image.convert("RGB"), notes


def mask_canvas(height: Any, width: Any, side: int = 256) -> Image.Image:
    """A blank canvas to paint a mask on: the image size times a whole number, so strokes map back exactly."""
    try:
        h, w = max(1, int(float(height))), max(1, int(float(width)))
    except (TypeError, ValueError, OverflowError):
        h = w = 64
    k = max(1, side // max(h, w))
    return Image.new("RGB", (w * k, h * k), (235, 235, 235))


def editor_value(background: Image.Image | None) -> dict[str, Any] | None:
    """An ImageEditor value with `background` and nothing painted yet."""
    if background is None:
        return None
    return {"background": background, "layers": [], "composite": background}


def drawn_mask(value: Any, size: tuple[int, int], upload: tuple[int, int] | None = None) -> Image.Image:
    """The painted pixels of an ImageEditor value as a white-on-black mask of `size` (H, W).

    The canvas may be the image size times a whole number (the page shows small images enlarged:
    a cell is foreground when at least half of its pixels are painted) or, for a resized upload, the
    upload's own size (H, W) `upload`; anything else, or nothing painted, is refused with the reason.
    """
    layers = [im for im in (value or {}).get("layers") or [] if im is not None] if isinstance(value, dict) else []
    if not layers:
        raise ValueError("the drawn mask is empty: paint the foreground on the mask canvas, "
                         "or untick 'Use the drawn mask'")
    painted = None
    for layer in layers:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        if painted is not None and alpha.shape != painted.shape:
            raise ValueError(f"the mask layers have different sizes ({painted.shape} and {alpha.shape})")
        painted = alpha if painted is None else painted | alpha
    mh, mw = painted.shape
    h, w = size
    if (mh, mw) == (h, w):
        mask = painted
    elif mh % h == 0 and mw % w == 0 and mh // h == mw // w:
        k = mh // h
        mask = painted.reshape(h, k, w, k).mean(axis=(1, 3)) >= 0.5
    elif upload is not None and (mh, mw) == tuple(upload):
        mask = np.asarray(Image.fromarray(painted).resize((w, h), Image.Resampling.NEAREST))
    else:
        raise ValueError(f"the drawn mask is {mw}x{mh} but the image is {w}x{h} (W x H): paint on the canvas "
                         "the page shows for this image and size (changing the size or the upload gives a new one)")
    if not mask.any():
        raise ValueError("the drawn mask is empty: paint the foreground on the mask canvas, "
                         "or untick 'Use the drawn mask'")
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def _mask_options(word: str | None, use_drawn: bool, drawn: Any, size: tuple[int, int], n_images: int,
                  upload: tuple[int, int] | None = None) -> tuple[dict[str, Any], Image.Image | None]:
    """MasaCtrl's mask options from the page: a word's attention, or one drawn mask for every image."""
    word = (word or "").strip()
    if not use_drawn:
        return ({"mask_words": word} if word else {}), None
    if word:
        raise ValueError("give either a mask word or a drawn mask, not both (clear the word or untick the box)")
    mask = drawn_mask(drawn, size, upload)
    return {"masks": [mask] * n_images}, mask


def _with_mask_file(spec: dict[str, Any], mask: Image.Image | None, name: str = "mask.png") -> dict[str, Any]:
    """A MasaCtrl spec whose drawn masks are named by the PNG saved next to the job."""
    if mask is None:
        return spec
    return {**spec, "masks": [name] * len(spec["masks"])}


DEFAULT_BOXES = "0.05,0.20,0.45,0.80; 0.55,0.20,0.95,0.80"
MULTI_SUBJECT = {"astar": "A-STAR", "attend_excite": "Attend-and-Excite", "bounded": "Bounded Attention"}


# ----------------------------------------------------------------------------------- the app
class AttnEditApp:
    """The handlers of every tab; `build()` lays them out as a gr.Blocks page."""

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

    # --- Generate ---------------------------------------------------------------------------
    def speedups(self) -> list[str]:
        return [n for n in SPEEDUPS if n in self.controls and (n != "clear" or self.has_clear_adapter())]

    def has_clear_adapter(self, model: str | None = None) -> bool:
        """CLEAR needs the model's trained adapter (`attnedit.load(..., clear=path)` attaches it)."""
        return hasattr(self.pool.get(model or self.pool.default).denoiser, "attnedit_clear")

    def generate(self, model: str, prompt: str, negative_prompt: str, seed: float, steps: float, guidance: float,
                 height: float, width: float, todo: bool = False, todo_factor: float = 2, agent: bool = False,
                 clear: bool = False, progress: gr.Progress = PROGRESS):
        """Prompt -> image, PNG and job JSON downloads, and how long the run took."""
        prompt = _prompt(prompt)
        settings = Settings.parse(seed, steps, guidance, height, width, negative_prompt)
        controls = self._speed_controls(model, todo=todo, todo_factor=todo_factor, agent=agent, clear=clear)
        with self.pool.use(model) as pipe:
            start = time.perf_counter()
            result = pipe.generate(prompt, controls=[*controls, _progress(progress, "generating")],
                                   **settings.kwargs())
            seconds = time.perf_counter() - start
        names = ", ".join(c.name for c in controls)
        info = _timing(seconds, settings, f" with {names}" if names else "")
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
            options = {"factor": _int(todo_factor, "ToDo factor", 1, 8)} if name == "todo" else {}
            controls.append(attnedit.make_control(name, options))
        return controls

    # --- Attention maps -----------------------------------------------------------------------
    def maps(self, model: str, prompt: str, words: str, seed: float, steps: float, guidance: float,
             height: float, width: float, progress: gr.Progress = PROGRESS):
        """Prompt -> image, one heatmap per word, a step slider and the pixel picker's maps."""
        prompt = _prompt(prompt)
        settings = Settings.parse(seed, steps, guidance, height, width)
        chosen = [w.strip() for w in (words or "").split(",") if w.strip()] or None
        with self.pool.use(model) as pipe:
            stride = pipe.vae_scale_factor
            latent = (settings.height // stride, settings.width // stride)
            store = attnedit.AttentionStore(words=chosen, per_step=True, self_attention=True,
                                            layers=_self_layers(latent))
            start = time.perf_counter()
            result = pipe.generate(prompt, controls=[store, _progress(progress, "recording maps")],
                                   **settings.kwargs())
            seconds = time.perf_counter() - start
        session = MapsSession(store=store, image=result.image, steps=settings.steps, self_grid=_self_grid(store))
        grid = map_grid(store.word_maps(0), result.image)
        note = "" if session.self_grid else " (no self-attention layer small enough for the pixel picker)"
        info = _timing(seconds, settings, note) + " — click the image for the self-attention of a pixel."
        slider = gr.Slider(minimum=0, maximum=settings.steps - 1, value=settings.steps - 1, step=1,
                           interactive=settings.steps > 1)
        return (enlarge(result.image), grid, slider, info, session, self.outputs.png(result.image),
                self._jobs(model, [job_of(result.params, [])]))

    def maps_step(self, step: float, session: MapsSession | None):
        """Word maps of one denoising step of the last run."""
        if session is None:
            raise ValueError("run the Attention maps tab first, then move the step slider")
        step = _int(step, "step", 0, session.steps - 1)
        return map_grid(session.store.step_word_maps(step), session.image)

    def self_attention(self, x: float, y: float, session: MapsSession | None):
        """Self-attention of the image pixel (x, y) of the last run, as a heatmap over the image."""
        if session is None:
            raise ValueError("run the Attention maps tab first, then click a pixel of its image")
        if session.self_grid is None:
            raise ValueError("this run kept no self-attention map (grids above "
                             f"{MAX_SELF_TOKENS} tokens are not kept); try a smaller size")
        w, h = session.image.size
        px, py = _int(x, "x", 0, w - 1), _int(y, "y", 0, h - 1)
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

    # --- Multi-subject ------------------------------------------------------------------------
    def multi_methods(self) -> list[str]:
        return [n for n in MULTI_SUBJECT if n in self.controls]

    def multi_subject(self, model: str, prompt: str, method: str, words: str, boxes: str, seed: float,
                      steps: float, guidance: float, height: float, width: float,
                      progress: gr.Progress = PROGRESS):
        """The plain image and the controlled one (same seed), boxes drawn, and each word's map."""
        prompt = _prompt(prompt)
        settings = Settings.parse(seed, steps, guidance, height, width)
        if method not in self.multi_methods():
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(self.multi_methods())}")
        subjects = _words(words)
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
            plain = pipe.generate(prompt, controls=[_progress(progress, "plain image")], **settings.kwargs())
            result = pipe.generate(prompt, controls=[control, store, _progress(progress, MULTI_SUBJECT[method])],
                                   **settings.kwargs())
            seconds = time.perf_counter() - start
        shown = draw_boxes(result.image, options.get("boxes"), subjects) if method == "bounded" else result.image
        grid = map_grid(store.word_maps(0), result.image)
        info = _timing(seconds, settings, f" (plain + {MULTI_SUBJECT[method]})")
        return (plain.image, shown, grid, info, self.outputs.png(result.image),
                self._jobs(model, [job_of(result.params, [control])]))

    # --- Consistent & edit ----------------------------------------------------------------------
    def consistent(self, model: str, source: str, targets: str, mask_word: str, seed: float, steps: float,
                   guidance: float, height: float, width: float, use_drawn: bool = False, drawn: Any = None,
                   progress: gr.Progress = PROGRESS):
        """MasaCtrl: a source and several targets from one noise; targets keep the source's look.

        Optional mask (mask-guided MasaCtrl): `mask_word`'s cross-attention, or with `use_drawn` the
        mask painted on `drawn` (an ImageEditor value), the foreground of the source and every target.
        """
        from attnedit.methods.masactrl import consistent

        source = _prompt(source, "source prompt")
        prompts = _lines(targets)
        if not prompts:
            raise ValueError("give at least one target prompt (one per line)")
        settings = Settings.parse(seed, steps, guidance, height, width)
        options, mask = _mask_options(mask_word, use_drawn, drawn, (settings.height, settings.width),
                                      1 + len(prompts))
        control = attnedit.make_control("masactrl", options)
        with self.pool.use(model) as pipe:
            start = time.perf_counter()
            kw = settings.kwargs()
            seed_ = kw.pop("seed")
            kw.pop("negative_prompt")
            result = consistent(pipe, source, prompts, control=control, seed=seed_,
                                controls=[_progress(progress, "MasaCtrl")], **kw)
            seconds = time.perf_counter() - start
        captions = ["source: " + source] + ["target: " + t for t in prompts]
        job = {"prompts": [source, *prompts], "together": True, "seeds": [settings.seed], "steps": settings.steps,
               "guidance": settings.guidance, "height": settings.height, "width": settings.width,
               "controls": [_with_mask_file(control_spec(control), mask)]}
        pngs = [self.outputs.png(im, f"masactrl-{i}") for i, im in enumerate(result.images)]
        extra = f" ({len(result.images)} images)" + (", drawn mask" if mask is not None else "")
        return (list(zip(result.images, captions)), _timing(seconds, settings, extra), pngs,
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
        target = _prompt(target, "target prompt")
        n_steps = _int(steps, "steps", 1, MAX_STEPS)
        scale = _guidance(guidance)
        image = load_upload(image, "the image to edit")
        fitted, notes = self.edit_input(model, image)
        upload = (image.height, image.width) if image is not None else None
        options, mask = _mask_options(mask_word, use_drawn, drawn, (fitted.height, fitted.width), 2, upload)
        control = attnedit.make_control("masactrl", options)
        with self.pool.use(model) as pipe:
            progress(0.0, desc="inverting the image")
            start = time.perf_counter()
            result = pipe.edit(fitted, source, target, control=control, steps=n_steps, guidance=scale,
                               controls=[_progress(progress, "editing")])
            seconds = time.perf_counter() - start
        notes += list(result.records.get("inversion", {}).get("notes", []))
        h, w = result.records.get("inversion", {}).get("size", [fitted.height, fitted.width])
        info = (f"{n_steps} steps, {h}x{w}: **{seconds:.2f} s**" + (", drawn mask" if mask is not None else "")
                + "".join(f"\n\n_{n}_" for n in notes))
        job = {"image": "image.png", "source_prompt": source, "prompt": target, "steps": n_steps, "guidance": scale,
               "controls": [_with_mask_file(control_spec(control), mask)]}
        files = {"image.png": fitted, **({"mask.png": mask} if mask is not None else {})}
        gallery = [(result.images[0], "reconstruction"), *((im, "edit") for im in result.images[1:])]
        return gallery, info, self.outputs.png(result.images[-1], "edit"), self._jobs(model, [job], files, "edit")

    # --- Subjects across images -------------------------------------------------------------------
    def subjects(self, model: str, references: str, subject_words: str, scene: str, boxes: str, seed: float,
                 steps: float, guidance: float, height: float, width: float, reposition: bool = True,
                 isolate: bool = True, reference_files: list[Any] | None = None, progress: gr.Progress = PROGRESS):
        """IR-Diffusion: references and one scene; the scene's subjects keep their references' look.

        `reference_files`: optional real photos, one per reference prompt (inverted, then followed).
        """
        from attnedit.methods.ir_diffusion import ir_diffusion

        refs = _lines(references)
        words = _words(subject_words)
        scene = _prompt(scene, "scene prompt")
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
        block: dict[str, Any] = {"prompts": refs, "subjects": words}
        if target_boxes is not None:
            block["boxes"] = target_boxes
        files = {f"reference-{i + 1}.png": photo for i, photo in enumerate(photos or [])}
        if files:
            block["images"] = list(files)
        block["options"] = options
        job = {"prompt": scene, "seeds": [settings.seed], "steps": settings.steps, "guidance": settings.guidance,
               "height": settings.height, "width": settings.width, "references": block}
        extra = f" ({len(images)} images)" + "".join(f"\n\n_{n}_" for n in notes)
        return (list(zip(images, captions)), _timing(seconds, settings, extra),
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

    # --- Concepts (AttenCraft) --------------------------------------------------------------------
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
        names = _words(concepts)
        n_steps = _int(steps, "training steps", 1, 500)
        n_class = _int(class_images, "class images", 0, 50)
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

    # --- page ---------------------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        pool = self.pool
        probe = pool.get(pool.default)
        model_steps, model_guidance, dh, dw = self.model_defaults(pool.default)
        stride = probe.pixel_stride
        run = dict(concurrency_id=RUNS, concurrency_limit=self.concurrency)
        # every (steps, guidance[, height, width]) input, re-set to a model's own settings when it is chosen
        per_model: list[list[gr.components.Component]] = []

        def settings_row(tab: str) -> list[gr.components.Component]:
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
                n_steps = gr.Slider(1, MAX_STEPS, value=model_steps, step=1, label="Steps", elem_id=f"{tab}-steps")
                guidance = gr.Slider(0.0, 20.0, value=model_guidance, step=0.5, label="Guidance",
                                     elem_id=f"{tab}-guidance")
                height = gr.Number(value=dh, precision=0, label=f"Height (multiple of {stride})", step=stride,
                                   elem_id=f"{tab}-height")
                width = gr.Number(value=dw, precision=0, label=f"Width (multiple of {stride})", step=stride,
                                  elem_id=f"{tab}-width")
            per_model.append([n_steps, guidance, height, width])
            return [seed, n_steps, guidance, height, width]

        def mask_inputs(tab: str, canvas: Image.Image | None, info: str) -> tuple[gr.Checkbox, gr.ImageEditor]:
            use = gr.Checkbox(label="Use the drawn mask (instead of a mask word)", value=False,
                              elem_id=f"{tab}-use-mask")
            editor = gr.ImageEditor(value=editor_value(canvas), type="pil", image_mode="RGBA", format="png",
                                    sources=(), transforms=(), layers=False, label=info, height=300,
                                    brush=gr.Brush(colors=["#ff2020"], color_mode="fixed"),
                                    elem_id=f"{tab}-mask")
            return use, editor

        with gr.Blocks(title="attnedit", analytics_enabled=False) as demo:
            gr.Markdown("## attnedit — attention control for diffusers pipelines")
            # custom values are let through to ModelPool.check, which refuses anything the server did not offer
            model = gr.Dropdown(choices=pool.names, value=pool.default, label="Model", elem_id="model",
                                allow_custom_value=True)

            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square", elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt", value="")
                        common = settings_row("generate")
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

            if self.multi_methods():
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
                            s_common = settings_row("multi")
                            s_pending = gr.State(None)
                            s_canvas = gr.Image(box_canvas(DEFAULT_BOXES, "circle, square", dh, dw),
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

            if "masactrl" in self.controls:
                with gr.Tab("Consistent & edit", id="consistent"):
                    gr.Markdown("**MasaCtrl**: the targets start from the source's noise and read its "
                                "self-attention keys/values, so they keep its look while their prompts change it.")
                    with gr.Row():
                        with gr.Column():
                            c_source = gr.Textbox(label="Source prompt", value="a red circle")
                            c_targets = gr.Textbox(label="Target prompts (one per line)", lines=3,
                                                   value="a red circle on the left\na red circle on the right")
                            c_mask = gr.Textbox(label="Mask word (optional: foreground from its attention)", value="")
                            c_common = settings_row("consistent")
                            c_use, c_draw = mask_inputs("consistent", mask_canvas(dh, dw),
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
                                e_steps = gr.Slider(1, MAX_STEPS, value=model_steps, step=1, label="Steps",
                                                    elem_id="edit-steps")
                                e_guidance = gr.Slider(0.0, 20.0, value=model_guidance, step=0.5, label="Guidance",
                                                       elem_id="edit-guidance")
                            per_model.append([e_steps, e_guidance])
                            e_mask = gr.Textbox(label="Mask word (optional: foreground from its attention)",
                                                value="")
                            e_use, e_draw = mask_inputs("edit", None, "Or paint the foreground on the image "
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

            if "reposition" in self.controls:
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
                            i_common = settings_row("subjects")
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

            with gr.Tab("Attention maps", id="maps"):
                session = gr.State(None)
                with gr.Row():
                    with gr.Column():
                        m_prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square")
                        m_words = gr.Textbox(label="Words (comma-separated; empty = every word)", value="")
                        m_common = settings_row("maps")
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

            if self.has_attencraft():
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

            def on_model(name: str) -> list[Any]:
                steps, guidance, height, width = self.model_defaults(name)
                return [v for row in per_model for v in (steps, guidance, height, width)[: len(row)]]

            model.change(readable(on_model), model, [c for row in per_model for c in row], api_name="model_defaults")

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


__all__ = ["AttnEditApp", "ModelPool", "Outputs", "Settings", "build_app", "job_of", "launch"]
