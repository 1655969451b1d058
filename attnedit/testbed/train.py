"""Train `shapes-sd`: a small Stable-Diffusion-architecture model of the testbed world.

    python -m attnedit.testbed.train --out assets/models/shapes-sd --work /tmp/testbed-work

Everything is a real diffusers component (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel, DDIM) so every attnedit path runs on it unchanged. Two stages: the VAE
(64x64 RGB <-> 16x16x4), then the UNet and the text encoder together with classifier-free
guidance dropout. Seeded; periodic sample grids and checkpoints in the work folder; `--resume`
continues from the latest checkpoint. The result is saved in fp16 with `save_pretrained`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import VOCABULARY, World

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
MAX_LENGTH = 24
#: prompts of the periodic sample grids (both recipes): every shape, colour and caption style
PROBE_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow star", "a magenta ring",
                 "a cyan circle", "a red star and a blue ring", "a green square left of a yellow triangle",
                 "two red circles", "a blue triangle above a magenta square", "three cyan stars",
                 "a red square, a green circle and a blue star")


# ------------------------------------------------------------------------------------------ models
def build_tokenizer(words: tuple[str, ...] = VOCABULARY, max_length: int = MAX_LENGTH):
    """A CLIP BPE tokenizer whose vocabulary words are single tokens (`word</w>`).

    The 256 byte-level characters (and their `</w>` forms) stay in the vocabulary, so any other
    text still tokenizes (character by character) without `<unk>`; merges build each world word.
    """
    from transformers import CLIPTokenizer

    from ..tiny import byte_level_chars

    chars = byte_level_chars()
    vocab: dict[str, int] = {s: i for i, s in enumerate(SPECIAL)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    # BPE applies merges by global rank, so merges of one word can break another ("red" makes
    # "re", which splits "three"). Add, for each word, the merges its current pieces need, at the
    # lowest rank, and repeat until every word is one token.
    for _ in range(10):
        tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=SPECIAL[1])
        broken = [w for w in sorted(set(words) | {","}) if tok.tokenize(w) != [w + "</w>"]]
        if not broken:
            return tok
        for word in broken:
            pieces = tok.tokenize(word)
            while len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                if pair not in merges:
                    merges.append(pair)
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
                vocab.setdefault(pieces[0], len(vocab))
    raise RuntimeError(f"could not make single tokens of {broken}")


def build_vae():
    """64x64 RGB <-> 16x16x4; no attention in the mid block (faster, and no blob artefacts)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=16, sample_size=64, mid_block_add_attention=False,
    )


