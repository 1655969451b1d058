"""Every control acts, or refuses, on every path a user takes: the conformance matrix.

For each registered control with an `example()` and each model family, the example runs through
every entry path a user has:

- `generate`: `EditPipeline.generate` (or `ir_diffusion` for an IR-Diffusion example),
- `apply`: `attnedit.apply` on the stock diffusers pipeline, then a plain `pipe(...)` call,
- `batch`: a job file run by the batch runner,
- `triton`: `generate` again with `attnedit.kernels.use("triton")` (on the CPU in Triton's
  interpreter, on CUDA natively),

and one of two outcomes must hold: the same images on every path (bit-equal across the PyTorch
paths, within `TRITON_TOLERANCE` grey levels across backends) plus a measurable effect against
plain generation, or the same clear refusal (a ValueError naming the control) before any
denoising. `tests/test_conformance.py` asserts it on the tiny pipelines of every family; the
README's support table is generated from the same registry:

    python -m attnedit.conformance --readme README.md     # rewrite the table in place
    python -m attnedit.conformance                        # print it
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .controls import CONTROLS, Control, Example, make_control
from .families import FAMILIES

PATHS = ("generate", "apply", "batch", "triton")
#: largest per-pixel difference (grey levels) between the PyTorch and the Triton backend
TRITON_TOLERANCE = 8
STEPS = 2
SEED = 0
REFERENCE_SEED = SEED + 1000  # what `ir_diffusion` gives references by default
TABLE_BEGIN = "<!-- support-table:begin (python -m attnedit.conformance --readme README.md) -->"
TABLE_END = "<!-- support-table:end -->"


def registered() -> dict[str, type[Control]]:
    """Controls with an example, by name (importing the methods registers them)."""
    from . import methods

    methods.exported()
    return {name: cls for name, cls in sorted(CONTROLS.items()) if cls.example() is not None}


def refusal(cls: type[Control], family: str) -> str | None:
    """Why `cls` is refused on `family` (None: it runs there), as its error message says it."""
    if not cls.runs_on(FAMILIES[family]):
        return cls.unsupported
    return None


@dataclass
class Outcome:
    """Images and records of one path (PIL images as uint8 arrays)."""

    images: list[np.ndarray]
    records: dict[str, Any]


# ----------------------------------------------------------------------------------------- runs
def _prompts(example: Example) -> list[str]:
    if example.references is not None:
        return [*example.references["prompts"], *example.prompts]
    return list(example.prompts)


def _seeds(example: Example) -> list[int]:
    if example.references is not None:
        return [REFERENCE_SEED] * len(example.references["prompts"]) + [SEED]
    if example.together:
        return [SEED] * len(example.prompts)
    return [SEED + i for i in range(len(example.prompts))]


def _layout(edit_pipe: Any, example: Example):
    from .layout import BatchLayout

    if not example.together:
        return None
    n = len(example.prompts)
    cfg = edit_pipe.family.uses_cfg(edit_pipe.recommended()["guidance"])
    return BatchLayout.standard(n, cfg, groups=[0] * n, roles=["source"] + ["target"] * (n - 1))


def _arrays(images: list[Any]) -> list[np.ndarray]:
    return [np.asarray(im).copy() for im in images]


def plain(edit_pipe: Any, example: Example) -> Outcome:
    """The example's images without the control (same prompts, seeds, steps)."""
    res = edit_pipe.generate(_prompts(example), seed=_seeds(example), steps=STEPS)
    return Outcome(_arrays(res.images), {})


def run_generate(edit_pipe: Any, name: str, example: Example) -> Outcome:
    """The `generate` path (`ir_diffusion` for an IR-Diffusion example)."""
    if example.references is not None:
        from .methods.ir_diffusion import ir_diffusion

        refs = example.references
        res = ir_diffusion(edit_pipe, refs["prompts"], example.prompts[-1], refs["subjects"],
                           target_boxes=refs.get("boxes"), seed=SEED, steps=STEPS, control_options=example.options)
    else:
        control = make_control(name, example.options)
        res = edit_pipe.generate(_prompts(example), controls=[control], seed=_seeds(example), steps=STEPS,
                                 layout=_layout(edit_pipe, example))
    return Outcome(_arrays(res.images), res.records)


def run_apply(edit_pipe: Any, name: str, example: Example) -> Outcome:
    """The `apply` path: `attnedit.apply` on the stock pipeline, then the stock call `generate` makes."""
    from .pipeline import apply, remove, to_pil

    settings = edit_pipe.recommended()
    prompts = _prompts(example)
    kwargs = edit_pipe.stock_arguments(prompts, _seeds(example), steps=STEPS, guidance=settings["guidance"],
                                       height=settings["height"], width=settings["width"])
    options = dict(example.options)
    if example.references is not None:  # the control as ir_diffusion would build it, boxes given
        boxes = example.references["boxes"]
        options.update(target_boxes=boxes, reference_boxes=boxes)
    ctrl = apply(edit_pipe.pipe, make_control(name, options))
    try:
        out = edit_pipe.pipe(**kwargs)
        records = ctrl.records()
    finally:
        remove(edit_pipe.pipe)
    return Outcome(_arrays(to_pil(out.images)), records)


