"""The `attnedit` command line: a thin layer over the Python API.

    attnedit generate "a red circle and a blue square" --seed 0 --out out/img.png
    attnedit maps "a red circle and a blue square" --out out/maps.png
    attnedit info --model shapes-sd --height 64 --width 64

Other subcommands (batch, app, train, testbed) live in their own modules and register here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# subcommand -> (module with `add_parser(subparsers)`, one-line help). Only the subcommand named on the
# command line is built (its module imported), so `attnedit --help` imports neither torch nor diffusers.
_PLUGINS = {
    "batch": ("attnedit.batch", "run a JSONL/YAML job file (resumable; `accelerate launch -m attnedit batch` "
              "for many GPUs)"),
    "app": ("attnedit.app_cli", "serve the interactive Gradio app"),
    "train": ("attnedit.train.cli", "train an adapter: attencraft, clear"),
    "testbed": ("attnedit.testbed.cli", "the synthetic testbed: train its models"),
}


def parse_control(spec: str):
    """`name`, `name:{"json": "options"}` or `name:key=value,key=value` -> a Control."""
    from .controls import make_control

    return make_control(spec)


def _common(p: argparse.ArgumentParser) -> None:
    from .paths import DEFAULT_MODEL

    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id, folder or bundled name (default {DEFAULT_MODEL})")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (image i uses seed + i)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (model default if omitted)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--control", action="append", default=[], metavar="NAME[:OPTIONS]",
                   help='a control, e.g. --control todo:factor=2 or --control \'astar:{"words": ["cat"]}\'')
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 for small models such as the bundled ones, else torch's default)")
    p.add_argument("--verbose", action="store_true", help="report load and generation times")


def quiet_third_party() -> None:
    """The command line shows attnedit's messages, not the libraries' advice to their own developers
    (transformers' "requires torchvision", deprecation notes, loading progress bars). Set before they
    are imported; errors still show. The Python API leaves these settings to the user."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for module in ("diffusers", "transformers", "torch", "accelerate", "huggingface_hub"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)


def load_for_cli(args: argparse.Namespace):
    """`attnedit.load` for a command, timed; on the CPU a small model runs on one thread unless --threads says.

    Why one thread: the bundled 64 px models do many small ops, where handing each one to a second thread
    costs more than it saves, and on a busy 2-core machine a thread waiting for a descheduled peer made one
    image 15x slower (benchmarks/cli_speed.py measures it). Large models keep torch's default.
    """
    import time

    import torch

    from .pipeline import load

    quiet_loading()
    start = time.perf_counter()
    pipe = load(args.model, device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))
    cpu_threads(pipe, getattr(args, "threads", None))
    if getattr(args, "verbose", False):
        print(f"loaded {args.model} ({pipe.family.label}, {pipe.device}, {torch.get_num_threads()} CPU thread(s)) in "
              f"{time.perf_counter() - start:.2f} s", file=sys.stderr)
    return pipe


SMALL_MODEL = 50_000_000  # denoiser parameters under which the CLI uses one CPU thread (see load_for_cli)


def quiet_loading() -> None:
    """No "Loading pipeline components" bar from diffusers on the command line (no environment variable does it)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def cpu_threads(pipe, threads: int | None) -> None:
    """The command line's CPU thread policy: `threads` when given, else one thread for a small model on the CPU."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif pipe.device.type == "cpu" and sum(p.numel() for p in pipe.denoiser.parameters()) < SMALL_MODEL:
        torch.set_num_threads(1)


def _generate_timed(args: argparse.Namespace, pipe, **kw):
    import time

    start = time.perf_counter()
    result = pipe.generate(**kw)
    if getattr(args, "verbose", False):
        print(f"generated {len(result.images)} image(s), {result.params['steps']} steps, "
              f"{result.params['height']}x{result.params['width']} in {time.perf_counter() - start:.2f} s",
              file=sys.stderr)
    return result


def _check_common(args: argparse.Namespace) -> Path:
    """Everything the command line can check before loading a model (the same checks as the API)."""
    from . import validate

    n = getattr(args, "num_images", 1)
    validate.num_images(n)
    validate.seeds(args.seed, n)
    if args.steps is not None:
        validate.steps(args.steps)
    if args.guidance is not None:
        validate.guidance(args.guidance)
    for side in ("height", "width"):
        if getattr(args, side) is not None:
            validate.side(side, getattr(args, side))
    validate.device(args.device)
    if args.dtype is not None:
        validate.choice("dtype", args.dtype, validate.DTYPES)
    if args.threads is not None:
        validate.integer("--threads", args.threads, 1, 1024)
    return validate.output_file("--out", args.out)


