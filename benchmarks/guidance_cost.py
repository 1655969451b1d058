"""Cost of one guided step (A&E, A-STAR, Bounded Attention) against a plain denoising step.

    python benchmarks/guidance_cost.py --arch sd15 sdxl --size 256 --width-scale 0.25 --repeats 3

Builds random-weight pipelines with the layer layout of SD1.5 and SDXL (all levels, blocks,
transformer depths and 64-dim heads; channels scaled by --width-scale so a CPU can run them,
1.0 = real size) and measures, side by side in one process:
- plain: one CFG denoiser forward (batch 2, no grad), the normal cost of a step;
- each method's guidance update: one cond-only forward with captured maps + backward (one
  iteration; A&E refinement and Bounded's up to 5 iterations multiply it), with and without
  the early exit after the last loss layer;
- Bounded denoise: a masked CFG forward (region labels in every layer).
Memory: the bytes autograd keeps for backward (activations and captured maps, weights excluded;
exact on any device) and, on a GPU, the peak CUDA allocation above the state before the call.
Ratios to the plain step, not absolute numbers, are the claim; they come from this one run (on a
shared CPU, times are noisy: compare rows of one table only).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

import attnedit
from attnedit.guidance import encode_condition
from attnedit.tiny import clip_tokenizer


def _scaled(channels: tuple[int, ...], scale: float) -> tuple[int, ...]:
    return tuple(max(64, int(c * scale)) // 64 * 64 for c in channels)


def _clip(hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=256, num_hidden_layers=1, num_attention_heads=8,
                         vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae():
    import diffusers as d

    return d.AutoencoderKL(block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8).eval()


def build(arch: str, scale: float):
    """A pipeline with the UNet layout of `arch` ("sd15" or "sdxl") and tiny text encoders."""
    import diffusers as d

    torch.manual_seed(0)
    if arch == "sd15":
        ch = _scaled((320, 640, 1280, 1280), scale)
        unet = d.UNet2DConditionModel(block_out_channels=ch, cross_attention_dim=768,
                                      attention_head_dim=[c // 64 for c in ch], layers_per_block=2, sample_size=64)
        sched = d.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = d.StableDiffusionPipeline(vae=_vae(), text_encoder=_clip(768), tokenizer=clip_tokenizer(), unet=unet,
                                         scheduler=sched, safety_checker=None, feature_extractor=None,
                                         requires_safety_checker=False)
    elif arch == "sdxl":
        ch = _scaled((320, 640, 1280), scale)
        unet = d.UNet2DConditionModel(
            block_out_channels=ch, layers_per_block=2, cross_attention_dim=2048, sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=[c // 64 for c in ch], transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=6 * 256 + 1280)
        sched = d.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, timestep_spacing="leading")
        pipe = d.StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip(768), tokenizer=clip_tokenizer(),
                                           text_encoder_2=_clip(1280, projection=True), tokenizer_2=clip_tokenizer(),
                                           unet=unet, scheduler=sched, add_watermarker=False)
    else:
        raise ValueError(f"unknown arch {arch!r}; choose sd15 or sdxl")
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved_for_backward(fn: Callable[[], object], params: set[int]) -> int:
    """Bytes of the tensors autograd keeps for the backward of `fn` (weights excluded, storages counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def cuda_peak(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during `fn` above what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@contextmanager
def _installed(pipe, make, size: int, z: torch.Tensor):
    """A fresh control installed with a run begun and its prompt encoded: yields (ctrl, run, control)."""
    if make is None:
        yield (None, None, None)
        return
    control = make()
    ctrl = attnedit.Controller(pipe, [control]).install()
    try:
        run = ctrl.begin_run([PROMPT], num_steps=50, height=size, width=size, cfg=True)
        control.state.cond = encode_condition(run, z)
        yield (ctrl, run, control)
    finally:
        ctrl.remove()


def interleaved(jobs, repeats: int, device: torch.device, pipe, size: int, z: torch.Tensor) -> list[float]:
    """Median seconds per call of every job, timed round-robin (load spikes hit all rows alike):
    wall clock on a GPU, CPU time of the (single-threaded) process on a CPU."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: list[list[float]] = [[] for _ in jobs]
    for r in range(repeats + 1):
        for i, (_, fn, make) in enumerate(jobs):
            with _installed(pipe, make, size, z) as session:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = clock()
                fn(*session)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r:  # round 0 warms up
                    times[i].append(clock() - t0)
    return [statistics.median(t) for t in times]


PROMPT = "a red circle and a blue square"


def methods() -> dict[str, Callable[[], attnedit.Control]]:
    boxes = [[0.05, 0.2, 0.45, 0.8], [0.55, 0.2, 0.95, 0.8]]
    return {
        "A&E": lambda: attnedit.AttendExcite(words=["circle", "square"]),
        "A&E (no early exit)": lambda: attnedit.AttendExcite(words=["circle", "square"], early_exit=False),
        "A-STAR": lambda: attnedit.AStar(words=["circle", "square"]),
        "Bounded": lambda: attnedit.BoundedAttention(boxes=boxes, words=["circle", "square"], refine=False),
        "Bounded (no early exit)": lambda: attnedit.BoundedAttention(boxes=boxes, words=["circle", "square"],
                                                                     refine=False, early_exit=False),
    }


def bench_arch(arch: str, size: int, scale: float, repeats: int, device: torch.device, dtype: torch.dtype):
    pipe = build(arch, scale).to(device, dtype)
    f = pipe.vae_scale_factor
    pipe.scheduler.set_timesteps(50)
    t = pipe.scheduler.timesteps[0]
    z = torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    params = {p.untyped_storage().data_ptr() for p in pipe.unet.parameters()}
    gpu = device.type == "cuda"
    rows = []

    jobs: list[tuple[str, Callable[[], object], object]] = []

    def measure(label: str, fn: Callable[..., object], control=None) -> None:
        with _installed(pipe, control, size, z) as session:
            rows.append([label, 0.0, saved_for_backward(lambda: fn(*session), params),
                         cuda_peak(lambda: fn(*session)) if gpu else None])
        jobs.append((label, fn, control))

    # plain step: the stock pipeline's CFG forward (attnedit not installed)
    run = attnedit.Controller(pipe, []).begin_run([PROMPT], num_steps=50, height=size, width=size, cfg=True)
    cond = encode_condition(run, z)
    cfg = {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) else {kk: torch.cat([vv, vv]) for kk, vv in v.items()})
           for k, v in cond.items()}
    z2 = torch.cat([z, z])

    def plain(*_):
        with torch.no_grad():
            pipe.unet(pipe.scheduler.scale_model_input(z2, t), t, return_dict=False, **cfg)

    def guided(ctrl, run, control):
        control._loss_grad(run, z, 0, 0)

    def masked(ctrl, run, control):
        with torch.no_grad():
            pipe.unet(pipe.scheduler.scale_model_input(z2, t), t, return_dict=False, **cfg)

    measure("plain step (CFG forward)", plain)
    for name, make in methods().items():
        measure(f"{name}: guidance iteration", guided, make)
        if name == "Bounded":
            measure("Bounded: masked CFG step", masked, make)
    timings = interleaved(jobs, repeats, device, pipe, size, z)
    rows[:] = [[*r[:1], sec, *r[2:]] for r, sec in zip(rows, timings)]
    print(f"\n## {arch} layout, {size}x{size}, width scale {scale}, {device.type} {str(dtype).split('.')[-1]} "
          f"({torch.get_num_threads()} thread(s)), "
          f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f} M UNet parameters, "
          f"median of {repeats} interleaved rounds\n")
    base_t = rows[0][1]
    base_peak = rows[0][3]
    clock = "time" if gpu else "CPU time"
    print(f"| measurement | {clock} (ms) | x plain | kept for backward (MB) | peak extra CUDA memory (MB) | x plain |")
    print("|---|---|---|---|---|---|")
    for label, sec, kept, peak in rows:
        peak_s = f"{peak / 2**20:.1f} | {peak / max(base_peak, 1):.2f}" if peak is not None else "n/a (CPU) | n/a"
        print(f"| {label} | {sec * 1e3:.1f} | {sec / base_t:.2f} | {kept / 2**20:.2f} | {peak_s} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (square)")
    ap.add_argument("--width-scale", type=float, default=0.25, help="channel scale vs the real model (1.0 = real)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: no spin-waiting under shared load
    torch.set_grad_enabled(True)
    for arch in args.arch:
        bench_arch(arch, args.size, args.width_scale, args.repeats, device, dtype)


if __name__ == "__main__":
    main()
