"""`attnedit train <recipe>`: the recipes' command lines, built without importing torch or diffusers.

The argument definitions live here so that `attnedit train <recipe> --help` stays fast; the recipe module
(`attnedit.train.<name>`, which imports torch) is imported only when the command runs, and its `_cli(args)`
does the work.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from typing import Any

RECIPES = ("attencraft", "clear")

# ------------------------------------------------------------------------------------------- AttenCraft
# Every field of `attnedit.train.attencraft.AttenCraftConfig` but `concepts`: (name, type, official default, help).
# The defaults are those of the dataclass (a test keeps them equal); "list" is a comma-separated string.
ATTENCRAFT_OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    ("tokens", "list", None, "comma-separated new tokens (default <concept> each)"),
    ("initializers", "list", None, "comma-separated words whose embeddings start the tokens (default: the concepts)"),
    ("template", str, "a photo of {}", "prompt template, '{}' receives the concept phrases joined by ' and '"),
    ("phrase", str, "{token}", "one concept in the prompt, with {token} and optionally {word}"),
    ("class_prompt", str, "a photo at the beach", "prompt of the prior-preservation images the base model renders"),
    ("num_class_images", int, 200, "class images rendered before training (prior preservation), the slow part; "
     "a model's attnedit.json may set fewer"),
    ("class_steps", int, None, "denoising steps per class image (default: the model's own steps)"),
    ("prior_weight", float, 1.0, "weight of the prior-preservation loss (0 skips the class images entirely)"),
    ("steps", int, 500, "training steps"),
    ("lr", float, 1e-4, "learning rate (AdamW)"),
    ("weight_decay", float, 1e-2, "AdamW weight decay"),
    ("max_grad_norm", float, 1.0, "gradient clipping norm"),
    ("resolution", int, None, "square training size in pixels (default: the model's native size)"),
    ("train", str, "kv", "kv: the cross-attention K/V projections; lora: LoRA adapters on them (needs peft)"),
    ("lora_rank", int, 4, "LoRA rank (with --train lora)"),
    ("attn_weight", float, 1.0, "weight of the attention-mask loss (0 = the same training without it)"),
    ("mask_denoise", bool, True, "restrict the denoising loss to the named concepts"),
    ("jsd_temperature", float, 1.0, "temperature of the Jensen-Shannon attention loss"),
    ("margin", float, 0.1, "mask margin: a pixel belongs to a concept that beats every other by this much"),
    ("power", int, 4, "power of the self-attention affinity used to propagate the maps"),
    ("ssim_gate", float, 0.8, "refreshed masks are accepted when SSIM with the previous ones is at least this"),
    ("refresh_every", int, 20, "refresh the masks every N steps (0 = never)"),
    ("refresh_patience", int, 0, "stop after N refreshes in a row that cannot separate the concepts (0 = never)"),
    ("init_t_max", int, 300, "mask initialisation draws its timestep below this"),
    ("mask_retries", int, 5, "mask initialisation attempts (new timestep, smaller margin) before giving up"),
    ("sampling", str, "uniform", "concept sampling: uniform (official) or reweighted (slow concepts more often)"),
    ("reweight_momentum", float, 0.9, "momentum of the per-concept attention average (--sampling reweighted)"),
    ("mixed_precision", str, "no", "no, fp16 or bf16 (accelerate)"),
    ("grad_accum", int, 1, "micro-batches per optimiser step"),
    ("checkpoint_every", int, 100, "save a resumable checkpoint every N steps (0 = never)"),
    ("seed", int, 42, "seed of the class images, timesteps, noise and concept sampling"),
    ("tensorboard", bool, False, "log losses to TensorBoard under the output folder"),
    ("device", str, None, "cpu, cuda, cuda:1 ... (default: cuda when available)"),
)
ATTENCRAFT_CHOICES = {"train": ("kv", "lora"), "sampling": ("uniform", "reweighted"),
                      "mixed_precision": ("no", "fp16", "bf16")}
ATTENCRAFT_DESCRIPTION = """\
AttenCraft: one new token per concept, learned from one image; the model's own attention masks keep the concepts
apart. Before training, prior preservation renders --num-class-images images of --class-prompt with the base model:
that is the slow part (official default 200); --prior-weight 0 skips it. Options not given on the command line take
the values of the model folder's attnedit.json "attencraft" block when it has one (the bundled shapes-sd asks for few
class images), else the defaults shown; the values used are printed."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_attencraft_parser(recipes: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = recipes.add_parser("attencraft", help="learn one token per concept from one image (AttenCraft)",
                           description=ATTENCRAFT_DESCRIPTION)
    p.add_argument("--image", required=True, help="the image holding the concepts")
    p.add_argument("--concepts", required=True, help='comma-separated concept words, e.g. "dog,cat"')
    p.add_argument("--output", "-o", default="attencraft-out", help="output folder (default attencraft-out)")
    p.add_argument("--model", default=None, help="model name or folder (default shapes-sd, the bundled testbed model)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars and the start-up lines")
    for name, kind, default, text in ATTENCRAFT_OPTIONS:
        # default None: only the options given reach the recipe, so a model's attnedit.json can fill the others
        shown = f"{text} (default: {default})" if default is not None else text
        if kind is bool:
            p.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=shown)
            continue
        p.add_argument(_flag(name), type=str if kind == "list" else kind, default=None, help=shown,
                       choices=ATTENCRAFT_CHOICES.get(name))
    p.set_defaults(func=functools.partial(_run, "attencraft"))
    return p


# ------------------------------------------------------------------------------------------------ CLEAR
CLEAR_OPTIMIZERS = ("adamw", "prodigy")
CLEAR_PRECISIONS = ("no", "fp16", "bf16")


def add_clear_parser(recipes: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = recipes.add_parser("clear", help="distil a CLEAR local-attention student (FLUX-architecture DiTs)")
    p.add_argument("--model", default="shapes-dit",
                   help="teacher model: a DiT (hub id, folder, bundled name; default the bundled shapes-dit)")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--radius", type=float, default=16)
    p.add_argument("--down-factor", type=int, default=None, help="add down-sampled global tokens (e.g. 4)")
    p.add_argument("--prompt", action="append", default=None, help="training prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line")
    p.add_argument("--num-samples", type=int, default=8, help="teacher samples to generate")
    p.add_argument("--sample-steps", type=int, default=None, help="teacher sampling steps")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optimizer", choices=CLEAR_OPTIMIZERS, default="adamw")
    p.add_argument("--mixed-precision", choices=CLEAR_PRECISIONS, default="no")
    p.add_argument("--dtype", default=None, help="load the model in float32 (default), bf16 or fp16")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.set_defaults(func=functools.partial(_run, "clear"))
    return p


# -------------------------------------------------------------------------------------------- the group
_BUILDERS = {"attencraft": add_attencraft_parser, "clear": add_clear_parser}


def _run(recipe: str, args: argparse.Namespace) -> int:
    """Import the recipe (torch, diffusers) only now that it runs."""
    module = importlib.import_module(f"attnedit.train.{recipe}")
    return module._cli(args)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train an adapter: " + ", ".join(RECIPES))
    recipes = p.add_subparsers(dest="recipe", required=True)
    for name in RECIPES:
        _BUILDERS[name](recipes)
