"""Train `shapes-dit`: a small FLUX-architecture model of the testbed world, by flow matching.

    python -m attnedit.testbed.train --vae-only --work /tmp/tb/vae          # the shared VAE
    python -m attnedit.testbed.train_dit --vae-init /tmp/tb/vae/vae.pt --out assets/models/shapes-dit

Why a second model: CLEAR and every DiT path (joint attention, RoPE, image tokens on a packed grid)
need a real trained transformer to show what they do. It is a stock diffusers `FluxPipeline`:
`FluxTransformer2DModel` (double- and single-stream blocks), a CLIP text encoder for the pooled
vector and a T5 encoder for the token sequence (both over the world's vocabulary), and the testbed
VAE of `shapes-sd` (64x64 RGB <-> 16x16x4, packed 2x2 into 8x8 = 64 image tokens).

Training: rectified flow (x_t = (1 - t) x0 + t noise, the transformer predicts noise - x0) with
logit-normal t, 10% empty captions so classifier-free guidance works, EMA weights. There is no
guidance embedding (nothing to distil it from), so guidance is true CFG with an empty negative
prompt: `attnedit.load("shapes-dit")` maps its `guidance` onto `true_cfg_scale`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .train import (
    PROBE_PROMPTS,
    Dataset,
    build_tokenizer,
    build_vae,
    check_denoiser_args,
    ema_update,
    encode_all,
    image_grid,
    jsonl_log,
    lr_at,
    tokenize,
    write_pipeline,
)
from .world import VOCABULARY

T5_LENGTH = 24


def build_t5_tokenizer(words: tuple[str, ...] = VOCABULARY, max_length: int = T5_LENGTH):
    """A Unigram T5 tokenizer in which every world word is one piece (`▁word`).

    Single printable characters stay in the vocabulary at lower scores, so any text tokenizes.
    """
    from transformers import T5Tokenizer

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -1.0, ",": -0.5}
    for w in words:
        pieces["▁" + w] = 0.0
    for c in (chr(c) for c in range(33, 127)):
        pieces.setdefault(c, -2.0)
        pieces.setdefault("▁" + c, -1.5)
    return T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=max_length)


def build_dit_models(clip_vocab: int, t5_vocab: int, seed: int = 0):
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .train import MAX_LENGTH

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=16, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
    ))
    # 2 heads of 64 rather than 4 of 32 (same width and cost): RoPE gets 28 dims per image axis, i.e. 14
    # frequencies of which 5 turn by > 0.5 rad across the 8 token positions (12 dims: 2; the text axis' 8 dims
    # never turn, all ids there are 0). Shapes are edges between tokens, so relative position matters.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=False,
        axes_dims_rope=(8, 28, 28),
    )
    adaln_zero_(transformer)
    return clip, t5, transformer


def adaln_zero_(transformer: torch.nn.Module) -> torch.nn.Module:
    """Zero every adaptive-norm modulation and the output projection (DiT's "adaLN-Zero").

    Why: diffusers initialises FLUX for loading weights, so from scratch each block starts as a random
    residual perturbation. With zero shift/scale/gate every block starts as the identity and the model
    as a zero velocity; Peebles & Xie (DiT, 2023) found this init converges markedly faster.
    """
    for name, module in transformer.named_modules():
        is_modulation = name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear"))
        if isinstance(module, torch.nn.Linear) and (is_modulation or name == "proj_out"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return transformer


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def make_pipeline(vae, clip, tok, t5, t5_tok, transformer, shift: float, scale: float):
    from diffusers import FluxPipeline

    vae = copy.deepcopy(vae)
    vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    pipe = FluxPipeline(scheduler=flow_scheduler(), vae=vae, text_encoder=copy.deepcopy(clip), tokenizer=tok,
                        text_encoder_2=copy.deepcopy(t5), tokenizer_2=t5_tok, transformer=copy.deepcopy(transformer))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 4.0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, negative_prompt=[""] * len(prompts), true_cfg_scale=guidance, num_inference_steps=steps,
               height=64, width=64, generator=gens, max_sequence_length=T5_LENGTH, output_type="np")
    return image_grid((out.images * 255).round().astype("uint8"))


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from .options import train_dit_parser

    return train_dit_parser(add_help)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from diffusers import FluxPipeline
    from PIL import Image
    from tqdm import tqdm

    check_denoiser_args(args)
    if not Path(args.vae_init).is_file():
        raise SystemExit(f"--vae-init {args.vae_init}: no such file (write one with `train --vae-only`)")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = jsonl_log(work / "log.jsonl", t0)

    tok, t5_tok = build_tokenizer(), build_t5_tokenizer()
    data = Dataset(args.seed, args.data)
    vae = build_vae()
    vae.load_state_dict(torch.load(args.vae_init, weights_only=False)["vae"])
    vae.eval().requires_grad_(False)
    clip, t5, transformer = build_dit_models(len(tok), len(t5_tok), args.seed)
    latents = encode_all(vae, data)
    shift, scale = float(latents.mean()), float(1.0 / latents.std())
    ema_models = [copy.deepcopy(m) for m in (clip, t5, transformer)]
    params = [p for m in (clip, t5, transformer) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt, start = work / "checkpoint.pt", 0
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        for m, key in zip((clip, t5, transformer, *ema_models), ("clip", "t5", "dit", "ema_clip", "ema_t5", "ema_dit")):
            m.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start = state["step"]
        print(f"resumed at step {start}")
    h = w = latents.shape[-1]
    img_ids = FluxPipeline._prepare_latent_image_ids(args.batch, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(T5_LENGTH, 3)
    for m in (clip, t5, transformer):
        m.train()
    loss_ema = None
    bar = tqdm(range(start, args.steps), desc="dit", mininterval=5, initial=start, total=args.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 200)
        idx, caps = data.sample(args.batch, args.cfg_drop, gen)
        x0 = (latents[idx] - shift) * scale
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal, as SD3 trains
        tt = t.view(-1, 1, 1, 1)
        xt = FluxPipeline._pack_latents((1 - tt) * x0 + tt * noise, args.batch, 4, h, w)
        target = FluxPipeline._pack_latents(noise - x0, args.batch, 4, h, w)
        pooled = clip(tokenize(tok, caps)).pooler_output
        seq = t5(t5_tok(caps, padding="max_length", max_length=T5_LENGTH, truncation=True,
                        return_tensors="pt").input_ids)[0]
        pred = transformer(hidden_states=xt, timestep=t, guidance=None, pooled_projections=pooled,
                           encoder_hidden_states=seq, txt_ids=txt_ids, img_ids=img_ids).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_models, (clip, t5, transformer), min(args.ema, (1 + step) / (10 + step)))
        loss_ema = loss.item() if loss_ema is None else 0.99 * loss_ema + 0.01 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            log({"stage": "dit", "step": step + 1, "loss": loss_ema})
            pipe = make_pipeline(vae, ema_models[0], tok, ema_models[1], t5_tok, ema_models[2], shift, scale)
            grid = sample_grid(pipe, list(PROBE_PROMPTS), seed=step)
            Image.fromarray(grid).save(work / f"samples_{step + 1:06d}.png")
            state = {"clip": clip.state_dict(), "t5": t5.state_dict(), "dit": transformer.state_dict(),
                     "ema_clip": ema_models[0].state_dict(), "ema_t5": ema_models[1].state_dict(),
                     "ema_dit": ema_models[2].state_dict(), "opt": opt.state_dict(), "step": step + 1,
                     "gen": gen.get_state()}
            torch.save(state, work / "checkpoint.tmp")
            os.replace(work / "checkpoint.tmp", ckpt)
    pipe = make_pipeline(vae, ema_models[0], tok, ema_models[1], t5_tok, ema_models[2], shift, scale)
    out = Path(args.out)
    meta = {"steps": 20, "guidance": 4.0, "height": 64, "width": 64, "call": {"max_sequence_length": T5_LENGTH},
            "trained": {"seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                        "final_loss": loss_ema, "shift_factor": shift, "scaling_factor": scale,
                        "wall_s": round(time.time() - t0, 1)}}
    write_pipeline(pipe, out, meta)
    log({"stage": "saved", "out": str(out), **meta["trained"]})
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