def build_models(vocab_size: int, seed: int = 0, text_layers: int = 0):
    """VAE, CLIP text encoder and UNet of shapes-sd.

    `text_layers` 0 keeps every token's state its own word (embedding + position, no mixing): a text
    encoder trained jointly from scratch otherwise learns to route an object's description into
    later "summary" tokens ("and", the end token), and per-word cross-attention maps, which A&E,
    A-STAR and AttenCraft read, stop marking the word's object.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = build_vae()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=64,
    ))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
    )
    return vae, text, unet


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


# -------------------------------------------------------------------------------------------- data
class Dataset:
    """Pre-rendered world images (uint8) and captions: deterministic, cheap to batch."""

    def __init__(self, seed: int, n: int) -> None:
        world = World(seed=seed)
        images, scenes = world.batch(0, n)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (n, 3, 64, 64)
        self.scenes = scenes
        self.captions = [s.caption for s in scenes]

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, batch: int, cfg_drop: float, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """Random indices and their captions, a `cfg_drop` share emptied for classifier-free guidance."""
        idx = torch.randint(len(self), (batch,), generator=gen)
        drop = torch.rand(batch, generator=gen) < cfg_drop
        return idx, ["" if d else self.captions[i] for i, d in zip(idx.tolist(), drop.tolist())]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        x = self.images[idx].float() / 127.5 - 1.0
        return x, [self.captions[i] for i in idx.tolist()]


def tokenize(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def drop_summary(states: torch.Tensor, ids: torch.Tensor, empty: torch.Tensor, eos_id: int, p: float,
                 gen: torch.Generator) -> torch.Tensor:
    """With probability `p` per caption, give its end token and padding the empty caption's states.

    A causal encoder's end token has read the whole caption, so a UNet can take every object from that one
    token and ignore the words' own states; then moving a noun's attention (A&E, A-STAR) moves nothing.
    Dropping the summary makes the words the reliable carrier. Draws nothing when `p` is 0 (old recipes
    stay reproducible).
    """
    if p <= 0:
        return states
    pick = torch.rand(ids.shape[0], generator=gen) < p
    is_eos = ids == eos_id
    first = is_eos.int().argmax(1)  # the end token; the padding after it repeats its id
    after = torch.arange(ids.shape[1])[None] >= first[:, None]
    swap = (pick & is_eos.any(1))[:, None] & after
    return torch.where(swap[..., None], empty.expand_as(states), states)


# --------------------------------------------------------------------------------------- training
def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_vae(vae, data: Dataset, steps: int, batch: int, lr: float, gen: torch.Generator, log,
              crop: int = 64, latent_noise: float = 0.1, decoder_only: bool = False) -> float:
    """Reconstruction (L1 + MSE) of the posterior mean; `crop` < 64 trains on random crops (the
    networks are convolutional, so they apply to full images unchanged) at a fraction of the cost.

    The decoder sees the mean plus Gaussian noise of `latent_noise` times the latents' spread: a
    denoiser never lands exactly on an encoder output, and a decoder trained only on exact means
    turns its small errors into coloured speckle. `decoder_only` keeps the encoder (so the latent
    space, and any denoiser trained on it, stays valid) and sharpens the decoder alone.
    """
    vae.train()
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()] if decoder_only else vae.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_ema = None
    from tqdm import tqdm

    bar = tqdm(range(steps), desc="vae", mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 50)
        x, _ = data.batch(torch.randint(len(data), (batch,), generator=gen))
        if crop < x.shape[-1]:
            oy, ox = (int(v) for v in torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen) // 4 * 4)
            x = x[..., oy:oy + crop, ox:ox + crop]
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
        # Deterministic autoencoding of the posterior mean: sampling with the initial unit variance
        # drowns the small latents in noise and slows training many times over. The log-variance is
        # pushed far down instead, so `latent_dist.sample()` (used by some pipelines) stays the mean.
        z = post.mean
        if latent_noise > 0:
            z = z + latent_noise * z.detach().std() * torch.randn(z.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        if not decoder_only:
            loss = loss + 1e-2 * (post.logvar + 12.0).clamp(min=0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if step % 200 == 0 or step == steps - 1:
            log({"stage": "vae", "step": step, "loss": loss_ema})
    vae.eval()
    return float("nan") if loss_ema is None else float(loss_ema)


@torch.no_grad()
def vae_agreement(vae, seed: int = 777, n: int = 64) -> float:
    """Share of held-out world images whose VAE reconstruction the detector reads exactly right."""
    from .detector import detect, match

    images, scenes = World(seed=seed).batch(0, n)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return sum(match(s.objects, detect(r)) for s, r in zip(scenes, rec)) / n


@torch.no_grad()
def encode_all(vae, data: Dataset, chunk: int = 64) -> torch.Tensor:
    """Posterior means of every training image (the VAE is frozen after its stage)."""
    out = []
    for i in range(0, len(data), chunk):
        x, _ = data.batch(torch.arange(i, min(i + chunk, len(data))))
        out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out)


@torch.no_grad()
def whiten_vae(vae, latents: torch.Tensor) -> torch.Tensor:
    """Make the VAE's latents zero-mean, unit-variance per channel, exactly; return `latents` so mapped.

    Why: Stable Diffusion pipelines know one global `scaling_factor` and no shift, and an encoder
    trained from scratch gives channels of very different offset and spread (measured: means 0.5 to
    6.6, stds 0.7 to 4.9). One global scale then leaves a low-spread channel, which may carry the
    colour, under the noise early in the forward process and a large offset for the denoiser to
    learn. The affine map is folded into `quant_conv` (encoder side) and `post_quant_conv` (decoder
    side), so decode(encode(x)) is unchanged and the pipeline's own code needs no shift.
    """
    mean, std = latents.mean((0, 2, 3)).double(), latents.std((0, 2, 3)).double()
    c = len(mean)
    q, p = vae.quant_conv, vae.post_quant_conv
    if q is None or p is None or q.kernel_size != (1, 1) or p.kernel_size != (1, 1):
        raise ValueError("whitening needs the VAE's 1x1 quant_conv and post_quant_conv")
    wq, bq = q.weight.double(), q.bias.double()
    wq[:c] /= std.view(-1, 1, 1, 1)
    bq[:c] = (bq[:c] - mean) / std
    bq[c:] -= 2 * std.log()  # log-variance of the scaled posterior
    wp, bp = p.weight.double(), p.bias.double()
    bp = bp + wp[:, :, 0, 0] @ mean  # post(std * z' + mean) == post'(z')
    wp = wp * std.view(1, -1, 1, 1)
    for conv, w, b in ((q, wq, bq), (p, wp, bp)):
        conv.weight.copy_(w.to(conv.weight.dtype))
        conv.bias.copy_(b.to(conv.bias.dtype))
    return ((latents.double() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).to(latents.dtype)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights min(SNR, gamma) / SNR of the epsilon loss (Hang et al., 2023, Min-SNR).

    Why: with uniform weights the many low-noise steps, whose targets are nearly free, dominate the
    gradient; capping their weight converges several times faster, which counts on a 2-core CPU.
    `gamma` 0 gives uniform weights.
    """
    if gamma <= 0:
        return torch.ones(len(t))
    a = alphas_cumprod[t].double()
    snr = a / (1 - a)
    return (snr.clamp(max=gamma) / snr).float()


