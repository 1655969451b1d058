"""The run: batches split between processes (accelerate), images made and handed to a writer thread,
SIGTERM / SIGINT handled so the run stops between writes, summaries merged across processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import validate
from .data import SIDECAR_TAG, Plan, Summary, Unit, _cap
from .files import file_model, load_options
from .jobs import check_overrides, make_batches, plan
from .kinds import build_controls, control_spec, kind_named
from .manifest import (
    OutputBusy,
    OutputLock,
    append_manifest,
    is_complete,
    manifest_row,
    rebuild_manifest,
    recover,
    write_atomic,
    write_png,
)


class Interrupted(BaseException):
    """Raised inside the denoising of a batch when SIGTERM / SIGINT arrives: the batch is abandoned."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT during a run (main thread only): the first one abandons the batch being
    denoised (`Interrupted` from inside `abortable`) or, elsewhere, stops the run before the next
    batch; a second one acts as the signal would without this handler (ends the process)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._abortable = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # asked twice: stop now (writes are atomic, a rerun resumes)
            previous = self._previous.get(signum, signal.SIG_DFL)
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            if callable(previous):
                previous(signum, frame)
            else:
                os.kill(os.getpid(), signum)
            return
        self.received = signum
        if self._abortable:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def abortable(self) -> Iterator[None]:
        if self.received is not None:
            raise Interrupted(self.received)
        self._abortable += 1
        try:
            yield
        finally:
            self._abortable -= 1


# ------------------------------------------------------------------------------------- the run
def distributed_state(cpu: bool | None = None):
    """accelerate's process state (one process without a launcher); CPU-only machines use gloo."""
    import torch
    from accelerate import PartialState

    if cpu is None:
        forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        cpu = forced or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


