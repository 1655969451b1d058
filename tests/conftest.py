"""Shared fixtures: tiny pipelines of every family, built once per session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when kernels are decorated (at import), so it must be set before any test
# imports triton: every kernel runs under the interpreter on CPU-only machines.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")


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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
