"""`attnedit train <recipe>`: each recipe module (`attnedit.train.<name>`) adds its own parser."""

from __future__ import annotations

import argparse
import importlib

RECIPES = ("attencraft", "clear")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an adapter: " + ", ".join(RECIPES))
    recipes = p.add_subparsers(dest="recipe", required=True)
    for name in RECIPES:
        try:
            module = importlib.import_module(f"attnedit.train.{name}")
        except ModuleNotFoundError as err:
            if err.name and f"attnedit.train.{name}".startswith(err.name):
                continue
            raise
        module.add_parser(recipes)
