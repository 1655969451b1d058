"""Shared fixtures: tiny pipelines of every family, built once per session, offline."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when kernels are decorated (at import), so it must be set before any test
# imports triton: every kernel runs under the interpreter on CPU-only machines.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from attnedit.families import FAMILIES as _ADAPTERS

FAMILIES = tuple(_ADAPTERS)  # every registered family: a new adapter file is tested here with no edit


# Small CPU ops run many times faster on one thread than on two on a busy 2-core machine (thread
# hand-off dominates); every test is small, so the whole suite runs single-threaded.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Every tiny pipeline saved with save_pretrained into one folder per family."""
    from attnedit.tiny import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    for fam in FAMILIES:
        build_tiny(fam).save_pretrained(root / fam)
    return root


@pytest.fixture(scope="session")
def load_benchmark():
    """`load_benchmark("quality")`: a script of `benchmarks/` as a module (they are scripts, not a package).

    Why one loader: the scripts import their siblings by name (so `benchmarks/` goes on sys.path) and some
    define dataclasses, which look their module up in sys.modules (so it is registered, as `bench_<name>`).
    """
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
