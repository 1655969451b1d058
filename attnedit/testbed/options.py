"""The testbed recipes' command-line options, apart from the recipes (which import torch), so `--help` is
instant; `cli.py` mounts them under `attnedit testbed`, each recipe's own `main` parses with them.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util


def module_doc(module: str) -> str | None:
    """A module's docstring without importing it (the recipes import torch at the top)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    with open(spec.origin, encoding="utf-8") as fh:
        return ast.get_docstring(ast.parse(fh.read()))


def add_denoiser_args(ap: argparse.ArgumentParser, *, lr: float, threads: int) -> None:
    """The denoiser-stage options both recipes share (shapes-sd's UNet, shapes-dit's transformer)."""
    ap.add_argument("--steps", type=int, default=3000, help="denoiser + text encoder steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--every", type=int, default=500, help="sample grid + checkpoint period")
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--resume", action="store_true")



def train_parser(add_help: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnedit testbed train", description=module_doc("attnedit.testbed.train"),
                                 add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/models/shapes-sd", help="pipeline folder to write")
    ap.add_argument("--work", default="/tmp/testbed-work", help="checkpoints, sample grids, log")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=int, default=8000, help="pre-rendered training images")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--vae-crop", type=int, default=64, help="train the VAE on random crops of this size")
    ap.add_argument("--vae-init", default=None,
                    help="start the VAE from a checkpoint of this script, or from a pipeline folder's vae")
    ap.add_argument("--vae-latent-noise", type=float, default=0.1,
                    help="noise added to the latents the decoder trains on, relative to their spread")
    ap.add_argument("--vae-decoder-only", action="store_true",
                    help="train only the decoder (the encoder and so the latent space stay as in --vae-init)")
    ap.add_argument("--install-vae-into", default=None, metavar="FOLDER",
                    help="write the --vae-init VAE into a trained pipeline folder (same encoder) and stop")
    ap.add_argument("--vae-only", action="store_true",
                    help="train the VAE, write WORK/vae.pt (for --vae-init here and in train_dit) and stop")
    ap.add_argument("--vae-whiten", action="store_true",
                    help="fold per-channel latent mean/std of the training images into the VAE (exact)")
    add_denoiser_args(ap, lr=6e-4, threads=2)
    ap.add_argument("--text-layers", type=int, default=0,
                    help="text encoder transformer layers (default 0, as shipped: each token's state is its own word)")
    ap.add_argument("--text-init", default=None, metavar="CHECKPOINT",
                    help="a text encoder of `attnedit testbed pretrain-text`: used frozen (its layers, its words)")
    ap.add_argument("--caption-keep", type=float, default=1.0,
                    help="share of training captions in the world's standard form; the rest vary in form "
                         "(colour left out, order, 'there is'); default 1 = standard captions only, as shipped")
    ap.add_argument("--min-snr", type=float, default=5.0,
                    help="Min-SNR-gamma loss weighting (default 5: the paper's value, as shipped; 0 = uniform)")
    ap.add_argument("--ground-weight", type=float, default=0.0,
                    help="weight of the loss putting each shape noun's cross-attention on its object "
                         "(testbed/grounding.py; 0 = off, as shipped shapes-sd)")
    ap.add_argument("--sink-weight", type=float, default=0.0,
                    help="weight of the loss giving background positions' cross-attention to the start token "
                         "(0 = off)")
    ap.add_argument("--summary-drop", type=float, default=0.0,
                    help="probability per training caption of replacing the end token's and the padding's states "
                         "by the empty caption's, so the words, not the causal encoder's summary, must carry the "
                         "objects (0 = off)")
    ap.add_argument("--unet-init", default=None, metavar="FOLDER",
                    help="start the UNet from this pipeline folder's unet (same architecture), e.g. shapes-sd")
    return ap



def train_dit_parser(add_help: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnedit testbed train-dit",
                                 description=module_doc("attnedit.testbed.train_dit"), add_help=add_help,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="assets/models/shapes-dit", help="pipeline folder to write")
    ap.add_argument("--work", default="/tmp/testbed-dit", help="checkpoints, sample grids, log")
    ap.add_argument("--vae-init", required=True, help="VAE checkpoint of `train --vae-only` (shared with shapes-sd)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=int, default=8000, help="pre-rendered training images")
    add_denoiser_args(ap, lr=1e-3, threads=1)
    return ap


def pretrain_text_parser(add_help: bool = True) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="attnedit testbed pretrain-text", description=module_doc("attnedit.testbed.clip"),
                                 add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/testbed-text/text.pt", help="text encoder checkpoint to write")
    ap.add_argument("--text-layers", type=int, default=2, help="causal transformer layers of the text encoder")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--data", type=int, default=8000, help="pre-rendered world images")
    ap.add_argument("--keep", type=float, default=0.4, help="share of captions in the world's standard form")
    ap.add_argument("--pad-weight", type=float, default=0.0,
                    help="weight of a loss keeping the states after the end token caption-free (0 = off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    return ap
