"""One validation layer for every way in: the Python API, the CLI, batch files and the app.

Modelled on diffusers' `check_inputs`: every parameter is checked (type, range, finiteness) before
any model call, apart from the work, and a bad one raises `InputError` (a `ValueError`) whose
message names the parameter, shows the bad value (a short repr, never a whole large value) and
says what is valid. Nothing is coerced silently: an integer parameter takes integers only (not
floats, not bools, not strings), sizes must already be multiples of the model's stride, numbers
must be finite.

Documented ranges (one place):
- `seed`: 0 .. 2**32 - 1. torch's CPU generator seeds its Mersenne Twister with 32 bits, so 2**32
  would give seed 0's noise again; seeds past the range are refused rather than aliased.
- `steps`: 1 .. 1000; `num_images`: 1 .. 64; `guidance`: 0 .. 100 (<= 1 turns CFG off);
- `height` / `width`: a positive multiple of the model's stride (latent factor x patch size), at most
  8192 px (CLEAR's 8K images).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

SEED_MAX = 2**32 - 1
STEPS_MAX = 1000
NUM_IMAGES_MAX = 64
GUIDANCE_MAX = 100.0
SIDE_MAX = 8192
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")


class InputError(ValueError):
    """A bad parameter: `name`, the bad `value` (shown short) and what is `valid`."""

    def __init__(self, name: str, value: Any, valid: str, *, note: str = "", shown: str | None = None,
                 message: str | None = None) -> None:
        self.name = name
        self.value = value
        self.valid = valid
        got = shown if shown is not None else short(value)
        super().__init__(message or f"{name} must be {valid}, got {got}{'; ' + note if note else ''}")


def short(value: Any, limit: int = 60) -> str:
    """A repr of `value` cut to `limit` characters (error messages never print a whole large value)."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------ scalars
