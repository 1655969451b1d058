"""attnedit: attention control for Hugging Face Diffusers pipelines.

>>> import attnedit
>>> pipe = attnedit.load("shapes-sd")
>>> store = attnedit.AttentionStore()
>>> result = pipe("a red circle and a blue square", controls=[store], seed=0)

Every public name is imported on first use, so `import attnedit` (and `attnedit --help`) stays
light: torch and diffusers load only when a model, a control or a kernel is touched.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_NAMES = {
    "Controller": ".controller",
    "Run": ".controller",
    "CONTROLS": ".controls",
    "CallContext": ".controls",
    "Control": ".controls",
    "Example": ".controls",
    "make_control": ".controls",
    "register": ".controls",
    "LayerInfo": ".layers",
    "LayerRegistry": ".layers",
    "BatchLayout": ".layout",
    "Row": ".layout",
    "EditPipeline": ".pipeline",
    "Result": ".pipeline",
    "apply": ".pipeline",
    "controlled": ".pipeline",
    "load": ".pipeline",
    "remove": ".pipeline",
    "Select": ".selectors",
    "Steps": ".selectors",
    "AttentionStore": ".store",
    "InputError": ".validate",
    "consistent": ".methods.masactrl",
    "ir_diffusion": ".methods.ir_diffusion",
    "edit": ".inversion",
    "invert": ".inversion",
}
# modules reachable as attributes (`attnedit.visualize.map_grid`, `attnedit.kernels.use`)
_MODULES = ("conformance", "inversion", "kernels", "masks", "methods", "validate", "visualize")


def __getattr__(name: str) -> Any:
    """Public names on first use; method controls (`attnedit.MasaCtrl`, `attnedit.ToDo`, ...) come from
    `attnedit.methods`, one file each."""
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        from .methods import exported

        value = exported().get(name)
        if value is None:
            raise AttributeError(f"module 'attnedit' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "CONTROLS",
    "AttentionStore",
    "BatchLayout",
    "CallContext",
    "Control",
    "Controller",
    "EditPipeline",
    "Example",
    "InputError",
    "LayerInfo",
    "LayerRegistry",
    "Result",
    "Row",
    "Run",
    "Select",
    "Steps",
    "__version__",
    "apply",
    "consistent",
    "controlled",
    "edit",
    "invert",
    "ir_diffusion",
    "kernels",
    "load",
    "make_control",
    "register",
    "remove",
    "visualize",
]
