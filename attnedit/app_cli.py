"""`attnedit app`: serve the Gradio app (needs the `app` extra: `pip install attnedit[app]`).

    attnedit app                                   # default model on http://127.0.0.1:7860
    attnedit app --models shapes-sd,shapes-dit --port 8000

gradio is imported only when the command runs, so the rest of the CLI works without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from types import ModuleType


def private_gradio_dir() -> str:
    """A folder only this user can read (0700) for gradio's uploads and result files.

    gradio writes both under GRADIO_TEMP_DIR (default: a shared, world-readable /tmp/gradio); it reads
    the variable when it is imported, so this runs first. A folder the user chose is kept.
    """
    import os
    import tempfile

    if not os.environ.get("GRADIO_TEMP_DIR"):
        os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="attnedit-gradio-")
    return os.environ["GRADIO_TEMP_DIR"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from .paths import DEFAULT_MODEL

    p = subparsers.add_parser("app", help="serve the interactive Gradio app")
    p.add_argument("--model", default=None, help=f"model selected when the page opens (default {DEFAULT_MODEL})")
    p.add_argument("--models", default=None,
                   help="comma-separated models the page may choose from (default: just --model); "
                        "the page never loads anything else")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.set_defaults(func=_app)


def models_of(model: str | None, models: str | None) -> tuple[list[str], str]:
    """The allowed model list and the default one, from `--model` and `--models`."""
    from .paths import DEFAULT_MODEL

    names = [m.strip() for m in (models or "").split(",") if m.strip()]
    default = model or (names[0] if names else DEFAULT_MODEL)
    if default not in names:
        names.insert(0, default)
    return names, default


def load_app_module() -> ModuleType:
    """`apps/app.py` of this checkout (it sits beside the package, not inside it), imported as `apps.app`
    with the checkout's `apps` package registered first, so its tabs (`apps/tabs/`) import from any folder."""
    from pathlib import Path

    from .paths import REPO_ROOT

    folder = REPO_ROOT / "apps"
    path = folder / "app.py"
    if not path.is_file():
        raise FileNotFoundError(f"the app is not part of this installation (no {path}); run from a source checkout")
    known = sys.modules.get("apps")
    if known is None or Path(getattr(known, "__file__", None) or "").resolve().parent != folder.resolve():
        for name in [n for n in sys.modules if n == "apps" or n.startswith("apps.")]:
            del sys.modules[name]  # another `apps` (not this checkout's) must not answer for it
        spec = importlib.util.spec_from_file_location("apps", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["apps"] = package
        spec.loader.exec_module(package)
    return importlib.import_module("apps.app")


def _app(args: argparse.Namespace) -> int:
    from . import validate

    validate.port(args.port)
    validate.device(args.device)
    if args.dtype is not None:
        validate.choice("dtype", args.dtype, validate.DTYPES)
    private_gradio_dir()
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        print("attnedit app: gradio is not installed; install the app extra: pip install 'attnedit[app]'",
              file=sys.stderr)
        return 2
    app = load_app_module()
    names, default = models_of(args.model, args.models)
    demo = app.build_app(names, default, device=args.device, dtype=args.dtype)
    print(f"attnedit app: serving {', '.join(names)} on http://{args.host}:{args.port}")
    app.launch(demo, args.host, args.port, block=True)
    return 0