@torch.no_grad()
def sample_grid(vae, text, unet, tok, scale: float, prompts: list[str], seed: int, steps: int = 20,
                guidance: float = 5.0) -> np.ndarray:
    """Images for `prompts` with DDIM + CFG, as one uint8 grid (for progress pictures)."""
    sched = ddim_scheduler()
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    n = len(prompts)
    lat = torch.randn((n, 4, 16, 16), generator=gen)
    cond = text(tokenize(tok, prompts))[0]
    unc = text(tokenize(tok, [""] * n))[0]
    for t in sched.timesteps:
        eps = unet(torch.cat([lat, lat]), t, encoder_hidden_states=torch.cat([unc, cond])).sample
        e_u, e_c = eps.chunk(2)
        lat = sched.step(e_u + guidance * (e_c - e_u), t, lat).prev_sample
    img = ((vae.decode(lat / scale).sample.clamp(-1, 1) + 1) * 127.5).round().byte()
    return image_grid(img.permute(0, 2, 3, 1).numpy())


def image_grid(images: np.ndarray, cols: int = 4) -> np.ndarray:
    """(n, h, w, 3) uint8 images as one grid, `cols` wide, white where the last row is short."""
    n, h, w, _ = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i in range(n):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = images[i]
    return grid


@torch.no_grad()
def ema_update(ema_models, models, decay: float) -> None:
    for ema, model in zip(ema_models, models):
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)


def save_pipeline(out: Path, vae, text, unet, tok, scale: float, meta: dict) -> None:
    from diffusers import StableDiffusionPipeline

    vae = copy.deepcopy(vae)
    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=copy.deepcopy(text), tokenizer=tok, unet=copy.deepcopy(unet),
        scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    write_pipeline(pipe, out, meta)


