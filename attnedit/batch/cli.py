"""`attnedit batch` on the command line: its flags, checked before a model loads; `--validate`; exit statuses."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import validate
from .files import file_model, load_options
from .jobs import check_overrides, plan
from .manifest import OutputBusy
from .runner import distributed_state, print_summary, run_batch


def add_parser(subparsers: Any) -> None:
    from ..paths import DEFAULT_MODEL

    doc = sys.modules[__package__].__doc__  # the package's user documentation
    p = subparsers.add_parser(
        "batch", help="run a JSONL/YAML job file (resumable; `accelerate launch -m attnedit batch` for many GPUs)",
        description="\n\n".join(doc.split("\n\n")[1:5]) if doc else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("jobs", help="job file: .jsonl (one job per line) or .yaml/.yml")
    p.add_argument("--out", default=None, help="output folder (PNG + JSON sidecar per image, manifest.jsonl); one "
                   "run at a time: a second run into a folder in use is refused")
    p.add_argument("--model", default=None, help=f"model for every job (else defaults.model, else {DEFAULT_MODEL})")
    p.add_argument("--validate", action="store_true", help="check every job line and report problems; generate nothing")
    p.add_argument("--strict", action="store_true", help="stop at the first bad job line or failed image")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call (jobs with equal settings)")
    p.add_argument("--device", default=None, help="device (default: accelerate's per-process device)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--steps", type=int, default=None, help="steps for jobs that do not set them")
    p.add_argument("--guidance", type=float, default=None, help="guidance for jobs that do not set it")
    p.add_argument("--height", type=int, default=None,
                   help="image height for EVERY job: overrides the job's and the defaults' size (an edit job, "
                        "sized by its image, is refused with it)")
    p.add_argument("--width", type=int, default=None,
                   help="image width for EVERY job: overrides the job's and the defaults' size (an edit job, "
                        "sized by its image, is refused with it)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seeds", type=int, default=None, help="images per prompt (seeds 0..N-1) for jobs without seeds")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: 1 for small models such as the bundled ones, else "
                        "torch's; CPU sums depend on it: fix it to compare runs bit for bit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    """Exit status: 0 all made, 1 a failed image or a bad line, 2 a bad argument / --strict with bad lines
    / the output folder busy, 128 + signal when stopped by SIGTERM (143) or SIGINT (130)."""
    overrides = {"steps": args.steps, "guidance": args.guidance, "height": args.height, "width": args.width,
                 "negative_prompt": args.negative_prompt, "seeds": args.seeds}
    _check_args(args, overrides)
    if args.validate:
        return _validate(args, overrides)
    if args.out is None or not str(args.out).strip():
        raise ValueError("--out is required: the output folder (or use --validate)")
    from ..cli import quiet_loading

    quiet_loading()
    try:
        summary = run_batch(args.jobs, args.out, model=args.model, batch_size=args.batch_size, overrides=overrides,
                            strict=args.strict, device=args.device, dtype=args.dtype, progress=not args.no_progress,
                            threads=args.threads if args.threads is not None else "auto")
    except OutputBusy as err:
        if distributed_state().is_main_process:
            print(f"attnedit batch: error: {err}", file=sys.stderr)
        return 2
    if distributed_state().is_main_process:
        print_summary(summary, args.jobs)
    if summary.interrupted:
        return summary.exit_status
    if args.strict and summary.invalid:
        return 2
    return summary.exit_status


def _check_args(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    """Every flag checked before a model is loaded (the job file's values are checked by `plan`)."""
    check_overrides(overrides)
    validate.integer("--batch-size", args.batch_size, 1)
    if args.threads is not None:
        validate.integer("--threads", args.threads, 1, 4096)
    if args.dtype is not None:
        validate.choice("--dtype", args.dtype, validate.DTYPES)
    if args.device is not None:
        validate.device(args.device)
    if args.model is not None:
        validate.text("--model", args.model)


def _validate(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from ..cli import quiet_loading
    from ..pipeline import DEFAULT_MODEL, load

    quiet_loading()
    model = args.model or file_model(args.jobs) or DEFAULT_MODEL
    pipe = load(model, device=args.device or "cpu", dtype=args.dtype, **load_options(args.jobs))
    result = plan(args.jobs, pipe, overrides, model)
    lines = [(p.line, "", p.message) for p in result.problems] + [(p.line, "warning: ", p.message)
                                                                   for p in result.warnings]
    for line, kind, message in sorted(lines, key=lambda x: x[0]):
        print(f"{args.jobs}:{line}: {kind}{message}")
    print(f"{result.jobs} job(s), {len(result.units)} image(s), {len(result.problems)} problem(s)"
          + (f", {len(result.warnings)} warning(s)" if result.warnings else "")
          + (f", {result.duplicates} duplicate image(s) merged" if result.duplicates else ""))
    return 1 if result.problems else 0
