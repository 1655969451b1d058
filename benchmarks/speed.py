"""Speed of ToDo, Agent Attention and CLEAR against plain attention, side by side in one run.

Random-weight denoisers of the real architectures (SD1.5 and SDXL UNets, a FLUX DiT) at
configurable widths and depths give the true cost structure without downloads; every method row is
timed in the same process right after its plain baseline, so the ratios are comparable. Per row:
denoiser step time (one forward, CFG batch for UNets), time inside the attention calls (the
attnedit processor's attention part, resampling/matching included), and peak CUDA memory.

    python benchmarks/speed.py --device cpu --scale 0.25 --sizes 256 512 --flux-sizes 512 1024
    python benchmarks/speed.py --device cuda --dtype bf16 --scale 1 --sizes 512 1024 2048 --flux-sizes 1024 2048 4096

`fidelity_rows(...)` gives PSNR/SSIM of each method's final images against full attention on a
testbed model with the same seeds (the quality benchmark calls it; `--fidelity shapes-sd` runs it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from report import Report

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attnedit  # noqa: E402
from attnedit.controller import Controller  # noqa: E402
from attnedit.processor import AttnEditProcessor  # noqa: E402
from attnedit.selectors import Steps  # noqa: E402
from attnedit.tiny import build_tiny  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------ methods
def method_table(arch: str, cuda: bool = False) -> list[tuple[str, Callable[[], list]]]:
    """(label, factory of controls) rows for `arch`; CLEAR only on the DiT (plus FlexAttention rows on CUDA)."""
    rows: list[tuple[str, Callable[[], list]]] = [("plain", list)]
    for f in (2, 3, 4):
        rows.append((f"ToDo df={f}", lambda f=f: [attnedit.ToDo(factor=f)]))
    rows.append(("Agent (all steps)", lambda: [attnedit.AgentAttention(steps=Steps(0, None))]))
    if arch == "flux":
        for r in (8, 16, 32):
            rows.append((f"CLEAR r={r}", lambda r=r: [attnedit.CLEAR(radius=r)]))
        if cuda:
            for r in (8, 16, 32):
                rows.append((f"CLEAR r={r} flex", lambda r=r: [attnedit.CLEAR(radius=r, backend="flex")]))
    return rows


# ------------------------------------------------------------------------------------- models
def _scaled(chans: Sequence[int], scale: float, heads: Sequence[int] | int) -> tuple[int, ...]:
    """Scale channel counts and keep them divisible by the head count and 32 groups."""
    heads = [heads] * len(chans) if isinstance(heads, int) else list(heads)
    out = []
    for c, h in zip(chans, heads):
        step = math.lcm(32, h)
        out.append(max(step, round(c * scale / step) * step))
    return tuple(out)


def build_model(arch: str, scale: float, flux_layers: tuple[int, int], flux_heads: int, text_dim: int):
    """(pipeline whose denoiser is a random-weight model of `arch`, extra forward inputs builder)."""
    import diffusers as d

    torch.manual_seed(0)
    if arch == "sd15":
        pipe = build_tiny("sd")
        unet = d.UNet2DConditionModel(
            block_out_channels=_scaled((320, 640, 1280, 1280), scale, 8), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, sample_size=64,
        )
        pipe.register_modules(unet=unet)
    elif arch == "sdxl":
        pipe = build_tiny("sdxl")
        unet = d.UNet2DConditionModel(
            block_out_channels=_scaled((320, 640, 1280), scale, (5, 10, 20)), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            cross_attention_dim=2048, sample_size=128,
        )
        pipe.register_modules(unet=unet)
    elif arch == "flux":
        pipe = build_tiny("flux")
        tr = d.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=flux_layers[0], num_single_layers=flux_layers[1],
            attention_head_dim=128, num_attention_heads=flux_heads, joint_attention_dim=text_dim,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )
        pipe.register_modules(transformer=tr)
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose sd15, sdxl or flux")
    return pipe


def forward_inputs(arch: str, pipe, size: int, text_len: int, device, dtype) -> dict[str, Any]:
    den = pipe.unet if arch in ("sd15", "sdxl") else pipe.transformer
    if arch in ("sd15", "sdxl"):
        lat = size // 8
        kw: dict[str, Any] = dict(
            sample=torch.randn(2, 4, lat, lat), timestep=torch.tensor(999),
            encoder_hidden_states=torch.randn(2, 77, den.config.cross_attention_dim),
        )
        if arch == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}
    else:
        side = size // 16
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        kw = dict(
            hidden_states=torch.randn(1, side * side, 64), timestep=torch.tensor([1.0]),
            guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 768),
            encoder_hidden_states=torch.randn(1, text_len, den.config.joint_attention_dim),
            img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text_len, 3),
        )
    return _to(kw, device, dtype)


def _to(obj, device, dtype):
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype if obj.is_floating_point() and obj.dim() > 1 else obj.dtype)
    return obj


# ------------------------------------------------------------------------------------- timing
def _clock(device: torch.device) -> Callable[[], float]:
    """Wall clock on CUDA; this thread's CPU time on the CPU (with one intra-op thread it is the
    compute time of the forward, insensitive to other processes sharing the machine)."""
    return time.perf_counter if device.type == "cuda" else time.thread_time


class _AttentionTimer:
    """Adds up the time of every attention computation of the processor (synchronised on CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clock = _clock(device)
        self.total = 0.0
        self._orig = AttnEditProcessor._attend

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def active(self):
        timer = self
        orig = self._orig

        def timed(proc, *args, **kwargs):
            timer._sync()
            t0 = timer.clock()
            out = orig(proc, *args, **kwargs)
            timer._sync()
            timer.total += timer.clock() - t0
            return out

        AttnEditProcessor._attend = timed
        try:
            yield self
        finally:
            AttnEditProcessor._attend = orig


def measure(pipe, arch: str, controls: list, inputs: dict, size: int, device: torch.device) -> dict[str, float]:
    """Step time, attention time and peak CUDA memory of one denoiser forward with `controls`."""
    den = pipe.unet if arch in ("sd15", "sdxl") else pipe.transformer
    ctrl = Controller(pipe, controls, denoiser=den).install()
    timer = _AttentionTimer(device)
    clock = timer.clock
    peak = float("nan")
    try:
        ctrl.begin_run(None, num_steps=50, height=size, width=size)
        with torch.inference_mode(), timer.active():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = clock()
            den(**inputs, return_dict=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) / 2**20
            step = clock() - t0
    finally:
        ctrl.remove()
    return {"step": step, "attn": timer.total, "peak_mib": peak}


def run_speed(
    archs: Sequence[str],
    sizes: Sequence[int],
    flux_sizes: Sequence[int],
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    scale: float = 0.25,
    flux_layers: tuple[int, int] = (2, 4),
    flux_heads: int = 4,
    text_len: int = 128,
    text_dim: int = 512,
    repeats: int = 2,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Rows of (arch, size, method, step, attn, peak, ratios). Methods are interleaved in rounds
    (round 0 warms up) and the minimum over rounds is kept, so a burst of load hits every method alike."""
    dev = torch.device(device)
    dt = DTYPES[dtype]
    rows = []
    for arch in archs:
        pipe = build_model(arch, scale, flux_layers, flux_heads, text_dim)
        den = pipe.unet if arch in ("sd15", "sdxl") else pipe.transformer
        den.to(dev, dt).eval()
        for size in flux_sizes if arch == "flux" else sizes:
            inputs = forward_inputs(arch, pipe, size, text_len, dev, dt)
            table = method_table(arch, cuda=dev.type == "cuda")
            best: dict[str, dict[str, Any]] = {}
            for rnd in range(repeats + 1):
                for label, make in table:
                    if best.get(label, {}).get("error"):
                        continue
                    try:
                        res = measure(pipe, arch, make(), inputs, size, dev)
                    except Exception as err:  # a method that cannot run at this size is reported, not fatal
                        best[label] = {"step": float("nan"), "attn": float("nan"), "peak_mib": float("nan"),
                                       "error": f"{type(err).__name__}: {err}"[:120]}
                        continue
                    if rnd == 0:
                        continue
                    old = best.get(label)
                    if old is None:
                        best[label] = res
                    else:
                        best[label] = {"step": min(old["step"], res["step"]), "attn": min(old["attn"], res["attn"]),
                                       "peak_mib": res["peak_mib"]}
            base = best["plain"]
            for label, _ in table:
                res = best[label]
                row = {"arch": arch, "size": size, "method": label, **res,
                       "step_x": base["step"] / res["step"], "attn_x": base["attn"] / res["attn"]}
                rows.append(row)
                log(_fmt_row(row))
        del pipe, den
    return rows


def _fmt_row(r: dict[str, Any]) -> str:
    peak = "n/a" if math.isnan(r["peak_mib"]) else f"{r['peak_mib']:.0f}"
    err = f" ({r['error']})" if r.get("error") else ""
    return (f"| {r['arch']} | {r['size']} | {r['method']} | {r['step'] * 1e3:.1f} | {r['step_x']:.2f}x | "
            f"{r['attn'] * 1e3:.1f} | {r['attn_x']:.2f}x | {peak} |{err}")


TABLE_HEAD = ("| model | px | method | step ms | step speedup | attention ms | attention speedup | peak MiB |\n"
              "|---|---|---|---|---|---|---|---|")


# ------------------------------------------------------------------------------------ fidelity
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (inf when identical)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM of two (C, H, W) images in [0, 1], Gaussian window, per channel then averaged."""
    import torch.nn.functional as F

    window = min(window, a.shape[-1], a.shape[-2])
    coords = torch.arange(window, dtype=torch.float32) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    c = a.shape[0]
    kernel = g.expand(c, 1, window, window)
    x, y = a.float()[None], b.float()[None]

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def _tensor(img) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype="float32") / 255.0).permute(2, 0, 1)


