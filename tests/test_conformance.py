"""The conformance matrix: every registered control, on every family, through every entry path.

Each (control, family) cell either acts, with the same images through `EditPipeline.generate`,
`attnedit.apply` + a stock call, a batch job (bit-equal) and the Triton kernels (within
`TRITON_TOLERANCE` grey levels) and a measurable effect against plain generation; or it is refused
with the same clear error, before any denoising, on every path (`attnedit.conformance`).

ATTNEDIT_TEST_DEVICE=cuda runs the matrix on a GPU (`benchmarks/gpu_check.sh`): there the default
"auto" backend already takes the Triton kernels, and the "triton" path forces them.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import attnedit
from attnedit import batch
from attnedit import conformance as cf
from attnedit.families import FAMILIES

DEVICE = os.environ.get("ATTNEDIT_TEST_DEVICE", "cpu")
CASES = [(name, fam) for name in cf.registered() for fam in FAMILIES]


@pytest.fixture(scope="module")
def pipes():
    return {fam: attnedit.load(f"tiny-{fam}", device=DEVICE) for fam in FAMILIES}


@pytest.fixture(scope="module")
def batch_outputs(pipes, tmp_path_factory):
    """One batch run per family with every example that runs there (made on first use)."""
    done: dict[str, dict[str, cf.Outcome]] = {}

    def get(family: str) -> dict[str, cf.Outcome]:
        if family not in done:
            examples = [(n, c.example()) for n, c in cf.registered().items() if cf.refusal(c, family) is None]
            done[family] = cf.run_batch(pipes[family], f"tiny-{family}", examples,
                                        tmp_path_factory.mktemp(f"batch-{family}"))
        return done[family]

    return get


@contextmanager
def no_denoising(edit_pipe):
    """Assert that nothing inside the block reached the denoiser, and the pipeline is as it was."""
    stock_class = type(edit_pipe.pipe)
    processors = dict(edit_pipe.denoiser.attn_processors)
    calls: list[int] = []
    handle = edit_pipe.denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        yield
    finally:
        handle.remove()
    assert calls == [], "the denoiser ran before the refusal"
    assert type(edit_pipe.pipe) is stock_class and not hasattr(edit_pipe.pipe, "_attnedit_controller")
    assert getattr(stock_class, "_attnedit_base", None) is None, "a controlled class leaked from an earlier run"
    assert all(edit_pipe.denoiser.attn_processors[k] is v for k, v in processors.items())


def _same(a: cf.Outcome, b: cf.Outcome) -> bool:
    return len(a.images) == len(b.images) and all(np.array_equal(x, y) for x, y in zip(a.images, b.images))


def _max_diff(a: cf.Outcome, b: cf.Outcome) -> int:
    return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in zip(a.images, b.images))


@pytest.mark.parametrize("name, family", CASES)
def test_control_acts_or_refuses_on_every_path(name, family, pipes, batch_outputs, tmp_path):
    cls = cf.registered()[name]
    example = cls.example()
    edit_pipe = pipes[family]
    why = cf.refusal(cls, family)
    if why is not None:
        message = f"{cls.__name__} does not run on {re.escape(FAMILIES[family].label)}"
        for path in (cf.run_generate, cf.run_apply, cf.run_triton):
            with no_denoising(edit_pipe), pytest.raises(ValueError, match=message):
                path(edit_pipe, name, example)
        jobs = tmp_path / "jobs.jsonl"
        jobs.write_text(__import__("json").dumps(cf.job(name, example)) + "\n")
        plan = batch.plan(jobs, edit_pipe, model=f"tiny-{family}")
        assert not plan.units and len(plan.problems) == 1
        assert re.search(f"{message}: {re.escape(why)}", plan.problems[0].message), plan.problems[0].message
        return
    plain = cf.plain(edit_pipe, example)
    ours = cf.run_generate(edit_pipe, name, example)
    if example.stock is None:
        assert _same(ours, cf.run_apply(edit_pipe, name, example)), "attnedit.apply + a stock call differs"
    else:
        with no_denoising(edit_pipe), pytest.raises(ValueError, match=re.escape(example.stock)):
            cf.run_apply(edit_pipe, name, example)
    assert _same(ours, batch_outputs(family)[name]), "the batch job differs"
    # on the CPU the default path is PyTorch's; on CUDA "auto" already takes Triton, so compare with forced "torch"
    reference = ours if DEVICE == "cpu" else cf.run_backend(edit_pipe, name, example, "torch")
    assert _max_diff(reference, cf.run_triton(edit_pipe, name, example)) <= cf.TRITON_TOLERANCE
    if example.effect == "records":
        assert _same(ours, plain), f"{name} must not change the images"
        assert ours.records.get(name), f"{name} recorded nothing"
    else:
        assert not _same(ours, plain), f"{name} had no effect on the images"


def test_readme_support_table_is_generated_from_the_registry():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert cf.replace_table(readme, cf.support_table()) == readme, (
        "README.md's support table is stale: run python -m attnedit.conformance --readme README.md")


def test_every_registered_control_is_in_the_matrix():
    """A control without an example would escape the matrix (test helpers register controls too)."""
    from attnedit.controls import CONTROLS

    public = {n for n, c in CONTROLS.items() if c.__module__.startswith("attnedit.")}
    assert public <= set(cf.registered()), f"controls without an example: {sorted(public - set(cf.registered()))}"
