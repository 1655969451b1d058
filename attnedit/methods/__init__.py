"""One small file per attention-control method; importing a file registers its controls."""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import every method module (and AttentionStore's) so `attnedit.CONTROLS` knows every control by name."""
    importlib.import_module("attnedit.store")
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def exported() -> dict[str, object]:
    """Public names of every method module (its `__all__`), for `attnedit.<Name>`."""
    load_all()
    names: dict[str, object] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(module, "__all__", ()):
            names[name] = getattr(module, name)
    return names
