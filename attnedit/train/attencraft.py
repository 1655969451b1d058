"""AttenCraft training: one new token per concept from one image, kept apart by the model's own attention masks.

    attnedit train attencraft --image photo.png --concepts "dog,cat" --model shapes-sd --output runs/dogcat

    >>> from attnedit.train import attencraft          # the module is callable: attencraft(...) runs the recipe
    >>> result = attencraft("photo.png", ["dog", "cat"], "runs/dogcat", model="shapes-sd", steps=500)
    >>> pipe = attnedit.load("shapes-sd", concepts="runs/dogcat")   # tokens <dog>, <cat>

Models: SD 1.x/2.x-architecture pipelines and SDXL (new tokens in both of its text encoders).
Recipe (see docs/methods/attencraft.md and `attnedit.methods.attencraft`): the cross-attention K/V projections
of every attn2 (or LoRA adapters on them, `train="lora"`, needs `peft`) and the new token embeddings are trained;
the start token's K/V are detached. Masks are built once at a noisy step (retried with new timesteps and smaller
margins), refreshed every `refresh_every` steps when stable (SSIM gate), and drive three losses: Jensen-Shannon
alignment of each named token's cross map with its mask, a denoising loss restricted to the named concepts, and
prior preservation on class images the base model generates itself.

Each concept gets a new single token `<word>` (or `tokens=`), initialised from the mean embedding of its word's
tokens: a word the tokenizer splits into several tokens (or that it knows already) is never reused as is.
Runs are resumable (`resume="latest"`), and a folder that already holds a run is never overwritten.

Cost: before training, prior preservation renders `num_class_images` images of `class_prompt` with the base model
(each one a full generation at the model's steps); with the official 200 that is most of a short run. A model folder
can set smaller defaults in its attnedit.json "attencraft" block (the bundled shapes-sd: 16); options given
explicitly always win, and `prior_weight=0` skips the class images altogether. Progress shows both phases.

Differences from the official training script: no random-rescale augmentation (so no validity mask: the masked
denoising loss is averaged over every latent pixel), the instance latent is the VAE mean (not a sample), prior
preservation is optional (`prior_weight=0`), masks are initialised in full precision, and refreshes that cannot
separate the concepts can stop the run (`refresh_patience`, off by default as in the official code).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..methods.attencraft import (
    MapRecorder,
    extract_masks,
    jsd,
    map_levels,
    minmax,
    model_fingerprint,
    save_concepts,
    ssim,
    upsample_maps,
)
from ..tokens import STOP_WORDS

SAMPLING = ("uniform", "reweighted")
TRAIN_MODES = ("kv", "lora")
PRECISIONS = ("no", "fp16", "bf16")
CHECKPOINTS = "checkpoints"
# settings a resumed run must share with its checkpoint
_RESUME_KEYS = ("concepts", "tokens", "initializers", "template", "phrase", "train", "lora_rank", "resolution",
                "class_prompt", "num_class_images", "seed", "grad_accum")


class MaskSeparationError(ValueError):
    """The attention masks cannot tell the concepts apart (nothing saved before is touched)."""


@dataclass
class AttenCraftConfig:
    """Every setting of a run (stored in the checkpoints and the output JSON). Defaults follow the official code."""

    concepts: list[str]
    tokens: list[str] | None = None  # default "<concept>"
    initializers: list[str] | None = None  # words whose mean token embedding starts each token (default: concept)
    template: str = "a photo of {}"  # "{}" receives the concept phrases joined by " and "
    phrase: str = "{token}"  # one concept in the prompt; may use {token} and {word}
    class_prompt: str = "a photo at the beach"
    num_class_images: int = 200
    class_steps: int | None = None  # denoising steps for class images (model default if None)
    prior_weight: float = 1.0  # 0 disables prior preservation
    steps: int = 500
    lr: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    resolution: int | None = None  # square training size in pixels (model default if None)
    train: str = "kv"  # "kv": full K/V projections of attn2; "lora": LoRA on them
    lora_rank: int = 4
    attn_weight: float = 1.0  # 0 = the same training without the attention loss (ablation)
    mask_denoise: bool = True  # restrict the denoising loss to the named concepts' masks
    jsd_temperature: float = 1.0
    margin: float = 0.1
    power: int = 4
    ssim_gate: float = 0.8
    refresh_every: int = 20  # 0 = never refresh the masks
    refresh_patience: int = 0  # stop after this many refreshes in a row that cannot separate the concepts (0 = never)
    init_t_max: int = 300
    mask_retries: int = 5
    sampling: str = "uniform"
    reweight_momentum: float = 0.9
    mixed_precision: str = "no"
    grad_accum: int = 1
    checkpoint_every: int = 100
    seed: int = 42
    tensorboard: bool = False
    device: str | None = None


@dataclass
class Batch:
    """One micro-batch: which concepts the prompt names, its timesteps and noise, the class image drawn."""

    step: int
    subset: list[int]
    prompt: str
    timesteps: torch.Tensor
    noise: torch.Tensor
    class_index: int
    refresh: bool


@dataclass
class TrainResult:
    output: Path
    tokens: list[str]
    history: list[dict[str, Any]]
    masks: torch.Tensor
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- inputs
def load_image(path: str | Path, notes: list[str] | None = None) -> Image.Image:
    """The training image as RGB; a missing or unreadable file is a ValueError, other modes are converted (noted)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            img = im.copy()
    except Exception as err:
        raise ValueError(f"cannot read image {p}: {err}") from err
    if img.mode != "RGB":
        note = f"image {p.name} is {img.mode}, converted to RGB"
        warnings.warn(note, stacklevel=3)
        if notes is not None:
            notes.append(note)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba)
        img = img.convert("RGB")
    return img