def write_pipeline(pipe, out: Path, meta: dict) -> None:
    """Save `pipe` as float16 safetensors whose configs ask for float32, plus its `attnedit.json`.

    Plain diffusers `from_pretrained` then loads every component in float32 (transformers loads a
    checkpoint in the dtype its config names); settings other tools keep in attnedit.json (an
    "attencraft" block) survive a retraining.
    """
    pipe.to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    for config in out.glob("*/config.json"):
        data = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if data.get(key) == "float16":
                data[key] = "float32"
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    settings = out / "attnedit.json"
    kept = json.loads(settings.read_text()) if settings.is_file() else {}
    settings.write_text(json.dumps({**kept, **meta}, indent=2) + "\n")


def read_vae_init(path: str | os.PathLike) -> dict:
    """A VAE checkpoint of this script (`--vae-only`), or a pipeline folder whose `vae` to start from."""
    if Path(path).is_dir():
        from diffusers import AutoencoderKL

        settings = Path(path, "attnedit.json")
        trained = (json.loads(settings.read_text()).get("trained") or {}) if settings.is_file() else {}
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32).state_dict()
        return {"vae": vae, **({"vae_loss": trained["vae_loss"]} if trained.get("vae_loss") is not None else {})}
    return torch.load(path, weights_only=False)