def job(name: str, example: Example) -> dict[str, Any]:
    """The example as one batch job (`id` = the control's name)."""
    if example.references is not None:
        refs = dict(example.references)
        refs["options"] = dict(example.options)
        return {"id": name, "prompt": example.prompts[-1], "references": refs, "seeds": [SEED], "steps": STEPS}
    spec = {"id": name, "controls": [{"name": name, **example.options}], "steps": STEPS}
    if example.together:
        spec.update(prompts=list(example.prompts), together=True, seeds=[SEED])
    elif len(example.prompts) == 1:
        spec.update(prompt=example.prompts[0], seeds=[SEED])
    else:
        raise ValueError(f"{name}: an example of several separate prompts has no single-job form")
    return spec


def run_batch(edit_pipe: Any, model: str, names_examples: list[tuple[str, Example]],
              folder: Path) -> dict[str, Outcome]:
    """The `batch` path: one job file with every example, run by the batch runner; images by job id."""
    from . import batch

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(job(n, e)) + "\n" for n, e in names_examples))
    out = folder / "out"
    summary = batch.run_batch(path, out, model=model, pipe=edit_pipe, batch_size=1, progress=False)
    if not summary.ok:
        raise RuntimeError(f"the conformance batch failed: {summary.failed or summary.invalid}")
    found: dict[str, list[tuple[int, np.ndarray]]] = {}
    from PIL import Image

    for side in sorted(out.glob("*.json")):
        data = json.loads(side.read_text())
        if "job" not in data or "image" not in data:
            continue
        group = data.get("group") or {}
        order = group.get("prompts", [data["prompt"]]).index(data["prompt"]) if group else 0
        with Image.open(out / data["image"]) as im:
            found.setdefault(data["job"]["id"], []).append((order, np.asarray(im).copy()))
    return {k: Outcome([a for _, a in sorted(v, key=lambda x: x[0])], {}) for k, v in found.items()}


def run_backend(edit_pipe: Any, name: str, example: Example, backend: str) -> Outcome:
    """The `generate` path with attnedit's attention backend forced ("torch" or "triton")."""
    from . import kernels

    with kernels.using(backend):
        return run_generate(edit_pipe, name, example)


def run_triton(edit_pipe: Any, name: str, example: Example) -> Outcome:
    """The `generate` path with the Triton kernels forced."""
    return run_backend(edit_pipe, name, example, "triton")


# ------------------------------------------------------------------------------------ the table
def support_table() -> str:
    """The README's support table: control x family, from the registry and the examples."""
    controls = registered()
    families = list(FAMILIES.values())
    notes: dict[str, list[str]] = {}  # reason -> the controls it concerns

    def note(text: str, who: str) -> str:
        names = notes.setdefault(text, [])
        if who not in names:
            names.append(who)
        return "abcdefghijklmnopqrstuvwxyz"[list(notes).index(text)]

    lines = ["| Control | " + " | ".join(f.label for f in families) + " |",
             "|---" * (len(families) + 1) + "|"]
    for name, cls in controls.items():
        example = cls.example()
        cells = []
        for fam in families:
            why = refusal(cls, fam.name)
            if why is not None:
                cells.append(f"refused ({note(why, cls.__name__)})")
            elif example.stock is not None:
                cells.append(f"✓ except `apply` ({note(example.stock, cls.__name__ + ' on a stock pipeline')})")
            else:
                cells.append("✓")
        lines.append(f"| `{name}` ({cls.__name__}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("✓: acts, with the same images, through `EditPipeline.generate`, `attnedit.apply` on the stock "
                 "pipeline, a batch job, and both attention backends (PyTorch; Triton: CUDA, or the CPU under "
                 "`TRITON_INTERPRET=1`). refused: a clear error before any denoising, on every path.")
    lines.append("")
    for i, (text, names) in enumerate(notes.items()):
        lines.append(f"- ({'abcdefghijklmnopqrstuvwxyz'[i]}) {', '.join(names)}: {text}.")
    return "\n".join(lines)


def replace_table(readme: str, table: str) -> str:
    """`readme` with the text between the table markers replaced by `table`."""
    if TABLE_BEGIN not in readme or TABLE_END not in readme:
        raise ValueError(f"the README has no support-table markers ({TABLE_BEGIN} ... {TABLE_END})")
    head, rest = readme.split(TABLE_BEGIN, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnedit.conformance", description=__doc__.splitlines()[0])
    parser.add_argument("--readme", type=Path, help="rewrite the support table of this README in place")
    args = parser.parse_args(argv)
    table = support_table()
    if args.readme is None:
        print(table)
        return 0
    text = args.readme.read_text()
    args.readme.write_text(replace_table(text, table))
    print(f"support table written to {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["PATHS", "TRITON_TOLERANCE", "Outcome", "job", "plain", "refusal", "registered", "replace_table",
           "run_apply", "run_backend", "run_batch", "run_generate", "run_triton", "support_table"]