def _square(img: Image.Image, size: int, notes: list[str]) -> Image.Image:
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        notes.append(f"image {w}x{h} centre-cropped to {s}x{s}")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def parse_concepts(concepts: str | list[str]) -> list[str]:
    items = concepts.split(",") if isinstance(concepts, str) else list(concepts)
    items = [c.strip() for c in items if c and c.strip()]
    if len(items) < 2:
        raise ValueError(f"AttenCraft learns several concepts from one image: give at least two concepts, got "
                         f"{len(items)} ({', '.join(items) or 'none'}), e.g. --concepts \"dog,cat\"")
    if len(set(items)) != len(items):
        raise ValueError(f"concepts must be different, got {', '.join(items)}")
    return items


def validate(cfg: AttenCraftConfig) -> None:
    """Every option checked before anything is loaded or written."""
    cfg.concepts = parse_concepts(cfg.concepts)
    k = len(cfg.concepts)
    if cfg.tokens is None:
        cfg.tokens = ["<" + re.sub(r"\s+", "-", c) + ">" for c in cfg.concepts]
    if cfg.initializers is None:
        cfg.initializers = list(cfg.concepts)
    for name in ("tokens", "initializers"):
        if len(getattr(cfg, name)) != k:
            raise ValueError(f"{name} has {len(getattr(cfg, name))} entries for {k} concepts")
    bad = [t for t in cfg.tokens if not re.fullmatch(r"[\w<>'\-]+", t)]
    if bad or len(set(cfg.tokens)) != k:
        raise ValueError(f"tokens must be distinct single words (letters, digits, <>-'), got {cfg.tokens}")
    choices = {"sampling": SAMPLING, "train": TRAIN_MODES, "mixed_precision": PRECISIONS}
    for name, valid in choices.items():
        if getattr(cfg, name) not in valid:
            raise ValueError(f"{name} {getattr(cfg, name)!r} is not one of {', '.join(valid)}")
    if "{}" not in cfg.template:
        raise ValueError(f"template must contain '{{}}' for the concepts, got {cfg.template!r}")
    if "{token}" not in cfg.phrase:
        raise ValueError(f"phrase must contain '{{token}}', got {cfg.phrase!r}")
    for name in ("steps", "grad_accum", "power", "mask_retries", "init_t_max", "lora_rank"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.prior_weight > 0 and cfg.num_class_images < 1:
        raise ValueError("prior preservation needs num_class_images >= 1 (or prior_weight=0)")
    if not 0.0 <= cfg.margin <= 1.0:
        raise ValueError(f"margin must be in [0, 1], got {cfg.margin}")


# --------------------------------------------------------------------------------------------- trainer
class AttenCraftTrainer:
    """The training run. `prepare()` loads everything (or resumes), `run()` trains and saves.

    The pieces are public so tests can drive single steps: `sample_batch`, `compute_loss`, `optimize`.
    """

    def __init__(self, image: str | Path, output_dir: str | Path, cfg: AttenCraftConfig, *, model: Any = None,
                 resume: str | Path | None = None, progress: bool = True) -> None:
        from ..pipeline import DEFAULT_MODEL

        self.cfg = cfg
        self.notes: list[str] = []
        validate(cfg)
        self.image_path = Path(image)
        self.pil = load_image(image, self.notes)
        self.out = Path(output_dir)
        self.model = model if model is not None else DEFAULT_MODEL
        self.progress = progress
        self.resume_from = self._find_checkpoint(resume) if resume is not None else None
        if self.resume_from is None and self._holds_run(self.out):
            raise ValueError(f"{self.out} already holds an AttenCraft run (checkpoints or concepts); "
                             "pass resume='latest' to continue it or choose another output folder")
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self._refresh_failures = 0
        self._prepared = False

    # ---------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _holds_run(folder: Path) -> bool:
        return (folder / "concepts.safetensors").exists() or any((folder / CHECKPOINTS).glob("step-*"))

    def _find_checkpoint(self, resume: str | Path) -> Path:
        if str(resume) == "latest":
            found = sorted((self.out / CHECKPOINTS).glob("step-*/state.pt"))
            if not found:
                raise ValueError(f"resume='latest' but {self.out / CHECKPOINTS} holds no checkpoint")
            return found[-1]
        p = Path(resume)
        p = p / "state.pt" if p.is_dir() else p
        if not p.is_file():
            raise ValueError(f"checkpoint not found: {p}")
        return p

    def prepare(self) -> AttenCraftTrainer:
        from accelerate import Accelerator

        from ..controller import Controller
        from ..pipeline import EditPipeline, load

        cfg = self.cfg
        resumed = torch.load(self.resume_from, map_location="cpu", weights_only=False) if self.resume_from else None
        if resumed is not None:
            old = resumed["config"]
            diff = [k for k in _RESUME_KEYS if old.get(k) != dataclasses.asdict(cfg).get(k)
                    and not (k == "resolution" and cfg.resolution is None)]
            if diff:
                k = diff[0]
                raise ValueError(f"cannot resume {self.resume_from}: {k} was {old.get(k)!r}, now {getattr(cfg, k)!r}")
            cfg.resolution = old["resolution"]
        if cfg.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError as err:
                raise ValueError("tensorboard logging needs the tensorboard package: "
                                 "pip install 'attnedit[train]'") from err
        if cfg.train == "lora":
            try:
                import peft  # noqa: F401
            except ImportError as err:
                raise ValueError("train='lora' needs peft: pip install 'attnedit[train]'") from err
        device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if torch.cuda.is_available()
                                                                            else "cpu")
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=device.type == "cpu",
                               gradient_accumulation_steps=1,
                               log_with="tensorboard" if cfg.tensorboard else None, project_dir=str(self.out))
        self.device = self.acc.device
        if isinstance(self.model, EditPipeline):
            edit = EditPipeline(copy.deepcopy(self.model.pipe), model_name=self.model.model_name)
        else:
            edit = load(self.model)
        if not (edit.family.has("unet") and edit.family.has("clip_text")):
            raise ValueError(f"AttenCraft training supports UNet models with CLIP text encoders (SD 1.x/2.x, SDXL); "
                             f"{edit.model_name!r} is {edit.family.label}")
        self.edit = edit
        self.model_name = edit.model_name
        pipe = edit.pipe
        pipe.to(self.device, torch.float32)
        self.pipe = pipe
        self.fingerprint = model_fingerprint(pipe)
        size = cfg.resolution or edit.default_size()[0]
        if size % edit.pixel_stride:
            raise ValueError(f"resolution {size} is not a multiple of {edit.pixel_stride}")
        cfg.resolution = int(size)
        self.pil = _square(self.pil, size, self.notes)
        self.out.mkdir(parents=True, exist_ok=True)
        self.g = torch.Generator().manual_seed(cfg.seed)
        # class images from the base model itself, before anything is changed
        self.class_latents = self._class_latents() if cfg.prior_weight > 0 else None
        if self.class_latents is None:
            self.say("prior preservation off (prior_weight 0): no class images")
        self._add_tokens()
        self._make_trainable()
        self.params = [*self.new_embeds, *self.kv_params.values()]
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
        self.optimizer = self.acc.prepare(opt)
        from diffusers import DDPMScheduler

        self.noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_train_t = int(self.noise_sched.config.num_train_timesteps)
        self.latent = self._encode_image(self.pil)
        self.class_enc = None
        if self.class_latents is not None:
            with torch.no_grad():
                self.class_enc = self._encode_text([cfg.class_prompt])
        # recording control on the cross (latent/4) and self (latent/2) layers of the recipe
        self.controller = Controller(pipe, [])
        reg = self.controller.registry
        lat = cfg.resolution // edit.vae_scale_factor
        self.cross_level, self.self_level = map_levels(list(reg), (lat, lat))
        self.recorder = MapRecorder(reg, self.cross_level, self.self_level, row=0)
        self.controller.controls = [self.recorder]
        self.controller.install()
        self.controller.begin_run(None)
        self.ema = torch.ones(len(cfg.concepts))
        if resumed is not None:
            self._load_state(resumed)
        else:
            self.init_masks()
        if cfg.tensorboard:
            flat = {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
            self.acc.init_trackers("attencraft", config=flat)
        self._prepared = True
        return self

    def close(self) -> None:
        """Remove the recording processors and the embedding hook (the trainer's own pipeline copy)."""
        if getattr(self, "controller", None) is not None:
            self.controller.remove()
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        self._hooks = []
        if self.cfg.tensorboard and getattr(self, "acc", None) is not None:
            self.acc.end_training()

    def say(self, message: str) -> None:
        """One line on stderr beside the progress bars (silent with `progress=False`)."""
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(f"attencraft: {message}", file=sys.stderr)

    def _class_latents(self) -> torch.Tensor:
        """Prior preservation: the base model renders `num_class_images` images of the class prompt (the slow part
        of a run: each is a full generation), cached in `<output>/class_images`."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        n = cfg.num_class_images
        folder = self.out / "class_images"
        info = {"prompt": cfg.class_prompt, "model": str(self.model_name), "resolution": cfg.resolution,
                "seed": cfg.seed, "steps": cfg.class_steps}
        info_path = folder / "info.json"
        files = [folder / f"{i:04d}.png" for i in range(n)]
        cached = info_path.is_file() and json.loads(info_path.read_text()) == info and all(f.is_file() for f in files)
        if cached:
            self.say(f"prior preservation: {n} class images reused from {folder}")
        else:  # generated in batches of 8; image i always has seed `seed * 1000 + i`
            steps = cfg.class_steps or self.edit.default_steps()
            self.say(f"prior preservation: rendering {n} class images of {cfg.class_prompt!r} ({steps} steps each) "
                     "before training. This is the slow part; fewer: --num-class-images N (num_class_images=N), "
                     "none: --prior-weight 0 (prior_weight=0)")
            folder.mkdir(parents=True, exist_ok=True)
            bar = tqdm(total=n, desc="attencraft: class images (prior preservation)", unit="img",
                       disable=not self.progress, dynamic_ncols=True)
            start_time = time.perf_counter()
            try:
                for start in range(0, n, 8):
                    idx = list(range(start, min(start + 8, n)))
                    res = self.edit.generate([cfg.class_prompt] * len(idx), seed=[cfg.seed * 1000 + i for i in idx],
                                             steps=cfg.class_steps, height=cfg.resolution, width=cfg.resolution)
                    for i, im in zip(idx, res.images):
                        im.save(files[i])
                    bar.update(len(idx))
            finally:
                bar.close()
            seconds = time.perf_counter() - start_time
            self.notes.append(f"prior preservation rendered {n} class images in {seconds:.1f} s "
                              f"({seconds / n:.2f} s each)")
            info_path.write_text(json.dumps(info))
        images = [Image.open(f).convert("RGB") for f in files]
        return torch.cat([self._encode_image(im) for im in images])

    @torch.no_grad()
    def _encode_image(self, img: Image.Image) -> torch.Tensor:
        vae = self.pipe.vae
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        lat = vae.encode(x.to(self.device, vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * vae.config.scaling_factor).float()

    def _text_pairs(self) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs: one for SD, two for SDXL (their features are concatenated)."""
        return self.edit.family.text_encoders()

    def _encode_text(self, prompts: list[str]) -> dict[str, Any]:
        """The UNet's text condition of `prompts` at the training resolution, with gradients to the new tokens."""
        r = self.cfg.resolution
        return self.edit.family.trainable_condition(prompts, r, r)

    def _add_tokens(self) -> None:
        cfg = self.cfg
        self.new_embeds: list[torch.nn.Parameter] = []
        self._hooks = []
        pairs = self._text_pairs()
        for tok, _ in pairs:
            clash = [t for t in cfg.tokens if t in tok.get_vocab()]
            if clash:
                raise ValueError(f"token(s) {', '.join(clash)} already exist in the tokenizer; choose new ones with "
                                 "tokens=[...] (e.g. <c0>, <c1>)")
        for n, (tok, enc) in enumerate(pairs):
            table = enc.get_input_embeddings().weight
            inits = []
            for word, token in zip(cfg.initializers, cfg.tokens):
                ids = tok(word, add_special_tokens=False).input_ids
                if not ids:
                    raise ValueError(f"initializer word {word!r} gives no token")
                if len(ids) > 1 and n == 0:
                    self.notes.append(f"'{word}' is {len(ids)} tokens in this tokenizer: the new single token "
                                      f"{token} starts from their mean embedding")
                inits.append(table[ids].detach().float().mean(0))
            tok.add_tokens(cfg.tokens)
            ids = tok.convert_tokens_to_ids(cfg.tokens)
            if max(ids) >= table.shape[0]:
                enc.resize_token_embeddings(len(tok))
            table = enc.get_input_embeddings()
            for token in cfg.tokens:
                if len(tok(token, add_special_tokens=False).input_ids) != 1:
                    raise RuntimeError(f"the tokenizer does not keep {token} as one token")
            param = torch.nn.Parameter(torch.stack(inits).to(self.device))
            lut = torch.full((table.weight.shape[0],), -1, dtype=torch.long)
            lut[torch.tensor(ids)] = torch.arange(len(ids))
            self.new_embeds.append(param)
            self._hooks.append(table.register_forward_hook(_row_replacer(param, lut.to(self.device))))

    def _make_trainable(self) -> None:
        cfg = self.cfg
        unet = self.pipe.unet
        for m in (unet, self.pipe.vae, *(enc for _, enc in self._text_pairs())):
            m.requires_grad_(False)
            m.eval()
        self.layers = sorted(n for n, m in unet.named_modules() if n.endswith("attn2") and hasattr(m, "to_k"))
        self.kv_params: dict[str, torch.nn.Parameter] = {}
        if cfg.train == "kv":
            for layer in self.layers:
                attn = unet.get_submodule(layer)
                for proj in ("to_k", "to_v"):
                    w = getattr(attn, proj).weight
                    w.requires_grad_(True)
                    self.kv_params[f"{layer}.{proj}.weight"] = w
        else:
            from peft import LoraConfig, inject_adapter_in_model

            targets = [f"{layer}.{proj}" for layer in self.layers for proj in ("to_k", "to_v")]
            lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=targets,
                              init_lora_weights=True, lora_dropout=0.0)
            torch.manual_seed(cfg.seed)  # LoRA A matrices are initialised from torch's global generator
            inject_adapter_in_model(lcfg, unet)
            for target in targets:
                module = unet.get_submodule(target)
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.requires_grad_(True)
                b.requires_grad_(True)
                self.kv_params[f"{target}.lora_A"] = a
                self.kv_params[f"{target}.lora_B"] = b
            unet.to(self.device)

    # ------------------------------------------------------------------------------------------ prompts
    def prompt_of(self, subset: list[int]) -> str:
        cfg = self.cfg
        parts = [cfg.phrase.format(token=cfg.tokens[i], word=cfg.concepts[i]) for i in subset]
        return cfg.template.format(" and ".join(parts))

    def _positions(self, prompt: str, subset: list[int], spans: bool) -> tuple[list[int], dict[str, list[int]]]:
        """Key positions to capture (start token first) and, per concept, its token (or whole phrase) columns."""
        from ..tokens import index_prompt

        index = index_prompt(prompt, self.edit.family.text_segments(), warn=False)
        cols: dict[str, list[int]] = {"sot": [0]}
        for i in subset:
            token_pos = index.find(self.cfg.tokens[i])
            pos = list(token_pos)
            if spans:
                phrase = self.cfg.phrase.format(token=self.cfg.tokens[i], word=self.cfg.concepts[i])
                for p in index.find(phrase):
                    word = index.word_of(p)
                    if word is not None and word.lower() not in STOP_WORDS and p not in pos:
                        pos.append(p)
            cols[f"span{i}"] = pos
            cols[f"token{i}"] = token_pos
        keys = sorted({p for v in cols.values() for p in v})
        return keys, {k: [keys.index(p) for p in v] for k, v in cols.items()}

    # ------------------------------------------------------------------------------------------ masks
    def init_masks(self) -> None:
        """Masks from one noisy forward with every concept named; new timestep and smaller margin on failure."""
        cfg = self.cfg
        k = len(cfg.concepts)
        subset = list(range(k))
        prompt = self.prompt_of(subset)
        names = [*cfg.tokens, "background"]
        tried = []
        for attempt in range(cfg.mask_retries):
            t = int(torch.randint(0, min(cfg.init_t_max, self.num_train_t), (1,), generator=self.g))
            noise = torch.randn(self.latent.shape, generator=self.g).to(self.device)
            margin = cfg.margin * 0.5 ** (attempt // 2)
            with torch.no_grad():
                maps, cols = self._forward_maps(prompt, subset, torch.tensor([t]), noise, record_self=True)
                res = self._extract(maps, cols, margin, names)
            tried.append(f"t={t}, margin={margin:.3f}: {res.problem}" if not res.ok else "")
            if res.ok:
                self.masks = res.masks.to(self.device)
                self.history.append({"step": 0, "event": "masks", "t": t, "margin": margin, "attempt": attempt + 1})
                self._init_ema(maps, cols)
                self._save_mask_preview()
                return
        raise MaskSeparationError(
            f"the model's attention cannot separate the concepts {', '.join(cfg.concepts)} in {self.image_path}: "
            + "; ".join(tried) + f". Try a smaller --margin, a lower --power than {cfg.power} (a model with diffuse "
            "self-attention collapses every map under a long affinity walk), other --initializers (words whose maps "
            "mark each object: on the testbed colour words), or an image where the objects stand further apart. "
            "Nothing was trained or saved."
        )

    def _extract(self, maps: torch.Tensor, cols: dict[str, list[int]], margin: float, names: list[str]):
        k = len(self.cfg.concepts)
        chans = [maps[..., cols[f"span{i}"]].amax(-1) for i in range(k)] + [maps[..., cols["sot"]].amax(-1)]
        cross = torch.stack(chans, -1).detach().float()
        return extract_masks(cross, self.recorder.affinity().float(), self.recorder.self_grid,
                             power=self.cfg.power, margin=margin, names=names)

    def _forward_maps(self, prompt, subset, t, noise, record_self):
        keys, cols = self._positions(prompt, subset, spans=True)
        self._unet(self.latent, self._encode_text([prompt]), t, noise, keys, record_self, autocast=False)
        return self.recorder.cross_maps(), cols

    def _unet(self, latents, cond, t, noise, keys, record_self, autocast: bool = True):
        """One UNet forward with the recorder armed (mask initialisation runs in full precision)."""
        from contextlib import nullcontext

        from ..layout import BatchLayout

        rec = self.recorder
        rec.clear()
        rec.positions = torch.tensor(keys, dtype=torch.long, device=self.device)
        rec.record_self = record_self
        t = t.to(self.device)
        noisy = self.noise_sched.add_noise(latents, noise, t)
        layout = BatchLayout.standard(latents.shape[0], False)
        with self.controller.pass_phase("guidance", layout=layout, step=0), \
                (self.acc.autocast() if autocast else nullcontext()):
            pred = self.pipe.unet(noisy, t, **cond).sample
        rec.positions = None
        rec.record_self = False
        return pred.float(), noisy

    def _init_ema(self, maps: torch.Tensor, cols: dict[str, list[int]]) -> None:
        grid = tuple(self.masks.shape[-2:])
        for i in range(len(self.cfg.concepts)):
            x = upsample_maps(maps[..., cols[f"token{i}"]].mean(-1, keepdim=True).detach(), grid)[..., 0]
            self.ema[i] = float(self._inside(x, self.masks[i]))

    @staticmethod
    def _inside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)

    def _save_mask_preview(self) -> None:
        palette = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                            [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.float32)
        m = self.masks.detach().float().cpu().numpy()  # (K+1, h, w)
        k = m.shape[0] - 1
        rgb = np.zeros((*m.shape[1:], 3), dtype=np.float32) + 40.0
        for i in range(k):
            rgb += m[i][..., None] * (palette[i % len(palette)] - 40.0)
        size = self.cfg.resolution
        view = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
        sheet = Image.new("RGB", (2 * size, size))
        sheet.paste(self.pil, (0, 0))
        sheet.paste(view, (size, 0))
        sheet.save(self.out / "masks.png")

    # --------------------------------------------------------------------------------------- sampling
    def sampling_probs(self) -> torch.Tensor:
        """Probabilities of the K single-concept prompts and the joint prompt (last)."""
        k = len(self.cfg.concepts)
        if self.cfg.sampling == "uniform":
            return torch.full((k + 1,), 1.0 / (k + 1))
        w = 1.0 / self.ema.clamp_min(1e-6)
        return torch.cat([(2.0 / 3.0) * w / w.sum(), torch.tensor([1.0 / 3.0])])

    def sample_batch(self, step: int, micro: int = 0) -> Batch:
        cfg = self.cfg
        k = len(cfg.concepts)
        refresh = cfg.refresh_every > 0 and step > 0 and step % cfg.refresh_every == 0 and micro == 0
        choice = int(torch.multinomial(self.sampling_probs(), 1, generator=self.g))
        subset = list(range(k)) if (refresh or choice == k) else [choice]
        rows = 2 if self.class_latents is not None else 1
        t = torch.randint(0, self.num_train_t, (rows,), generator=self.g)
        noise = torch.randn((rows, *self.latent.shape[1:]), generator=self.g)
        ci = int(torch.randint(0, self.class_latents.shape[0], (1,), generator=self.g)) if rows == 2 else -1
        return Batch(step, subset, self.prompt_of(subset), t, noise, ci, refresh)

    # ------------------------------------------------------------------------------------------- losses
    def compute_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float], dict[str, Any]]:
        """Total loss of one micro-batch and its parts; `extra` carries the maps a mask refresh needs."""
        cfg = self.cfg
        k = len(cfg.concepts)
        cond = self._encode_text([batch.prompt])
        latents = self.latent
        if self.class_latents is not None:
            cond = _concat(cond, self.class_enc)
            latents = torch.cat([latents, self.class_latents[batch.class_index : batch.class_index + 1]])
        keys, cols = self._positions(batch.prompt, batch.subset, spans=batch.refresh)
        noise = batch.noise.to(self.device)
        pred, _ = self._unet(latents, cond, batch.timesteps, noise, keys, batch.refresh)
        if self.noise_sched.config.prediction_type == "v_prediction":
            target = self.noise_sched.get_velocity(latents, noise, batch.timesteps.to(self.device))
        else:
            target = noise
        maps = self.recorder.cross_maps()
        grid = tuple(self.masks.shape[-2:])
        # attention alignment: each named token (and the start token) against its mask
        terms, inside = [], {}
        for i in [*batch.subset, k]:
            col = cols[f"token{i}"] if i < k else cols["sot"]
            x = upsample_maps(maps[..., col].mean(-1, keepdim=True), grid)[..., 0]
            if i < k:
                inside[i] = float(self._inside(x.detach(), self.masks[i]))
            terms.append(jsd(minmax(x).flatten(), self.masks[i].flatten(), cfg.jsd_temperature))
        attn_loss = torch.stack(terms).mean()
        # denoising loss on the named concepts only
        if cfg.mask_denoise:
            union = self.masks[batch.subset].amax(0)[None, None]
            union = F.interpolate(union, size=latents.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
            den_loss = F.mse_loss(pred[:1] * union, target[:1] * union)
        else:
            den_loss = F.mse_loss(pred[:1], target[:1])
        total = den_loss + cfg.attn_weight * attn_loss
        parts = {"denoise": float(den_loss.detach()), "attention": float(attn_loss.detach())}
        if self.class_latents is not None:
            prior_loss = F.mse_loss(pred[1:], target[1:])
            total = total + cfg.prior_weight * prior_loss
            parts["prior"] = float(prior_loss.detach())
        parts["loss"] = float(total.detach())
        extra = {"inside": inside}
        if batch.refresh:
            extra["maps"], extra["cols"] = maps.detach(), cols
        return total, parts, extra

    def optimize(self, batch: Batch) -> dict[str, Any]:
        """One full optimiser step on `batch` (tests; `run` accumulates micro-batches itself)."""
        parts = self._backward(batch, scale=1.0)
        self._step()
        return parts

    def _backward(self, batch: Batch, scale: float) -> dict[str, Any]:
        total, parts, extra = self.compute_loss(batch)
        self.acc.backward(total * scale)
        m = self.cfg.reweight_momentum
        for i, v in extra["inside"].items():
            self.ema[i] = m * self.ema[i] + (1 - m) * v
        if batch.refresh:
            parts["refresh"] = self._refresh(extra["maps"], extra["cols"], int(batch.timesteps[0]))
        parts["subset"] = batch.subset
        return parts

    def _step(self) -> None:
        self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _refresh(self, maps: torch.Tensor, cols: dict[str, list[int]], t: int) -> str:
        """Recompute the masks at this step; keep them only if they still separate the concepts and are stable."""
        cfg = self.cfg
        res = self._extract(maps, cols, cfg.margin, [*cfg.tokens, "background"])
        if not res.ok:
            self._refresh_failures += 1
            if cfg.refresh_patience and self._refresh_failures >= cfg.refresh_patience:
                raise MaskSeparationError(
                    f"step {self.step}: the refreshed masks no longer separate the concepts ({res.problem}) "
                    f"{self._refresh_failures} time(s) in a row; training stopped. The last checkpoint is kept: "
                    f"{self._last_checkpoint() or 'none yet'}"
                )
            return f"kept (t={t}: {res.problem})"
        self._refresh_failures = 0
        new = res.masks.to(self.device)
        scores = [ssim(new[i], self.masks[i]) for i in range(len(cfg.concepts))]
        if min(scores) < cfg.ssim_gate:
            return f"kept (t={t}: ssim {min(scores):.2f} < {cfg.ssim_gate})"
        self.masks = new
        return f"updated (t={t}, ssim {min(scores):.2f})"

    # --------------------------------------------------------------------------------------- checkpoints
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        state = {_embedding_key(n): e.detach().cpu().clone() for n, e in enumerate(self.new_embeds)}
        state.update({k: v.detach().cpu().clone() for k, v in self.kv_params.items()})
        return state

    def _last_checkpoint(self) -> Path | None:
        found = sorted((self.out / CHECKPOINTS).glob("step-*/state.pt"))
        return found[-1].parent if found else None

    def save_checkpoint(self) -> Path:
        folder = self.out / CHECKPOINTS / f"step-{self.step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "trainable": self._trainable_state(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.acc.scaler.state_dict() if getattr(self.acc, "scaler", None) is not None else None,
            "generator": self.g.get_state(),
            "masks": self.masks.detach().cpu(),
            "ema": self.ema.clone(),
            "history": self.history,
            "refresh_failures": self._refresh_failures,
            "config": dataclasses.asdict(self.cfg),
            "fingerprint": self.fingerprint,
        }
        tmp = folder / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(folder / "state.pt")
        return folder

    def _load_state(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") and state["fingerprint"] != self.fingerprint:
            from ..methods.attencraft import _same_fingerprint

            differs = _same_fingerprint(state["fingerprint"], self.fingerprint)
            if differs:
                raise ValueError(f"checkpoint {self.resume_from} was made with another base model ({differs})")
        with torch.no_grad():
            for n, e in enumerate(self.new_embeds):
                e.copy_(state["trainable"][_embedding_key(n)])
            for k, p in self.kv_params.items():
                p.copy_(state["trainable"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler") is not None and getattr(self.acc, "scaler", None) is not None:
            self.acc.scaler.load_state_dict(state["scaler"])
        self.g.set_state(state["generator"])
        self.masks = state["masks"].to(self.device)
        self.ema = state["ema"].clone()
        self.history = list(state["history"])
        self._refresh_failures = int(state.get("refresh_failures", 0))
        self.step = int(state["step"])

    def save_output(self) -> Path:
        cfg = self.cfg
        tensors = self._trainable_state()
        meta = {
            "tokens": cfg.tokens,
            "concepts": cfg.concepts,
            "initializers": cfg.initializers,
            "model": str(self.model_name),
            "family": self.edit.family.name,
            "fingerprint": self.fingerprint,
            "train": cfg.train,
            "lora_rank": cfg.lora_rank if cfg.train == "lora" else None,
            "lora_scale": 1.0,
            "layers": self.layers,
            "prompt": self.prompt_of(list(range(len(cfg.concepts)))),
            "steps_done": self.step,
            "image_sha256": hashlib.sha256(self.image_path.read_bytes()).hexdigest(),
            "notes": self.notes,
            "settings": dataclasses.asdict(cfg),
        }
        path = save_concepts(self.out, tensors, meta)
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
        return path

    # ------------------------------------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        if not self._prepared:
            try:
                self.prepare()
            except BaseException:
                self.close()
                raise
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=min(self.step, cfg.steps), disable=not self.progress,
                   desc="attencraft: training", unit="step", dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                logs: dict[str, Any] = {}
                for micro in range(cfg.grad_accum):
                    batch = self.sample_batch(self.step, micro)
                    parts = self._backward(batch, 1.0 / cfg.grad_accum)
                    for key, val in parts.items():
                        if isinstance(val, float):
                            logs[key] = logs.get(key, 0.0) + val / cfg.grad_accum
                        else:
                            logs[key] = val
                self._step()
                self.step += 1
                self.history.append({"step": self.step, **logs})
                if cfg.tensorboard:
                    self.acc.log({k: v for k, v in logs.items() if isinstance(v, float)}, step=self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.4f}", attn=f"{logs['attention']:.4f}")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            if cfg.refresh_every:
                self._save_mask_preview()
            path = self.save_output()
        finally:
            bar.close()
            self.close()
        return TrainResult(path.parent, list(cfg.tokens), self.history, self.masks.detach().cpu(), self.notes)


def _embedding_key(n: int) -> str:
    return "token_embeddings" if n == 0 else f"token_embeddings_{n + 1}"


def _row_replacer(param: torch.nn.Parameter, lut: torch.Tensor):
    """Forward hook of an embedding table: rows of the new tokens come from the trainable `param`."""

    def hook(module, args, output):
        idx = lut[args[0]]
        new = param[idx.clamp_min(0)].to(output.dtype)
        return torch.where((idx >= 0).unsqueeze(-1), new, output)

    return hook


MODEL_BLOCK = "attencraft"  # the block of a model folder's attnedit.json holding AttenCraft defaults for that model
_NOT_FROM_MODEL = ("concepts", "tokens", "initializers", "device")  # belong to a run, never to a model


def model_defaults(model: Any = None) -> tuple[dict[str, Any], str | None]:
    """The options the model folder's `attnedit.json` sets in its "attencraft" block, and the file they came from.

    A small model renders its class images in a fraction of the official count's time, so the bundled models set
    e.g. `{"num_class_images": 16}`. Builtins (`tiny-*`), hub ids and folders without the block give `({}, None)`.
    """
    from ..pipeline import BUNDLED_DIR, DEFAULT_MODEL, TINY_PREFIX, EditPipeline

    if isinstance(model, EditPipeline):
        block, where = model.settings.get(MODEL_BLOCK), f"{model.model_name} (its attnedit.json)"
    elif model is not None and not isinstance(model, (str, os.PathLike)):
        return {}, None  # a diffusers pipeline object: no model folder to read
    else:
        name = str(model if model is not None else DEFAULT_MODEL)
        if name.startswith(TINY_PREFIX):
            return {}, None
        bundled = BUNDLED_DIR / name
        folder = bundled if "/" not in name and (bundled / "model_index.json").is_file() else Path(name)
        path = folder / "attnedit.json"
        if not path.is_file():
            return {}, None
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
        block, where = (settings.get(MODEL_BLOCK) if isinstance(settings, dict) else None), str(path)
    if block is None:
        return {}, None
    if not isinstance(block, dict):
        raise ValueError(f'{where}: "{MODEL_BLOCK}" must map option names to values, got {type(block).__name__}')
    valid = [f.name for f in dataclasses.fields(AttenCraftConfig) if f.name not in _NOT_FROM_MODEL]
    unknown = sorted(set(block) - set(valid))
    if unknown:
        raise ValueError(f'{where}: unknown AttenCraft option {unknown[0]!r} in its "{MODEL_BLOCK}" block; valid '
                         f"options: {', '.join(valid)}")
    return dict(block), where


def attencraft(image: str | Path, concepts: str | list[str], output_dir: str | Path, *, model: Any = None,
               resume: str | Path | None = None, progress: bool = True, **options: Any) -> TrainResult:
    """Train AttenCraft concepts on one image; returns where they were saved and the loss history.

    `model`: a model name/folder (`attnedit.load`) or an `EditPipeline` (copied, never modified); `options` are
    the fields of `AttenCraftConfig` (unknown names are refused). Options not given take the values of the model
    folder's attnedit.json "attencraft" block when it has one (`model_defaults`), else the official defaults;
    the values taken from the model are printed (with `progress`) and kept in `notes`.

    >>> res = attencraft("photo.png", "dog,cat", "runs/dogcat", model="shapes-sd", steps=400)
    >>> attnedit.load("shapes-sd", concepts=res.output)("a <dog> and a <cat>", seed=0)
    """
    fields = {f.name: f for f in dataclasses.fields(AttenCraftConfig) if f.name != "concepts"}
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise ValueError(f"unknown AttenCraft option {unknown[0]!r}; valid options: {', '.join(fields)}")
    block, where = model_defaults(model)
    from_model = {k: v for k, v in block.items() if k not in options}
    cfg = AttenCraftConfig(concepts=parse_concepts(concepts), **{**from_model, **options})
    trainer = AttenCraftTrainer(image, output_dir, cfg, model=model, resume=resume, progress=progress)
    if from_model:
        used = ", ".join(f"{k}={v!r}" + (f" (official {fields[k].default!r})" if fields[k].default is not None else "")
                         for k, v in from_model.items())
        note = f"defaults from {where}: {used}; an option you give overrides them"
        trainer.notes.insert(0, note)
        trainer.say(note)
    return trainer.run()


# ------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `attencraft` command line; its arguments live in `attnedit.train.cli` (no torch import for --help)."""
    from .cli import add_attencraft_parser

    add_attencraft_parser(subparsers)


def _cli(args: argparse.Namespace) -> int:
    """Run from parsed arguments: only the options given are passed, the model's attnedit.json fills the rest."""
    from .cli import ATTENCRAFT_OPTIONS

    options = {}
    for name, kind, _default, _help in ATTENCRAFT_OPTIONS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if kind == "list":
            value = [v.strip() for v in value.split(",")]
        options[name] = value
    res = attencraft(args.image, args.concepts, args.output, model=args.model, resume=args.resume,
                     progress=not args.no_progress, **options)
    for note in res.notes:
        print(f"note: {note}")
    last = next((h for h in reversed(res.history) if "loss" in h), {})
    print(f"tokens: {', '.join(res.tokens)}; final loss {last.get('loss', float('nan')):.4f}")
    print(res.output)
    return 0


__all__ = ["AttenCraftConfig", "AttenCraftTrainer", "MaskSeparationError", "TrainResult", "attencraft"]


class _CallableModule(types.ModuleType):
    """`from attnedit.train import attencraft; attencraft(image, concepts, out)` calls the recipe directly."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return attencraft(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


def _concat(a: Any, b: Any) -> Any:
    """Two denoiser conditions (nested dicts of tensors) stacked along the batch."""
    if isinstance(a, dict):
        return {k: _concat(a[k], b[k]) for k in a}
    return torch.cat([a, b])
