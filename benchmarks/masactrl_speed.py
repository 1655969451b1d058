"""MasaCtrl step time vs the same batch without control, side by side in one run.

MasaCtrl only gathers the target rows' keys/values from their source rows (`qkv` hook), so a
denoising step should cost the same as without control. This script times denoiser forwards of
a `[u_src, u_tgt..., c_src, c_tgt...]` batch through attnedit's processor, alternating
"no control" and "MasaCtrl active" runs (so machine load hits both alike), and prints the medians
and their ratio.

    python benchmarks/masactrl_speed.py                       # small SD1.5-architecture UNet, CPU
    python benchmarks/masactrl_speed.py --preset sd15 --size 512 --device cuda --dtype fp16

Random weights (no download): the cost of attention control does not depend on weight values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

PRESETS = {
    # SD1.5 layout (3 cross-attention levels + plain lowest level), reduced width for CPUs
    "small": dict(block_out_channels=(64, 128, 256, 256), attention_head_dim=4, cross_attention_dim=64),
    # the real SD1.5 UNet configuration
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768),
}


def build_pipe(preset: str, device: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from attnedit.tiny import build_tiny

    tiny = build_tiny("sd")
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        layers_per_block=2, norm_num_groups=32, sample_size=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **cfg,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet, scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.unet.to(device, dtype)
    return pipe, cfg["cross_attention_dim"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--targets", type=int, default=1, help="targets per source")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 = least sensitive to other load)")
    args = ap.parse_args()
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]

    from attnedit.controller import Controller
    from attnedit.layout import BatchLayout
    from attnedit.methods.masactrl import MasaCtrl

    pipe, ctx_dim = build_pipe(args.preset, args.device, dtype)
    n = 1 + args.targets
    layout = BatchLayout.standard(n, True, groups=[0] * n, roles=["source"] + ["target"] * args.targets)
    pipe.scheduler.set_timesteps(50)
    t = pipe.scheduler.timesteps[10]  # step 10: MasaCtrl (start step 4) is active
    lat = args.size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * n, 4, lat, lat, generator=gen).to(args.device, dtype)
    ehs = torch.randn(2 * n, 77, ctx_dim, generator=gen).to(args.device, dtype)
    prompts = ["a cat sitting"] + ["a cat running"] * args.targets

    # wall clock on CUDA; on the CPU this thread's CPU time: with one intra-op thread it is the compute
    # time of the forward, insensitive to other processes sharing the machine
    cpu_clock = args.device == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if cpu_clock else time.perf_counter

    def run(controls, warmup: bool = False) -> float:
        ctrl = Controller(pipe, controls).install()
        try:
            ctrl.begin_run(prompts, num_steps=50, height=args.size, width=args.size, cfg=True, layout=layout)
            with torch.no_grad():
                if warmup:
                    pipe.unet(x, t, encoder_hidden_states=ehs)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = clock()
                pipe.unet(x, t, encoder_hidden_states=ehs)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                return clock() - start
        finally:
            ctrl.remove()

    plain, masa = [], []
    control = MasaCtrl()
    run([], warmup=True)
    run([control], warmup=True)
    for _ in range(args.repeats):
        plain.append(run([]))
        masa.append(run([control]))
    mp, mm = statistics.median(plain), statistics.median(masa)
    bp, bm = min(plain), min(masa)
    print(f"device={args.device} threads={torch.get_num_threads()} dtype={args.dtype} preset={args.preset} "
          f"size={args.size} batch={2 * n} (1 source + {args.targets} target(s), CFG) repeats={args.repeats} "
          f"clock={'thread CPU time' if cpu_clock else 'wall'}")
    print(f"controlled layers: {len(control.selected_layers)} ({', '.join(sorted(control.selected_layers)[:2])}, ...)")
    print(f"{'':>8} {'no control':>14} {'MasaCtrl':>14} {'ratio':>8}")
    print(f"{'median':>8} {mp * 1000:>11.1f} ms {mm * 1000:>11.1f} ms {mm / mp:>8.3f}")
    print(f"{'best':>8} {bp * 1000:>11.1f} ms {bm * 1000:>11.1f} ms {bm / bp:>8.3f}")
    print("within 5%" if mm / mp <= 1.05 else "NOT within 5%")


if __name__ == "__main__":
    main()
