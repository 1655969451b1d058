"""attnedit's Attend-and-Excite against diffusers' own `StableDiffusionAttendAndExcitePipeline`, side by side.

    python benchmarks/ae_parity.py                      # shapes-sd, 10 steps, 3 seeds
    python benchmarks/ae_parity.py --steps 50 --seeds 0 1

Both run on the same model, scheduler (the model's DDIM), prompt, seed and initial latents, with
aligned settings: the same cross-attention layers (every layer at the map grid: diffusers'
`attn_res`, attnedit's map level), the diffusers `1:-1` token slice (`token_mode="ae"`), the x100
softmax and the A&E Gaussian, the step sizes 20 * sqrt(linspace(1, 0.5, T)), the first half of the
steps guided, and no iterative refinement (the two refinement loops differ on purpose: the official
one repeats its first forward and updates once past the threshold; see attnedit/methods/attend_excite.py).
attnedit runs through `attnedit.apply` on the stock pipeline. Printed: the largest absolute
difference of the final latents, their scale, and the plain run's distance (what the guidance moved).
What remains is the attention arithmetic: diffusers' A&E processor computes every attention with
`bmm` + softmax, attnedit with SDPA.
"""

from __future__ import annotations

import argparse

import torch

import attnedit

PROMPT = "a red circle and a blue square"
WORDS = ("circle", "square")


def compare(model: str = "shapes-sd", steps: int = 10, seed: int = 0, guidance: float = 5.0) -> dict[str, float]:
    """Final latents of diffusers' A&E and attnedit's on one seed; returns the distances."""
    from quality_multisubject import diffusers_ae_pipeline

    edit_pipe = attnedit.load(model)
    pipe = edit_pipe.pipe
    ae_pipe = diffusers_ae_pipeline(pipe)
    height, width = edit_pipe.default_size()
    latents = edit_pipe.initial_latents(1, height, width, [torch.Generator().manual_seed(seed)])
    guided = steps // 2
    call = dict(num_inference_steps=steps, guidance_scale=guidance, height=height, width=width, output_type="latent")

    ae = attnedit.AttendExcite(words=list(WORDS), token_mode="ae", thresholds={}, steps=(0, guided))
    ctrl = attnedit.apply(pipe, ae)
    try:
        ours = pipe(PROMPT, latents=latents.clone(), **call).images
        tokens = ctrl.run.tokens[0]
    finally:
        attnedit.remove(pipe)
    indices = [tokens.find(w)[0] for w in WORDS]
    grid = ctrl.registry.layers[ae.state.layer_names[0]].grid((height // edit_pipe.vae_scale_factor,
                                                                width // edit_pipe.vae_scale_factor))
    saved = pipe.unet.attn_processors  # diffusers' A&E leaves its processors on the shared UNet
    try:
        theirs = ae_pipe(PROMPT, token_indices=indices, latents=latents.clone(), max_iter_to_alter=guided,
                         thresholds={}, attn_res=grid, **call).images
    finally:
        pipe.unet.set_attn_processor(saved)
    plain = pipe(PROMPT, latents=latents.clone(), **call).images
    return {
        "max_abs_diff": float((ours - theirs).abs().max()),
        "latent_scale": float(theirs.abs().max()),
        "moved_by_guidance": float((theirs - plain).abs().max()),
        "guided_steps": guided,
        "layers": len(ae.state.layer_names),
        "grid": f"{grid[0]}x{grid[1]}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first half is guided)")
    print(f"# A&E parity: attnedit vs diffusers StableDiffusionAttendAndExcitePipeline ({args.model}, "
          f"{args.steps} steps, prompt {PROMPT!r}, words {', '.join(WORDS)})\n")
    print("| seed | max abs diff (final latents) | latent scale | moved by guidance | guided steps | layers (grid) |")
    print("|---|---|---|---|---|---|")
    for seed in args.seeds:
        r = compare(args.model, args.steps, seed)
        print(f"| {seed} | {r['max_abs_diff']:.2e} | {r['latent_scale']:.2f} | {r['moved_by_guidance']:.3f} | "
              f"{r['guided_steps']} | {r['layers']} ({r['grid']}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
