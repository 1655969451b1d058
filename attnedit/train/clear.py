"""`attnedit train clear`: distil a CLEAR (local-attention) student from its full-attention teacher.

Recipe of the paper (Huage001/CLEAR `distill.py`), on one process or many through `accelerate`:
the teacher is the frozen model with full attention; the student is the same model with CLEAR's
window on every attention layer, where only the image-stream q/k/v/out projections (and the
down-sampling `spatial_weight`s) train. Data are self-generated: the teacher pipeline samples
latents for the prompts, text embeddings are cached. Loss (uniform timesteps, rectified flow):

    MSE(student, noise - x0) + 0.5 MSE(student, teacher) + 0.5 mean_l MSE(attn_l^student, attn_l^teacher)

with the attention-output term on `single_transformer_blocks.{1, 5, 9, ...}` (the official
processor indices 20, 24, ..., 56). Differences: AdamW by default (Prodigy when `prodigyopt` is
installed and asked for), FLUX-architecture DiTs only for now, the adapter keeps only the trained
tensors (safetensors, with the model's config hash, radius and df in its metadata).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..controller import Controller
from ..families import family_of
from ..methods.clear import CLEAR, ClearWeights, save_adapter, trainable_parameters

DEFAULT_PROMPTS = (
    "a red circle and a blue square",
    "a green triangle above a yellow circle",
    "a small purple square on the left",
    "two orange circles side by side",
)
OPTIMIZERS = ("adamw", "prodigy")
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class DistillResult:
    """What `distill_clear` produced: the adapter path and the per-step losses."""

    adapter: str
    losses: list[float] = field(default_factory=list)
    parts: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0


def _check_positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def attention_loss_layers(denoiser: torch.nn.Module, pattern: str | None = None) -> list[str]:
    """Names of the attention modules whose outputs are matched (official: every 4th single block from 1)."""
    names = [n for n, m in denoiser.named_modules() if re.fullmatch(r"(single_)?transformer_blocks\.\d+\.attn", n)]
    if pattern:
        picked = [n for n in names if re.fullmatch(pattern, n)]
        if not picked:
            raise ValueError(f"attention-loss pattern {pattern!r} matches no layer; layers are e.g. {names[:3]}")
        return picked
    singles = [n for n in names if n.startswith("single_")]
    official = [n for n in singles if int(n.split(".")[1]) % 4 == 1]
    return official or singles or names[-1:]


class _Recorder:
    """Forward hooks keeping the outputs of attention modules (the distillation's third term)."""

    def __init__(self, denoiser: torch.nn.Module, layers: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in layers:
            module = denoiser.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@torch.no_grad()
def teacher_samples(
    edit_pipe,
    prompts: Sequence[str],
    num_samples: int,
    *,
    steps: int,
    height: int,
    width: int,
    guidance: float,
    seed: int,
) -> dict[str, Any]:
    """Self-generated data: teacher latents `x0` (packed, one row per sample), the text condition of each
    sample (`rows`: the family's per-prompt condition tensors) and what every sample shares (`shared`:
    position ids), as the family's adapter encodes them."""
    pipe = edit_pipe.pipe
    family = edit_pipe.family
    call, negative = edit_pipe.guidance_call(edit_pipe.call_defaults(), guidance)
    if negative is not None:
        call["negative_prompt"] = negative
    msl = int(call.get("max_sequence_length", 512))
    x0: list[torch.Tensor] = []
    rows: dict[str, list[torch.Tensor]] = {}
    shared: dict[str, torch.Tensor] = {}
    for i in range(num_samples):
        prompt = prompts[i % len(prompts)]
        g = torch.Generator(device="cpu").manual_seed(seed + i)
        latents = edit_pipe.initial_latents(1, height, width, [g])
        out = pipe(
            prompt=prompt, num_inference_steps=steps, height=height, width=width,
            latents=latents, output_type="latent", **call,
        )
        cond = family.encode_condition([prompt], 1, height=height, width=width, image_grid=None,
                                       max_sequence_length=msl, guidance_scale=guidance)
        x0.append(out.images[0].detach().float().cpu())
        for key, value in cond.items():
            if value is None:
                continue
            if key in family.row_keys:
                rows.setdefault(key, []).append(value[0].float().cpu())
            else:
                shared.setdefault(key, value.float().cpu())
    return {"x0": torch.stack(x0), "rows": {k: torch.stack(v) for k, v in rows.items()}, "shared": shared}


def sample_condition(data: dict[str, Any], index: torch.Tensor, device: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The denoiser condition of the samples `index` of `teacher_samples` data."""
    cond = {k: v[index].to(device, dtype) for k, v in data["rows"].items()}
    cond.update({k: v.to(device, dtype) for k, v in data["shared"].items()})
    if "guidance" in cond:
        cond["guidance"] = cond["guidance"].float()  # the pipeline passes guidance in float32
    return cond


def distill_clear(
    model: str = "shapes-dit",
    out: str | os.PathLike = "clear-adapter.safetensors",
    *,
    radius: float = 16,
    down_factor: int | None = None,
    prompts: Sequence[str] | None = None,
    num_samples: int = 8,
    sample_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance: float = 3.5,
    max_steps: int = 1000,
    batch_size: int = 1,
    grad_accum: int = 1,
    lr: float = 1e-4,
    optimizer: str = "adamw",
    weight_decay: float = 1e-4,
    loss_weights: tuple[float, float, float] = (1.0, 0.5, 0.5),
    attn_layers: str | None = None,
    mixed_precision: str = "no",
    checkpoint_every: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    fixed_batch: bool = False,
    seed: int = 0,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    save_dtype: torch.dtype | None = None,
    progress: bool = True,
    edit_pipe=None,
) -> DistillResult:
    """Distil a CLEAR student of `model` and write its adapter to `out`.

    `dtype` loads the model in that precision (e.g. "bf16" for FLUX-dev); with `mixed_precision`
    on, the trained tensors are kept in float32 (master weights) and the forward runs under autocast.
    `fixed_batch=True` trains on one fixed (x0, noise, t) batch (a loss-goes-down check);
    `checkpoint_every` saves `accelerate` states under `checkpoint_dir`, `resume` ("latest" or a
    checkpoint folder) continues from one.

    >>> res = distill_clear("tiny-flux", "out/clear.safetensors", radius=2, max_steps=20)
    >>> pipe = attnedit.load("tiny-flux", clear=res.adapter)
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..pipeline import load

    _check_positive("max_steps", max_steps)
    _check_positive("batch_size", batch_size)
    _check_positive("grad_accum", grad_accum)
    _check_positive("num_samples", num_samples)
    _check_positive("checkpoint_every", checkpoint_every, 0)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"unknown mixed precision {mixed_precision!r}; choose from {', '.join(PRECISIONS)}")
    if len(loss_weights) != 3 or any(w < 0 for w in loss_weights):
        raise ValueError(f"loss_weights must be three non-negative numbers, got {loss_weights!r}")
    clear = CLEAR(radius=radius, down_factor=down_factor)  # validates radius and df
    prompts = list(prompts or DEFAULT_PROMPTS)
    if not prompts:
        raise ValueError("give at least one prompt")
    if checkpoint_every and checkpoint_dir is None:
        checkpoint_dir = Path(out).with_suffix("").as_posix() + "-checkpoints"

    # a second run in the same process may use other precision settings: drop accelerate's
    # per-process AcceleratorState (the distributed PartialState stays)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=device == "cpu"
    )
    set_seed(seed)
    if edit_pipe is None:
        edit_pipe = load(model, device=device or accelerator.device, dtype=dtype)
    if not edit_pipe.family.has("clear_distillation"):
        raise ValueError(
            f"CLEAR distillation is implemented for FLUX-architecture DiTs; {model!r} is {edit_pipe.family.label}"
        )
    dh, dw = edit_pipe.default_size()
    height, width = int(height or dh), int(width or dw)
    steps_sample = int(sample_steps or edit_pipe.default_steps())
    data = teacher_samples(edit_pipe, prompts, num_samples, steps=steps_sample, height=height, width=width,
                           guidance=guidance, seed=seed)

    student = edit_pipe.denoiser
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    student.requires_grad_(False)
    ctrl = Controller(edit_pipe.pipe, [clear], denoiser=student)
    ctrl.install()
    recorders: list[_Recorder] = []
    try:
        ctrl.begin_run(None, num_steps=1, height=height, width=width)  # CLEAR.setup validates here
        layers = sorted(clear.selected_layers)
        train_params = trainable_parameters(student, layers)
        if clear.down_factor is not None:
            if clear.weights is None or not isinstance(clear.weights, ClearWeights):
                raise RuntimeError("CLEAR did not create its spatial weights")
            clear.weights.attach(student)
            for name, p in clear.weights.named_parameters():
                train_params[f"attnedit_clear.{name}"] = p
        for p in train_params.values():
            if mixed_precision != "no" and p.dtype != torch.float32:
                p.data = p.data.float()  # float32 master weights; autocast casts them per op
            p.requires_grad_(True)
        params = list(train_params.values())
        if optimizer == "prodigy":
            try:
                from prodigyopt import Prodigy  # type: ignore[import-not-found]
            except ImportError as err:
                raise ValueError("optimizer 'prodigy' needs the prodigyopt package; use 'adamw'") from err
            opt = Prodigy(params, lr=lr, weight_decay=weight_decay, decouple=True, use_bias_correction=True,
                          safeguard_warmup=True)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        student_p, opt = accelerator.prepare(student, opt)
        student_family = family_of(edit_pipe.pipe, denoiser=student_p)  # the prepared module (DDP syncs its grads)
        loss_layers = attention_loss_layers(student, attn_layers)
        rec_s, rec_t = _Recorder(student, loss_layers), _Recorder(teacher, loss_layers)
        recorders += [rec_s, rec_t]

        start = 0
        if resume is not None:
            ckpt = _resolve_checkpoint(resume, checkpoint_dir)
            accelerator.load_state(str(ckpt))
            start = int(json.loads((Path(ckpt) / "attnedit_step.json").read_text())["step"])
        if start >= max_steps:
            raise ValueError(f"checkpoint is at step {start}, max_steps is {max_steps}: nothing to train")

        dev = accelerator.device
        model_dtype = next(teacher.parameters()).dtype
        taught = family_of(edit_pipe.pipe, denoiser=teacher)
        w_fm, w_kd, w_attn = loss_weights
        result = DistillResult(adapter=os.fspath(out))
        bar = tqdm(total=max_steps, initial=start, desc="distil CLEAR", disable=not progress or
                   not accelerator.is_local_main_process)

        def forward(family: Any, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
            return family.denoise(x, t * family.schedule_value(1.0), cond)[0]

        for step in range(start, max_steps):
            gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + (0 if fixed_batch else step + 1))
            idx = torch.randint(0, num_samples, (batch_size,), generator=gen)
            x0 = data["x0"][idx].to(dev, model_dtype)
            cond = sample_condition(data, idx, dev, model_dtype)
            noise = torch.randn(x0.shape, generator=gen).to(dev, model_dtype)
            t = torch.rand(batch_size, generator=gen).to(dev, model_dtype)
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
            with accelerator.accumulate(student_p):
                with torch.no_grad(), ctrl.pass_phase("guidance", step=0):
                    target_t = forward(taught, xt, t, cond)
                with ctrl.pass_phase("guidance", step=0):
                    pred = forward(student_family, xt, t, cond)
                fm = F.mse_loss(pred.float(), (noise - x0).float())
                kd = F.mse_loss(pred.float(), target_t.float())
                att = torch.stack([
                    F.mse_loss(rec_s.outputs[n].float(), rec_t.outputs[n].detach().float()) for n in loss_layers
                ]).mean()
                loss = w_fm * fm + w_kd * kd + w_attn * att
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"CLEAR distillation diverged at step {step} (loss {value}); lower lr")
            result.losses.append(value)
            result.parts.append({"flow": float(fm.detach()), "distill": float(kd.detach()),
                                 "attention": float(att.detach())})
            result.steps = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if checkpoint_every and (step + 1) % checkpoint_every == 0:
                _save_checkpoint(accelerator, Path(checkpoint_dir), step + 1)
        bar.close()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_adapter(out, accelerator.unwrap_model(student_p), clear, model_id=str(model), dtype=save_dtype,
                         extra={"train_steps": str(result.steps), "loss_weights": json.dumps(list(loss_weights))})
        return result
    finally:
        for r in recorders:
            r.remove()
        ctrl.remove()
        student.requires_grad_(False)
        if hasattr(student, "attnedit_clear"):
            del student.attnedit_clear