def integer(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """An int in [low, high] (floats, bools and strings are refused, not converted)."""
    valid = "an integer" + _range_text(low, high)
    if not _is_int(value):
        raise InputError(name, value, valid)
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(name, value, valid)
    return value


def number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite real number in [low, high] (ints accepted; bools, strings, NaN and inf refused)."""
    valid = "a finite number" + _range_text(low, high)
    if not _is_number(value):
        raise InputError(name, value, valid)
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise InputError(name, value, valid)
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(name, value, "true or false")
    return value


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise InputError(name, value, "one of " + ", ".join(choices))
    return value


def text(name: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InputError(name, value, "a string")
    if not empty and not value.strip():
        raise InputError(name, value, "a non-empty string")
    return value


def _range_text(low: float | None, high: float | None) -> str:
    def fmt(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    if low is not None and high is not None:
        return f" from {fmt(low)} to {fmt(high)}"
    if low is not None:
        return f" >= {fmt(low)}"
    if high is not None:
        return f" <= {fmt(high)}"
    return ""


# --------------------------------------------------------------------------------- generation
def seed(name: str, value: Any) -> int:
    return integer(name, value, 0, SEED_MAX)


def seeds(value: Any, n: int) -> list[int]:
    """`seed` as one int (image i gets seed + i) or one seed per image; all in 0 .. 2**32 - 1."""
    if _is_int(value):
        first = seed("seed", value)
        if first + n - 1 > SEED_MAX:
            raise InputError("seed", value, f"an integer from 0 to {SEED_MAX - n + 1} for {n} images (image i "
                             f"uses seed + i, at most {SEED_MAX})")
        return [first + i for i in range(n)]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InputError("seed", value, f"an integer from 0 to {SEED_MAX} or a list of them, one per image")
    out = [seed(f"seed[{i}]", s) for i, s in enumerate(value)]
    if len(out) != n:
        raise InputError("seed", value, f"one seed per image: {n} images, {len(out)} seeds given")
    return out


def prompts(value: Any, name: str = "prompt") -> list[str]:
    """One prompt or a non-empty list of prompts (strings)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise InputError(name, value, "a string or a non-empty list of strings")


def negative_prompt(value: Any, n: int) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        if len(value) != n:
            raise InputError("negative_prompt", value, f"one string, or one per prompt ({n})")
        return list(value)
    raise InputError("negative_prompt", value, "a string, a list of strings (one per prompt) or None")


def steps(value: Any) -> int:
    return integer("steps", value, 1, STEPS_MAX)


def guidance(value: Any) -> float:
    return number("guidance", value, 0.0, GUIDANCE_MAX)


def num_images(value: Any) -> int:
    return integer("num_images", value, 1, NUM_IMAGES_MAX)


def side(name: str, value: Any, stride: int | None = None) -> int:
    """An image side in px: an int in 1 .. 8192, and a multiple of the model's `stride` when known."""
    value = integer(name, value, 1, SIDE_MAX)
    if stride is not None and value % stride:
        lower = max(stride, value // stride * stride)
        raise InputError(name, value, f"a multiple of {stride} for this model (latent factor x patch size)",
                         note=f"e.g. {lower} or {lower + stride}")
    return value


def finite_tensor(name: str, value: Any) -> None:
    """Refuse a tensor / array holding NaN or inf (masks, latents, images)."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        ok = bool(torch.isfinite(value.float() if not value.is_floating_point() else value).all())
    else:
        arr = np.asarray(value)
        ok = not np.issubdtype(arr.dtype, np.floating) or bool(np.isfinite(arr).all())
    if not ok:
        raise InputError(name, value, "finite everywhere", shown=f"a {type(value).__name__} holding NaN or inf")


def device(value: Any) -> Any:
    """None or a torch device this machine has ('cpu', 'cuda', 'cuda:1', ...)."""
    import torch

    if value is None:
        return None
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise InputError("device", value, "a device such as cpu, cuda or cuda:1") from None
    if dev.type not in DEVICE_TYPES:
        raise InputError("device", value, "a device such as cpu, cuda or cuda:1")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device", value, "cpu on this machine", note="CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError("device", value, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device", value, "cpu on this machine", note="MPS is not available here")
    return dev


def keywords(what: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Refuse unknown keyword arguments by name, listing the accepted ones."""
    accepted = sorted(set(accepted))
    unknown = [k for k in given if k not in accepted]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise InputError(unknown[0], unknown[0], "a known keyword", message=(
            f"{what}() got an unknown keyword argument {short(unknown[0])}{hint}; it accepts: {', '.join(accepted)}"))


def port(value: Any) -> int:
    return integer("port", value, 1, 65535)


def output_file(name: str, value: Any, suffixes: Sequence[str] = (".png",)) -> Any:
    """A file path to write: ends in one of `suffixes`, is not a folder, and its folder can be written.

    Checked before any work, so a run never ends with "cannot write" after the images were made (the
    folder itself is created when the file is written).
    """
    import os
    import tempfile
    from pathlib import Path

    want = " or ".join(suffixes)
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise InputError(name, value, f"a file path ending in {want}")
    raw = str(value)
    path = Path(raw).expanduser()
    if raw.endswith(("/", os.sep)) or path.is_dir():
        raise InputError(name, raw, f"a file path ending in {want}", note=f"{raw} is a folder: give e.g. "
                         f"{(path / ('image' + suffixes[0])).as_posix()}")
    if path.suffix.lower() not in suffixes:
        raise InputError(name, raw, f"a file path ending in {want}",
                         note=f"e.g. {path.with_suffix(suffixes[0]).as_posix()}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(name, raw, "a path inside a folder", note=f"{parent} is a file")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".attnedit-probe-"):
            pass
    except OSError as err:
        raise InputError(name, raw, "a path in a folder this user can write",
                         note=f"cannot write in {parent}: {err.strerror or type(err).__name__}") from None
    return path


__all__ = [
    "GUIDANCE_MAX", "NUM_IMAGES_MAX", "SEED_MAX", "SIDE_MAX", "STEPS_MAX", "InputError", "choice", "device",
    "finite_tensor", "flag", "guidance", "integer", "keywords", "negative_prompt", "num_images", "number",
    "output_file", "port",
    "prompts", "seed", "seeds", "short", "side", "steps", "text",
]
