"""Cost of attnedit's processor with no control active, measured side by side in one run.

    python benchmarks/overhead.py --family sd --size 256 --steps 10 --repeats 3

Builds a random-weight denoiser of a real architecture's layer layout (SD1.5-like by default,
scaled down with --width-scale so it runs on a CPU) and times the same denoising loop with the
stock processors and with attnedit installed (no control, and an AttentionStore capturing every
cross-attention map). Prints per-step times and ratios; ratios, not absolute times, are the claim.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import attnedit
from attnedit.tiny import clip_tokenizer


def build_sd(width_scale: float):
    import diffusers as d
    from transformers import CLIPTextConfig, CLIPTextModel

    ch = tuple(max(32, int(c * width_scale)) // 32 * 32 for c in (320, 640, 1280, 1280))
    unet = d.UNet2DConditionModel(block_out_channels=ch, cross_attention_dim=768, attention_head_dim=8,
                                  layers_per_block=2, sample_size=64)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=1024, num_hidden_layers=2,
                                        num_attention_heads=8, vocab_size=1000, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    vae = d.AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8)
    sched = d.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                            set_alpha_to_one=False, steps_offset=1)
    pipe = d.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                                     scheduler=sched, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    for m in (unet, text, vae):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_loop(pipe, size: int, steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    pipe("a red cube and a blue ball", height=size, width=size, num_inference_steps=steps,
         generator=gen, output_type="latent")
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width-scale", type=float, default=0.25, help="channel scale vs SD1.5 (1.0 = real size)")
    args = ap.parse_args()
    torch.manual_seed(0)
    pipe = build_sd(args.width_scale)
    time_loop(pipe, args.size, 1)  # warm-up
    arms = {"stock": [], "attnedit (no control)": [], "attnedit + AttentionStore": []}
    for _ in range(args.repeats):  # interleave arms so drift hits all of them alike
        arms["stock"].append(time_loop(pipe, args.size, args.steps))
        with attnedit.controlled(pipe):
            arms["attnedit (no control)"].append(time_loop(pipe, args.size, args.steps))
        with attnedit.controlled(pipe, attnedit.AttentionStore()):
            arms["attnedit + AttentionStore"].append(time_loop(pipe, args.size, args.steps))
    base = statistics.median(arms["stock"])
    print(f"SD1.5 layout, channels x{args.width_scale}, {args.size}x{args.size}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'arm':<28}{'s/step':>10}{'ratio':>8}")
    for name, values in arms.items():
        med = statistics.median(values)
        print(f"{name:<28}{med:>10.4f}{med / base:>8.3f}")


if __name__ == "__main__":
    main()
