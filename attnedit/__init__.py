"""attnedit: attention control for Hugging Face Diffusers pipelines.

>>> import attnedit
>>> pipe = attnedit.load("shapes-sd")
>>> store = attnedit.AttentionStore()
>>> result = pipe("a red circle and a blue square", controls=[store], seed=0)
"""

__version__ = "0.1.0"

from . import kernels
from .controller import Controller, Run
from .controls import CONTROLS, CallContext, Control, make_control, register
from .layers import LayerInfo, LayerRegistry
from .layout import BatchLayout, Row
from .pipeline import EditPipeline, Result, apply, controlled, load, remove
from .selectors import Select, Steps
from .store import AttentionStore


def __getattr__(name: str):
    """Method controls (`attnedit.MasaCtrl`, `attnedit.ToDo`, ...) live in `attnedit.methods`,
    one file each; they are imported on first use so `import attnedit` stays light."""
    from .methods import exported

    found = exported().get(name)
    if found is None:
        raise AttributeError(f"module 'attnedit' has no attribute {name!r}")
    return found


__all__ = [
    "CONTROLS",
    "AttentionStore",
    "BatchLayout",
    "CallContext",
    "Control",
    "Controller",
    "EditPipeline",
    "LayerInfo",
    "LayerRegistry",
    "Result",
    "Row",
    "Run",
    "Select",
    "Steps",
    "__version__",
    "apply",
    "controlled",
    "kernels",
    "load",
    "make_control",
    "register",
    "remove",
]
