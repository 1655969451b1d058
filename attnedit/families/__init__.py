"""The model families attnedit supports, one adapter class per family (one file each).

`family_of(pipe)` gives the adapter bound to a pipeline; `FAMILIES` maps names to adapter classes and
`family_from_class` finds one by pipeline class name (before a model is loaded). Adding a family is
one file here (its adapter, with its tiny pipeline) plus its tests: nothing else compares family names.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..layers import LayerRegistry

from .base import CAPABILITIES, DiTFamily, Family, ForwardInfo, InversionCondition, UNetFamily

FAMILIES: dict[str, type[Family]] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Make a family adapter known by its name and pipeline classes (kept in `order`)."""
    if not cls.name or not cls.pipeline_classes:
        raise ValueError(f"family adapter {cls.__name__} needs a name and its pipeline classes")
    FAMILIES[cls.name] = cls
    ordered = sorted(FAMILIES.values(), key=lambda f: (f.order, f.name))
    FAMILIES.clear()
    FAMILIES.update((f.name, f) for f in ordered)
    return cls


def _discover() -> None:
    """Register every adapter defined in this package's modules: a new family is one new file."""
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Family) and cls.__module__ == module.__name__ and "name" in vars(cls):
                register_family(cls)


_discover()


def supported_table() -> str:
    return ", ".join(f"{f.label} ({'/'.join(f.pipeline_classes)})" for f in FAMILIES.values())


def family_from_class(class_name: str) -> type[Family]:
    """The adapter class of a diffusers pipeline class name, or a clear error listing the supported ones."""
    for fam in FAMILIES.values():
        if class_name in fam.pipeline_classes:
            return fam
    raise ValueError(f"attnedit does not support pipelines of class {class_name!r}; supported families: "
                     f"{supported_table()}")


def family_of(pipe: Any, denoiser: Any = None) -> Family:
    """The adapter bound to a pipeline (its class name decides; attnedit's controlled subclass keeps it).

    `denoiser`: one outside the pipeline that stands for its own (a CLEAR student being trained).
    """
    cls = type(pipe)
    cls = getattr(cls, "_attnedit_base", None) or cls
    return family_from_class(cls.__name__)(pipe, denoiser)


def build_registry(denoiser: torch.nn.Module, family: str) -> LayerRegistry:
    """The layer registry of a bare denoiser of `family` (a family name), without its pipeline."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[family](None, denoiser).build_registry(denoiser)


def families_with(capability: str) -> list[type[Family]]:
    return [f for f in FAMILIES.values() if f.has(capability)]


__all__ = ["CAPABILITIES", "FAMILIES", "DiTFamily", "Family", "ForwardInfo", "InversionCondition", "UNetFamily",
           "build_registry", "families_with", "family_from_class", "family_of", "register_family", "supported_table"]