def _generate(args: argparse.Namespace) -> int:
    out = _check_common(args)
    controls = [parse_control(s) for s in args.control]
    pipe = load_for_cli(args)
    result = _generate_timed(
        args, pipe, prompt=args.prompt, controls=controls, seed=args.seed, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, negative_prompt=args.negative_prompt, num_images=args.num_images,
    )
    for i in range(len(result.images)):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        saved = result.save(path, i)
        print(saved)
    return 0


def _maps(args: argparse.Namespace) -> int:
    """The image at --out (X.png, sidecar X.json) and the map grid beside it (X.maps.png)."""
    from .store import AttentionStore
    from .visualize import map_grid

    out = _check_common(args)
    words = [w.strip() for w in args.words.split(",")] if args.words else None
    store = AttentionStore(words=words)
    controls = [store, *(parse_control(s) for s in args.control)]
    pipe = load_for_cli(args)
    result = _generate_timed(
        args, pipe, prompt=args.prompt, controls=controls, seed=args.seed, steps=args.steps, guidance=args.guidance,
        height=args.height, width=args.width, negative_prompt=args.negative_prompt,
    )
    grid = map_grid(store.word_maps(0), result.images[0])  # before any file is written: a bad word fails here
    image_path = result.save(out)
    grid_path = maps_path(out)
    grid.save(grid_path)
    print(image_path)
    print(grid_path)
    return 0


def maps_path(image: Path) -> Path:
    """Where the map grid of the image at `image` goes: X.png -> X.maps.png (as batch runs name it)."""
    return image.with_name(f"{image.stem}.maps.png")


def _info(args: argparse.Namespace) -> int:
    from . import validate
    from .controller import Controller

    pipe = load_for_cli(args)
    h, w = pipe.default_size()
    h = validate.side("height", args.height, pipe.pixel_stride) if args.height is not None else h
    w = validate.side("width", args.width, pipe.pixel_stride) if args.width is not None else w
    stride = pipe.vae_scale_factor
    ctrl = Controller(pipe.pipe, [])
    rows = ctrl.describe_layers((h // stride, w // stride))
    if args.json:
        print(json.dumps({"model": args.model, "family": pipe.family.name, "size": [h, w], "layers": rows}, indent=1))
        return 0
    print(f"model:  {args.model}")
    print(f"family: {pipe.family.label} ({pipe.family.name}), denoiser {type(pipe.denoiser).__name__}")
    print(f"size:   {h}x{w} px, latent {h // stride}x{w // stride}, {len(rows)} attention layers")
    print(f"{'index':>5}  {'kind':<5}  {'block':<6}  {'level':>5}  {'grid':>9}  name")
    for r in rows:
        grid = "x".join(map(str, r["grid"]))
        print(f"{r['index']:>5}  {r['kind']:<5}  {r['block']:<6}  {r['level']:>5}  {grid:>9}  {r['name']}")
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: every subcommand listed, only the one `argv` names built in full."""
    parser = argparse.ArgumentParser(prog="attnedit", description="Attention control for diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    wanted = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)

    p = sub.add_parser("generate", help="prompt -> PNG plus a JSON sidecar with every parameter")
    _common(p)
    p.add_argument("--out", default="outputs/image.png", help="PNG path (sidecar written beside it)")
    p.set_defaults(func=_generate)

    p = sub.add_parser("maps", help="prompt -> image (X.png + X.json) plus a grid of per-word maps (X.maps.png)")
    _common(p)
    p.add_argument("--words", default=None, help="comma-separated words (default: every word)")
    p.add_argument("--out", default="outputs/maps.png",
                   help="PNG path of the image; its sidecar is X.json and the map grid X.maps.png")
    p.set_defaults(func=_maps)

    p = sub.add_parser("info", help="model family, attention layers and their token grids")
    from .paths import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_info)

    for name, (module, help_text) in _PLUGINS.items():
        if name != wanted:
            sub.add_parser(name, help=help_text)  # listed in --help; built when it is the command
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue  # that part of attnedit is not installed/written yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"attnedit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