class Runner:
    """Makes the images of one process's batches and writes them (also used by the benchmark).

    Files are written by one background thread while the next batch denoises (PNG encoding and
    fsync cost as much as a small model's forward passes); at most one batch waits to be written.
    With `signals` (a `StopSignals`), SIGTERM / SIGINT abandon the batch being denoised (`Interrupted`).
    """

    def __init__(self, pipe: Any, out: Path, model: str, progress: Any = None,
                 signals: StopSignals | None = None, complete: set[str] | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from ..pipeline import versions

        self.pipe = pipe
        self.out = out
        self.model = model
        self.versions = versions()
        self.progress = progress
        self.signals = signals
        self.complete = complete  # keys of the images found complete before the run (else checked per batch)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnedit-batch-writer")
        self._writing: Any = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Wait until every image handed to the writer is on disk."""
        self.flush()
        self._writer.shutdown(wait=True)

    def flush(self) -> None:
        if self._writing is not None:
            self._writing.result()
            self._writing = None

    def run(self, batch: list[Unit], summary: Summary) -> None:
        todo = [u for u in batch if not (u.key in self.complete if self.complete is not None
                                         else is_complete(self.out, u))]
        summary.skipped += len(batch) - len(todo)
        self._tick(len(batch) - len(todo))
        if not todo:
            return
        try:
            with self.signals.abortable() if self.signals is not None else contextlib.nullcontext():
                files = self._generate(batch, todo)
        except Exception as err:  # a control that raises: isolate it, the others go on
            if len(batch) == 1 or batch[0].group:  # a group only makes sense as a whole
                summary.failed += [(u.line, u.stem, _cap(f"{type(err).__name__}: {err}")) for u in todo]
                self._tick(len(todo))
                return
            for u in todo:
                self.run([u], summary)
            return
        self.flush()
        self._writing = self._writer.submit(self._write, files, summary)

    def _generate(self, batch: list[Unit], todo: list[Unit]) -> list[tuple[Unit, Any, Any, dict[str, Any]]]:
        """The whole batch is computed again (so pixels never depend on what was done before);
        returns (unit, image, map grid or None, sidecar) of the missing images."""
        from ..visualize import map_grid

        s = batch[0].settings
        kind = kind_named(batch[0].kind)
        controls, store = build_controls(s["controls"], s["maps"], batch[0].base)
        common = dict(steps=s["steps"], guidance=s["guidance"], negative_prompt=s["negative_prompt"])
        result = kind.run(self.pipe, batch, controls, common)
        options = [control_spec(c) for c in controls]
        wanted = {u.key for u in todo}
        files = []
        for i, u in enumerate(batch):
            if u.key not in wanted:
                continue
            grid = map_grid(store.word_maps(i), result.images[i]) if store is not None else None
            sidecar = {
                SIDECAR_TAG: u.key,
                "image": f"{u.stem}.png",
                "maps_file": f"{u.stem}.maps.png" if grid is not None else None,
                "model": self.model,
                "family": self.pipe.family.name,
                "prompt": u.prompt,
                "negative_prompt": s["negative_prompt"],
                "seed": u.seed,
                "steps": s["steps"],
                "guidance": s["guidance"],
                "height": s["height"],
                "width": s["width"],
                "controls": options,
                "controls_spec": s["controls"],
                "inputs": {k: s[k] for k in (*kind.inputs, "files") if k in s} or None,
                "batch_size": len(batch),
                "group": {"id": u.group, "role": u.role, "prompts": [b.prompt for b in batch]} if u.group else None,
                "job": {"line": u.line, "id": u.job_id},
                "versions": self.versions,
            }
            files.append((u, result.images[i], grid, sidecar))
        return files

    def _write(self, files: list[tuple[Unit, Any, Any, dict[str, Any]]], summary: Summary) -> None:
        """Maps grid, PNG, then sidecar (the completion mark, with the PNGs' sha256), then the manifest line."""
        for u, image, grid, sidecar in files:
            try:
                if grid is not None:
                    sidecar["maps_sha256"] = write_png(self.out / sidecar["maps_file"], grid)
                sidecar["png_sha256"] = write_png(self.out / sidecar["image"], image)
                write_atomic(self.out / f"{u.stem}.json", json.dumps(sidecar, indent=2, default=str))
                append_manifest(self.out, manifest_row(sidecar))
                summary.done += 1
            except Exception as err:  # disk full, permissions: reported, the run goes on
                summary.failed.append((u.line, u.stem, _cap(f"writing failed: {type(err).__name__}: {err}")))
            self._tick(1)

    def _tick(self, n: int) -> None:
        if self.progress is not None and n:
            self.progress.update(n)



def run_batch(
    jobs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    pipe: Any = None,
    batch_size: int = 1,
    overrides: dict[str, Any] | None = None,
    strict: bool = False,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    log: Any = None,
    threads: int | str | None = None,
) -> Summary:
    """Run a job file into `out` (resuming what is there); returns this run's `Summary`.

    `threads`: CPU threads per process (None: leave torch's setting; "auto": the command line's policy,
    one thread for a small model on the CPU, see `attnedit.cli.cpu_threads`).

    Under `accelerate launch` each process takes its share of the batches; every process returns
    the merged summary. `pipe` reuses a loaded `EditPipeline` (single process only). `overrides`
    are the command-line values by name (steps, guidance, height, width, negative_prompt, seeds).
    Raises `OutputBusy` when another run holds `out`. SIGTERM / SIGINT (main thread) end the run
    early with `Summary.interrupted` set: the batch in flight is abandoned, written images stay.
    """
    from ..pipeline import DEFAULT_MODEL, load

    validate.integer("batch_size", batch_size, 1)
    check_overrides(overrides)
    log = log or sys.stderr
    start = time.perf_counter()
    state = distributed_state()
    main = state.is_main_process
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give an output folder")
    model_name = model or (file_model(jobs) if pipe is None else getattr(pipe, "model_name", None)) or DEFAULT_MODEL
    if pipe is None:  # a given pipe must already carry the file's concepts
        pipe = load(model_name, device=device or state.device, dtype=dtype, **load_options(jobs))
    if threads is not None:
        from ..cli import cpu_threads

        cpu_threads(pipe, None if threads == "auto" else threads)
    the_plan = plan(jobs, pipe, overrides, model_name)
    summary = Summary(invalid=the_plan.problems, duplicates=the_plan.duplicates)
    if main:
        for p in the_plan.problems:
            print(f"{jobs}:{p.line}: {p.message}" + ("" if strict else " (skipped)"), file=log)
        for p in the_plan.warnings:
            print(f"{jobs}:{p.line}: warning: {p.message}", file=log)
    if strict and the_plan.problems:
        summary.seconds = time.perf_counter() - start
        return summary
    lock = _lock_output(out, state)  # one run per folder: the main process locks it for every process
    try:
        with StopSignals() as signals:
            merged = _run_locked(the_plan, out, pipe, model_name, batch_size, strict, progress, state, signals)
    finally:
        if lock is not None:
            lock.release()
    merged.invalid, merged.duplicates = the_plan.problems, the_plan.duplicates
    merged.seconds = time.perf_counter() - start
    if merged.interrupted and main:
        print(f"attnedit batch: stopped by {signal.Signals(merged.interrupted).name}: the batch in flight was "
              f"abandoned, the {merged.done} image(s) written by this run are complete; rerun the same command to "
              "resume", file=log)
    return merged


def _complete_keys(units: Sequence[Unit], out: Path, state: Any) -> set[str]:
    """Keys of the images already complete and intact in `out` (`is_complete`: their bytes are read once,
    by the main process, and the answer shared with the others)."""
    keys = sorted(u.key for u in units if is_complete(out, u)) if state.is_main_process else None
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        keys = broadcast_object_list([keys], from_process=0)[0]
    return set(keys or ())


def _lock_output(out: Path, state: Any) -> OutputLock | None:
    """The main process takes the folder's lock; every process learns whether it got it."""
    lock, busy = None, None
    if state.is_main_process:
        try:
            lock = OutputLock(out).acquire()
        except OutputBusy as err:
            busy = str(err)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        busy = broadcast_object_list([busy], from_process=0)[0]
    if busy is not None:
        raise OutputBusy(busy)
    return lock


def _run_locked(the_plan: Plan, out: Path, pipe: Any, model_name: str, batch_size: int, strict: bool,
                progress: bool, state: Any, signals: StopSignals) -> Summary:
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    if main:
        recover(out)
    state.wait_for_everyone()
    batches = make_batches(the_plan.units, batch_size)
    complete = _complete_keys(the_plan.units, out, state)
    pending = [b for b in batches if not all(u.key in complete for u in b)]
    state.wait_for_everyone()  # every process has read the same state before anything is written
    local = Summary()
    with state.split_between_processes(pending) as mine:
        bar = _progress_bar(sum(len(b) for b in mine), rank, world, progress)
        with Runner(pipe, out, model_name, bar, signals, complete) as runner:
            for batch in mine:
                if signals.received is not None:
                    break
                try:
                    runner.run(batch, local)
                except Interrupted:
                    break
                if strict and local.failed:
                    break
        # leaving the Runner waited for the writer: every image handed to it is on disk
        if bar is not None:
            bar.close()
    if signals.received is not None:  # no collective step: the other processes may be stopping too
        local.interrupted = signals.received
        return local
    if main:  # batches finished before this run: counted once, not by every process
        local.skipped += sum(len(b) for b in batches) - sum(len(b) for b in pending)
    merged = _gather(local, state)
    if main:
        rebuild_manifest(out, the_plan.units)
    state.wait_for_everyone()
    return merged


def _progress_bar(total: int, rank: int, world: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"batch [{rank + 1}/{world}]", unit="img", position=rank, dynamic_ncols=True,
                file=sys.stderr, leave=True)


def _gather(local: Summary, state: Any) -> Summary:
    """Sum the summaries of every process (each process gets the total)."""
    if state.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    merged = Summary()
    for done, skipped, failed in gather_object([(local.done, local.skipped, local.failed)]):
        merged.done += done
        merged.skipped += skipped
        merged.failed += [tuple(f) for f in failed]
    return merged


def print_summary(summary: Summary, jobs: str, log: Any = None) -> None:
    log = log or sys.stdout
    print(f"attnedit batch: {summary.done} done, {summary.skipped} skipped (already complete), "
          f"{len(summary.failed)} failed, {len(summary.invalid)} invalid job line(s) "
          + (f"({summary.duplicates} duplicate image(s) made once) " if summary.duplicates else "")
          + f"in {summary.seconds:.1f}s"
          + (f"; stopped early by {signal.Signals(summary.interrupted).name}" if summary.interrupted else ""),
          file=log)
    for line, stem, reason in summary.failed:
        print(f"  failed {jobs}:{line} {stem}: {reason}", file=log)
    for p in summary.invalid:
        print(f"  invalid {jobs}:{p.line}: {p.message}", file=log)