def _fast_prompts() -> list[str]:
    """The testbed's prompt set for fast-attention fidelity (assets/testbed/prompts/fast.json)."""
    import json

    path = ROOT / "assets" / "testbed" / "prompts" / "fast.json"
    if path.is_file():
        return list(json.loads(path.read_text())["prompts"])
    return ["a red circle and a blue square", "a green triangle above a yellow circle", "two magenta squares"]


def fidelity_rows(
    model: str = "shapes-sd",
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3),
    *,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    methods: Sequence[tuple[str, Callable[[], list]]] | None = None,
    edit_pipe=None,
) -> list[dict[str, Any]]:
    """PSNR/SSIM of each method's final images against full attention (same prompts and seeds).

    Default prompts: the testbed's `fast.json` set. On UNets the rows are ToDo 2/3/4 and Agent
    (all steps, and the published schedule); on DiTs CLEAR r 8/16/32 are added (untrained window).

    Returns one row per method: {"method", "psnr", "ssim", "n"} (mean over prompts x seeds; PSNR
    over pairs that differ; identical pairs count as inf and are reported in "identical").
    """
    ep = edit_pipe if edit_pipe is not None else attnedit.load(model)
    prompts = list(prompts) if prompts is not None else _fast_prompts()
    if methods is None:  # CLEAR rows on any DiT (they are the "flux" rows of the speed table)
        methods = [m for m in method_table("flux" if ep.family.has("dit") else "sd15") if m[0] != "plain"]
        # the published schedule too (agents in the first 40 % of the steps, plain after)
        methods.append(("Agent (default schedule)", lambda: [attnedit.AgentAttention()]))
    kw = dict(steps=steps, guidance=guidance, height=height, width=width)
    base = {}
    for p in prompts:
        for s in seeds:
            base[(p, s)] = _tensor(ep.generate(p, seed=s, **kw).image)
    rows = []
    for label, make in methods:
        ps, ss, same = [], [], 0
        for p in prompts:
            for s in seeds:
                img = _tensor(ep.generate(p, seed=s, controls=make(), **kw).image)
                v = psnr(img, base[(p, s)])
                if math.isinf(v):
                    same += 1
                else:
                    ps.append(v)
                ss.append(ssim(img, base[(p, s)]))
        rows.append({"method": label, "psnr": statistics.mean(ps) if ps else float("inf"),
                     "ssim": statistics.mean(ss), "n": len(ss), "identical": same})
    return rows


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["sd15", "sdxl", "flux"], choices=["sd15", "sdxl", "flux"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048], help="UNet image sizes (px)")
    ap.add_argument("--flux-sizes", nargs="+", type=int, default=[1024, 2048], help="FLUX image sizes (px)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--scale", type=float, default=1.0, help="channel width multiplier of the UNets (1 = real)")
    ap.add_argument("--flux-layers", nargs=2, type=int, default=[19, 38], metavar=("DOUBLE", "SINGLE"))
    ap.add_argument("--flux-heads", type=int, default=24, help="FLUX heads of dim 128 (24 = real)")
    ap.add_argument("--text-len", type=int, default=512, help="FLUX text tokens")
    ap.add_argument("--text-dim", type=int, default=4096, help="FLUX text embedding width")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round (min is kept)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    ap.add_argument("--fidelity", default=None, metavar="MODEL", help="also PSNR/SSIM rows on this testbed model")
    ap.add_argument("--fidelity-seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--fidelity-steps", type=int, default=None, help="denoising steps (model default if omitted)")
    ap.add_argument("--skip-speed", action="store_true", help="only the fidelity rows")
    ap.add_argument("--out", default=None, help="markdown file for the results")
    args = ap.parse_args(argv)
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    log = Report("speed.py", argv)
    cmd = log.command
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    log(f"# attnedit speed: plain vs ToDo / Agent / CLEAR ({_dt.date.today().isoformat()})\n")
    log(f"- command: `{cmd}`")
    log(f"- device: {device_name}, dtype {dtype}, torch {torch.__version__}, "
        f"attention backend {attnedit.kernels.current()}")
    if not args.skip_speed:
        log(f"- UNet channel scale {args.scale}; FLUX {args.flux_layers[0]}+{args.flux_layers[1]} blocks, "
            f"{args.flux_heads}x128 heads, {args.text_len} text tokens; methods interleaved, "
            f"minimum of {args.repeats} rounds after a warm-up round")
        clock = "wall-clock time" if args.device.startswith("cuda") else (
            f"CPU time of the main thread ({args.threads} intra-op thread(s)), robust to other load on the machine")
        log("- step = one denoiser forward (CFG batch 2 for UNets, batch 1 for FLUX); attention = time inside the "
            "attention computations (resampling, matching and masks included); speedup = plain / method; "
            f"times are {clock}\n")
        log(TABLE_HEAD)
        run_speed(args.archs, args.sizes, args.flux_sizes, device=args.device, dtype=dtype, scale=args.scale,
                  flux_layers=tuple(args.flux_layers), flux_heads=args.flux_heads, text_len=args.text_len,
                  text_dim=args.text_dim, repeats=args.repeats, log=log)
    if args.fidelity:
        log(f"\n## Fidelity against full attention on `{args.fidelity}` (same prompts, seeds "
            f"{args.fidelity_seeds}, final images)\n")
        log("| method | PSNR dB | SSIM | images | identical |\n|---|---|---|---|---|")
        for r in fidelity_rows(args.fidelity, seeds=args.fidelity_seeds, steps=args.fidelity_steps):
            log(f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['n']} | {r['identical']} |")
    log.save(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