def install_vae(folder: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
    """Put the VAE weights of `checkpoint` into the pipeline `folder`, keeping its VAE config.

    Why: the denoiser stages read only the encoder, which `--vae-decoder-only` leaves unchanged, so
    a sharpened decoder trained in parallel drops into finished models (scaling/shift stay valid).
    """
    from diffusers import AutoencoderKL

    target = Path(folder) / "vae"
    vae = AutoencoderKL.from_pretrained(target, dtype=torch.float32, local_files_only=True)
    state = read_vae_init(checkpoint)["vae"]
    enc = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    # the folder holds fp16 weights: compare at that precision
    changed = [k for k, v in enc.items() if not torch.equal(v, state[k].half().float())]
    if changed:
        raise ValueError(f"{checkpoint} has another encoder than {target} ({changed[0]}...): retrain the denoiser")
    vae.load_state_dict(state)
    vae.to(torch.float16).save_pretrained(target, safe_serialization=True)


def jsonl_log(path: Path, t0: float):
    """A function appending one JSON row (plus seconds since `t0`) per call to `path`."""
    def log(row: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps({**row, "elapsed_s": round(time.time() - t0, 1)}) + "\n")

    return log


def check_denoiser_args(args: argparse.Namespace, *extra: tuple[str, bool, str]) -> None:
    """Refuse values the training loop would fail on late, or silently misuse, before any work.

    `extra`: a recipe's own (option, valid, rule) triples, reported in the same message.
    """
    bad = [f"--{k.replace('_', '-')} {getattr(args, k)} ({rule})" for k, ok, rule in (
        ("steps", args.steps >= 1, "at least 1"), ("batch", args.batch >= 1, "at least 1"),
        ("lr", args.lr > 0, "positive"), ("cfg_drop", 0 <= args.cfg_drop < 1, "in [0, 1)"),
        ("ema", 0 <= args.ema < 1, "in [0, 1)"), ("every", args.every >= 1, "at least 1"),
        ("threads", args.threads >= 1, "at least 1"), *extra,
    ) if not ok]
    if bad:
        raise SystemExit("invalid option(s): " + "; ".join(bad))


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    from .options import train_parser

    return train_parser(add_help)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    check_denoiser_args(args, ("vae_latent_noise", args.vae_latent_noise >= 0, "0 or more"),
                        ("text_layers", args.text_layers >= 0, "0 or more"),
                        ("caption_keep", 0 <= args.caption_keep <= 1, "in [0, 1]"),
                        ("min_snr", args.min_snr >= 0, "0 or more; 0 = uniform weights"),
                        ("ground_weight", args.ground_weight >= 0, "0 or more; 0 = off"),
                        ("sink_weight", args.sink_weight >= 0, "0 or more; 0 = off"),
                        ("summary_drop", 0 <= args.summary_drop <= 1, "in [0, 1]; 0 = off"))
    torch.set_num_threads(args.threads)
    if args.install_vae_into:
        if not args.vae_init:
            raise SystemExit("--install-vae-into needs --vae-init (the VAE checkpoint to install)")
        install_vae(args.install_vae_into, args.vae_init)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = jsonl_log(work / "log.jsonl", t0)

    from PIL import Image
    from tqdm import tqdm

    text_init = torch.load(args.text_init, weights_only=False) if args.text_init else None
    if text_init is not None:  # a pretrained CLIP-style encoder (testbed/clip.py), frozen below
        from .clip import vocabulary

        tok = build_tokenizer(vocabulary())
        vae, text, unet = build_models(len(tok), args.seed, int(text_init["layers"]))
        text.load_state_dict(text_init["text"])
    else:
        tok = build_tokenizer()
        vae, text, unet = build_models(len(tok), args.seed, args.text_layers)
    data = Dataset(args.seed, args.data)
    gen = torch.Generator().manual_seed(args.seed)
    ckpt = work / "checkpoint.pt"
    start = 0
    latents = None  # the training latents, once known (whitening computes them on the way)
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["vae"])
        text.load_state_dict(state["text"])
        unet.load_state_dict(state["unet"])
        start, scale, vae_loss = state["step"], state["scale"], state["vae_loss"]
        ema_unet = copy.deepcopy(unet)
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text = copy.deepcopy(text)
        ema_text.load_state_dict(state["ema_text"])
        gen.set_state(state["gen"])
        print(f"resumed at step {start}")
    else:
        init = read_vae_init(args.vae_init) if args.vae_init else {}
        if init:
            vae.load_state_dict(init["vae"])
        vae_loss = train_vae(vae, data, args.vae_steps, args.vae_batch, args.vae_lr, gen, log, crop=args.vae_crop,
                             latent_noise=args.vae_latent_noise, decoder_only=args.vae_decoder_only)
        if args.vae_steps == 0 and init:
            vae_loss = float(init.get("vae_loss", float("nan")))
        vae.eval()
        if args.vae_whiten:
            before = encode_all(vae, data)
            latents = whiten_vae(vae, before)
            log({"stage": "vae-whiten", "mean": before.mean((0, 2, 3)).tolist(),
                 "std": before.std((0, 2, 3)).tolist()})
        agreement = vae_agreement(vae)
        log({"stage": "vae-check", "detector_agreement_on_reconstructions": agreement})
        print(f"VAE reconstructions read back exactly: {agreement:.1%}")
        if args.vae_only:
            torch.save({"vae": vae.state_dict(), "vae_loss": vae_loss, "agreement": agreement}, work / "vae.pt")
            return 0
        scale = None
        if args.unet_init:
            from diffusers import UNet2DConditionModel

            unet.load_state_dict(UNet2DConditionModel.from_pretrained(args.unet_init, subfolder="unet",
                                                                      torch_dtype=torch.float32).state_dict())
        ema_unet, ema_text = copy.deepcopy(unet), copy.deepcopy(text)
    vae.eval().requires_grad_(False)
    if latents is None:
        latents = encode_all(vae, data)
    if scale is None:
        scale = float(1.0 / latents.std())
        log({"stage": "vae-done", "loss": vae_loss, "scaling_factor": scale})
    sched = ddpm_scheduler()
    frozen_text = text_init is not None
    if frozen_text:
        text.eval().requires_grad_(False)
        ema_text = text
    params = [*unet.parameters(), *([] if frozen_text else text.parameters())]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    if args.resume and ckpt.is_file():
        opt.load_state_dict(state["opt"])
    unet.train()
    if not frozen_text:
        text.train()
    caption_rng = np.random.default_rng([args.seed, 11])
    grounding = args.ground_weight > 0 or args.sink_weight > 0
    if grounding:
        from . import grounding as gr

        probe = gr.install(unet)
        mask_cache: dict[int, np.ndarray] = {}
    ground_ema = sink_ema = 0.0
    empty = None
    alphas = sched.alphas_cumprod
    loss_ema = None
    bar = tqdm(range(start, args.steps), desc="unet", mininterval=5, initial=start, total=args.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 200)
        idx, caps = data.sample(args.batch, args.cfg_drop, gen)
        if args.caption_keep < 1:
            from .clip import varied_caption

            caps = [c and varied_caption(data.scenes[i], caption_rng, args.caption_keep)
                    for i, c in zip(idx.tolist(), caps)]
        z = latents[idx] * scale
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        token_ids = tokenize(tok, caps)
        ehs = text(token_ids)[0]
        if args.summary_drop > 0:
            if empty is None or not frozen_text:  # a frozen encoder's empty caption is encoded once
                empty = text(tokenize(tok, [""]))[0]
            ehs = drop_summary(ehs, token_ids, empty, tok.eos_token_id, args.summary_drop, gen)
        pred = unet(zt, t, encoder_hidden_states=ehs).sample
        weight = min_snr_weights(alphas, t, args.min_snr)
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))).mean()
        if grounding:
            ids = idx.tolist()
            for i in ids:
                if i not in mask_cache:
                    mask_cache[i] = gr.object_masks(data.scenes[i])
            tok_t, bg = gr.targets(caps, [data.scenes[i] for i in ids], [mask_cache[i] for i in ids],
                                   ehs.shape[1])
            ground_l, sink_l = gr.losses(probe.maps, tok_t, bg)
            probe.maps.clear()  # only this forward fills them (the sample grids run the EMA copy, no probe)
            loss = loss + args.ground_weight * ground_l + args.sink_weight * sink_l
            ground_ema = ground_l.item() if step == start else 0.99 * ground_ema + 0.01 * ground_l.item()
            sink_ema = sink_l.item() if step == start else 0.99 * sink_ema + 0.01 * sink_l.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update((ema_unet,) if frozen_text else (ema_unet, ema_text), (unet,) if frozen_text else (unet, text),
                   decay)
        loss_ema = loss.item() if loss_ema is None else 0.99 * loss_ema + 0.01 * loss.item()
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            log({"stage": "unet", "step": step + 1, "loss": loss_ema,
                 **({"ground": ground_ema, "sink": sink_ema} if grounding else {})})
            grid = sample_grid(vae, ema_text.eval(), ema_unet.eval(), tok, scale, list(PROBE_PROMPTS), seed=step)
            Image.fromarray(grid).save(work / f"samples_{step + 1:06d}.png")
            torch.save({"vae": vae.state_dict(), "text": text.state_dict(), "unet": unet.state_dict(),
                        "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(),
                        "opt": opt.state_dict(), "step": step + 1, "scale": scale, "vae_loss": vae_loss,
                        "gen": gen.get_state()}, work / "checkpoint.tmp")
            os.replace(work / "checkpoint.tmp", ckpt)
    meta = {"steps": 25, "guidance": 5.0, "height": 64, "width": 64,
            "trained": {"seed": args.seed, "unet_steps": args.steps, "vae_steps": args.vae_steps,
                        "min_snr": args.min_snr, "text_layers": int(text.config.num_hidden_layers),
                        "text": "pretrained, frozen" if frozen_text else "trained with the UNet",
                        "caption_keep": args.caption_keep, "ground_weight": args.ground_weight,
                        "sink_weight": args.sink_weight, "summary_drop": args.summary_drop,
                        "unet_init": args.unet_init,
                        "batch": args.batch, "lr": args.lr, "final_loss": loss_ema,
                        "vae_loss": None if math.isnan(vae_loss) else vae_loss,
                        "scaling_factor": scale, "wall_s": round(time.time() - t0, 1)}}
    save_pipeline(Path(args.out), vae, ema_text, ema_unet, tok, scale, meta)
    log({"stage": "saved", "out": str(args.out), **meta["trained"]})
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
