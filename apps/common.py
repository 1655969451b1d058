"""What every tab of the app shares: limits, input checks (uploads, settings, boxes, masks), progress,
the files handed to the page (PNGs, replayable batch jobs) and the layout helpers of a tab (`Page`)."""

from __future__ import annotations

import functools
import io
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr  # apps/__init__.py has set gradio's private temp folder first
import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

import attnedit
from attnedit import validate
from attnedit.batch import GENERATE, job_file_text
from attnedit.visualize import fit_text, label_font

MAX_UPLOAD = "8mb"  # gradio rejects larger uploads before they reach a handler
MAX_UPLOAD_PIXELS = 4096 * 4096  # larger images are refused before they are decoded
MAX_SIDE = 1024  # largest image side the page may ask for
MAX_STEPS = 100
MAX_SELF_TOKENS = 1024  # self-attention maps kept for the pixel picker: grids up to 32x32
SPEEDUPS = ("todo", "agent", "clear")  # toggles of the Generate tab, shown when the control exists
RUNS = "attnedit-runs"  # one gradio concurrency group for every run; the model locks do the rest


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


def step_progress(progress: gr.Progress, what: str) -> _StepProgress:
    return _StepProgress(lambda step, total: progress((step, total), desc=f"{what}: step {step + 1}/{total}"))


def as_int(value: Any, what: str, lo: int, hi: int) -> int:
    """A whole number from a page widget (gradio's numbers and sliders send floats: 3.0 is 3, 2.5 is refused)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return validate.integer(what, value, lo, hi)


def as_guidance(value: Any) -> float:
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
            seed=as_int(seed, "seed", 0, 2**32 - 1),
            steps=as_int(steps, "steps", 1, MAX_STEPS),
            guidance=as_guidance(guidance),
            height=as_int(height, "height", 8, MAX_SIDE),
            width=as_int(width, "width", 8, MAX_SIDE),
            negative_prompt=(negative_prompt or "").strip() or None,
        )

    def kwargs(self) -> dict[str, Any]:
        return dict(seed=self.seed, steps=self.steps, guidance=self.guidance, height=self.height,
                    width=self.width, negative_prompt=self.negative_prompt)


def need_prompt(text: str | None, what: str = "prompt") -> str:
    text = (text or "").strip()
    if not text:
        raise ValueError(f"the {what} is empty; type what the image should show")
    return text


def job_of(params: dict[str, Any], controls: list[attnedit.Control]) -> dict[str, Any]:
    """One `attnedit batch` job reproducing a generate result (`result.params`; the model goes in the defaults)."""
    return GENERATE.to_job(params["prompt"], seeds=params["seeds"], steps=params["steps"],
                           guidance=params["guidance"], height=params["height"], width=params["width"],
                           controls=controls, negative_prompt=params.get("negative_prompt"))


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
        text = job_file_text(defaults, jobs)
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


def timing(seconds: float, settings: Settings, extra: str = "") -> str:
    return (f"{settings.steps} steps, {settings.height}x{settings.width}, seed {settings.seed}: "
            f"**{seconds:.2f} s**{extra}")



def display_scale(image: Image.Image, target: int = 256) -> int:
    """Whole-number enlargement that shows small (e.g. 64 px) images at about `target` px."""
    return max(1, target // max(image.size))


def enlarge(image: Image.Image) -> Image.Image:
    """Pixel-exact enlargement for display (clicks map back by integer division)."""
    k = display_scale(image)
    return image if k == 1 else image.resize((image.width * k, image.height * k), Image.Resampling.NEAREST)



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
    out = draw_boxes(canvas, parsed, words_of(words))
    if pending is not None:
        px, py = pending[0] * out.width, pending[1] * out.height
        ImageDraw.Draw(out).ellipse((px - 4, py - 4, px + 4, py + 4), outline="black", width=2)
    return out


def words_of(text: str | None) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def lines_of(text: str | None) -> list[str]:
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


def mask_options(word: str | None, use_drawn: bool, drawn: Any, size: tuple[int, int], n_images: int,
                  upload: tuple[int, int] | None = None) -> tuple[dict[str, Any], Image.Image | None]:
    """MasaCtrl's mask options from the page: a word's attention, or one drawn mask for every image."""
    word = (word or "").strip()
    if not use_drawn:
        return ({"mask_words": word} if word else {}), None
    if word:
        raise ValueError("give either a mask word or a drawn mask, not both (clear the word or untick the box)")
    mask = drawn_mask(drawn, size, upload)
    return {"masks": [mask] * n_images}, mask


def with_mask_file(spec: dict[str, Any], mask: Image.Image | None, name: str = "mask.png") -> dict[str, Any]:
    """A MasaCtrl spec whose drawn masks are named by the PNG saved next to the job."""
    if mask is None:
        return spec
    return {**spec, "masks": [name] * len(spec["masks"])}



# ------------------------------------------------------------------------------------ layout
@dataclass
class Page:
    """What the tabs' layouts share: the model dropdown, the settings the page opens with (the default
    model's), the concurrency of runs, and every steps/guidance[/size] input a model choice re-sets."""

    model: gr.Dropdown
    steps: int
    guidance: float
    height: int
    width: int
    stride: int
    run: dict[str, Any]  # the keyword arguments of every run event (one concurrency group)
    per_model: list[list[Any]] = field(default_factory=list)

    def settings_row(self, tab: str) -> list[Any]:
        """Seed, steps, guidance, height and width inputs of `tab`, in that order."""
        stride = self.stride
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
            n_steps = gr.Slider(1, MAX_STEPS, value=self.steps, step=1, label="Steps", elem_id=f"{tab}-steps")
            guidance = gr.Slider(0.0, 20.0, value=self.guidance, step=0.5, label="Guidance",
                                 elem_id=f"{tab}-guidance")
            height = gr.Number(value=self.height, precision=0, label=f"Height (multiple of {stride})", step=stride,
                               elem_id=f"{tab}-height")
            width = gr.Number(value=self.width, precision=0, label=f"Width (multiple of {stride})", step=stride,
                              elem_id=f"{tab}-width")
        self.per_model.append([n_steps, guidance, height, width])
        return [seed, n_steps, guidance, height, width]

    def mask_inputs(self, tab: str, canvas: Image.Image | None, info: str) -> tuple[gr.Checkbox, gr.ImageEditor]:
        """The 'use the drawn mask' box and the canvas to paint a MasaCtrl foreground mask on."""
        use = gr.Checkbox(label="Use the drawn mask (instead of a mask word)", value=False,
                          elem_id=f"{tab}-use-mask")
        editor = gr.ImageEditor(value=editor_value(canvas), type="pil", image_mode="RGBA", format="png",
                                sources=(), transforms=(), layers=False, label=info, height=300,
                                brush=gr.Brush(colors=["#ff2020"], color_mode="fixed"),
                                elem_id=f"{tab}-mask")
        return use, editor