def _save_checkpoint(accelerator, root: Path, step: int) -> Path:
    path = root / f"step-{step:07d}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "attnedit_step.json").write_text(json.dumps({"step": step}))
    return path


def _resolve_checkpoint(resume: str | os.PathLike, checkpoint_dir: str | os.PathLike | None) -> Path:
    if str(resume) == "latest":
        if checkpoint_dir is None or not Path(checkpoint_dir).is_dir():
            raise ValueError("resume='latest' needs an existing checkpoint_dir")
        found = sorted(Path(checkpoint_dir).glob("step-*"))
        if not found:
            raise ValueError(f"no checkpoint (step-*) in {checkpoint_dir}")
        return found[-1]
    path = Path(resume)
    if not (path / "attnedit_step.json").is_file():
        raise ValueError(f"{path} is not an attnedit CLEAR checkpoint (no attnedit_step.json)")
    return path


# ------------------------------------------------------------------------------------------ CLI
def add_parser(sub: argparse._SubParsersAction) -> None:
    """The `clear` command line; its arguments live in `attnedit.train.cli` (no torch import for --help)."""
    from .cli import add_clear_parser

    add_clear_parser(sub)


def _cli(args: argparse.Namespace) -> int:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [ln.strip() for ln in Path(args.prompts_file).read_text().splitlines() if ln.strip()]
    radius = int(args.radius) if float(args.radius).is_integer() else args.radius
    res = distill_clear(
        args.model, args.out, radius=radius, down_factor=args.down_factor, prompts=prompts or None,
        num_samples=args.num_samples, sample_steps=args.sample_steps, height=args.height, width=args.width,
        guidance=args.guidance, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, optimizer=args.optimizer, mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
        seed=args.seed, device=args.device, dtype=args.dtype,
    )
    first, last = (res.losses[0], res.losses[-1]) if res.losses else (float("nan"), float("nan"))
    print(f"wrote {res.adapter} after {res.steps} steps (loss {first:.4f} -> {last:.4f})")
    return 0
