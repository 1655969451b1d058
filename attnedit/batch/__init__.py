"""`attnedit batch`: thousands of prompts with controls, on one CPU or many GPUs, never losing an image.

    attnedit batch jobs.jsonl --out runs/a --model shapes-sd --batch-size 8
    accelerate launch --multi_gpu --num_processes 8 -m attnedit batch jobs.yaml --out runs/a
    attnedit batch --validate jobs.yaml

(Several CPU processes: the same `accelerate launch --multi_gpu --num_processes N` on a machine
without GPUs uses gloo; `accelerate launch --cpu` starts a single process.) Reruns into the same
`--out` skip finished images; see assets/examples/jobs.yaml.

A job file is JSONL (one job per line; a `{"defaults": {...}}` line fills every job) or YAML
(`defaults:` plus a `jobs:` list, or a bare list). A job names `prompt` (or `prompts`), `controls`
(`[{"name": "store", "words": ["cat"]}]`: the options of the Python API by the same names), `seeds`
(a list, or a count starting at `seed`), `size` / `height` / `width`, `steps`, `guidance`,
`negative_prompt`, `maps` (true or a list of words: save an attention-map grid), an optional `id`,
and `together: true` to make a job's prompts in one call from one seed, the first as the source
of the others (MasaCtrl). Values come from the job, then the CLI flags, then the `defaults`
block, then the model; except the size: `--height` / `--width` on the command line override
every job's size (its own `size` / `height` / `width` and the defaults'), side by side, and a
real-image edit job (sized by its image) is refused with them. Every value is checked as the
Python API checks it (`attnedit.validate`: integers are integers, guidance finite, seeds in
0 .. 2**32 - 1, sides in 1 .. 8192 and multiples of the model's stride) before any model call;
YAML anchors / aliases and keys given twice (YAML or JSONL) are refused with their line.
`--validate` also warns, without failing, about a size more than 2x from the model's native
size on a side (slow, and noise rather than images).

Jobs that read files (every path is relative to the job file's folder and checked before anything
runs; an image's key includes the files' contents, so an edited file is made again):
- real-image edit: `image` (a photo) with `source_prompt` (what it shows); `prompt`/`prompts` are
  the targets. The image is inverted and denoised as the source (its reconstruction, made too)
  and the targets; the first control is the edit's control (default MasaCtrl). Size and noise come
  from the image: no `size`, `seed(s)` or `together`.
- IR-Diffusion: `prompt` is the scene and `references: {prompts: [...], subjects: [...], boxes:
  [[x0, y0, x1, y1], ...], images: [ref.png, ...], options: {isolate: true, ...}}` its subjects
  (one reference prompt and one subject word each; `boxes`, where each goes in the scene, and
  `images`, real reference photos, are optional; `options` are RepositionAttention's).
- control options that name files (MasaCtrl `masks: [mask.png, ...]`, white = foreground).
- `concepts` (defaults only: one model per run): AttenCraft tokens loaded with the model
  (`attnedit.load(model, concepts=path)`).

Why it is built this way:
- Every image is one *unit* with a content key (model, prompt, seed, settings): its file name is
  `<id or prompt>-s<seed>-<key>.png`, so reruns and workers agree on names without talking.
- Units that share settings are grouped into batches from the job file alone (order of the file,
  `--batch-size`), never from the number of workers or from what is already done, and whole
  batches are split between processes. CPU (and GPU) matrix kernels sum in a batch-size-dependent
  order, so a pixel may differ by one level between batch sizes; fixing the batches this way
  makes one worker and eight workers, and a resumed run, bit-identical (on the same kind of
  device; on CPUs with the same threads per process, `--threads`, which CPU sums also depend on).
- Writes are atomic (temp name unique to the process, then rename); the sidecar JSON is written
  last, holds the PNG's sha256 and marks an image complete; a rerun skips an image only when its
  bytes still match (an older sidecar without the hash: when the PNG decodes whole), so a file
  damaged on disk is made again. `manifest.jsonl` gets one line per finished image (appended
  under a file lock) and is rebuilt from the sidecars when it was cut short, and rewritten in job
  order at the end.
- One run at a time per output folder: a run holds an exclusive lock (`.attnedit-batch.lock`,
  `flock`, taken by the main process of an `accelerate launch` for all its processes); a second
  run into the same `--out` refuses at once, naming the folder and the holder.
- SIGTERM / SIGINT: the batch being denoised is abandoned (nothing of it is written), images
  already handed to the writer are finished, and the run ends with status 128 + the signal
  (143 / 130); a second signal ends it at once. Finished images stay intact; rerun to resume.

Where the code is: `files` reads job files, `jobs` checks and expands them into units, `kinds` holds the
`JobKind` interface and its registry (the `generate` kind; a method's own kind lives beside it in
`attnedit.methods`, such as the real-image edit beside MasaCtrl), `runner` runs batches,
`manifest` writes the output folder, `cli` is `attnedit batch`.
"""

from __future__ import annotations

from .cli import add_parser
from .data import (
    BASE_KEYS,
    DEFAULT_KEYS,
    ID_MAX,
    LOCK,
    MANIFEST,
    MESSAGE_MAX,
    SEEDS_COUNT_MAX,
    SIDECAR_TAG,
    SIZE_FAR,
    Entry,
    Plan,
    Problem,
    Summary,
    Unit,
)
from .files import file_concepts, file_model, input_file, job_file_text, read_jobs, resolve
from .jobs import check_overrides, make_batches, plan
from .kinds import (
    GENERATE,
    GenerateKind,
    JobKind,
    build_controls,
    check_with_model,
    control_spec,
    group_layout,
    job_keys,
    kind_named,
    kind_of,
    kinds,
    load_methods,
    register_kind,
)
from .manifest import (
    OutputBusy,
    OutputLock,
    append_manifest,
    intact,
    is_complete,
    rebuild_manifest,
    recover,
)
from .manifest import _temp_name as _temp_name  # named by the crash-safety tests
from .runner import Interrupted, Runner, StopSignals, print_summary, run_batch

__all__ = [
    "BASE_KEYS", "DEFAULT_KEYS", "GENERATE", "ID_MAX", "LOCK", "MANIFEST", "MESSAGE_MAX", "SEEDS_COUNT_MAX",
    "SIDECAR_TAG", "SIZE_FAR", "Entry", "GenerateKind", "Interrupted", "JobKind", "OutputBusy", "OutputLock", "Plan",
    "Problem", "Runner", "StopSignals", "Summary", "Unit", "add_parser", "append_manifest", "build_controls",
    "check_overrides", "check_with_model", "control_spec", "file_concepts", "file_model", "group_layout",
    "input_file", "intact", "is_complete", "job_file_text", "job_keys", "kind_named", "kind_of", "kinds",
    "load_methods", "make_batches", "plan", "print_summary", "read_jobs", "rebuild_manifest", "recover",
    "register_kind", "resolve", "run_batch",
]
