"""Pretrain a testbed text encoder the way Stable Diffusion's was made: contrastively against images.

    attnedit testbed pretrain-text --text-layers 2 --steps 2000 --out /tmp/tb/text.pt

Why: shapes-sd's text encoder has no transformer layers (a jointly trained one moved each object's
description into later tokens), so a noun never sees its adjective and cross-attention is nearly flat
over the prompt. SD's CLIP text encoder is a causal transformer trained against images and frozen while
the UNet learns, so every token's state carries what the words before it say ("a red circle": the
noun's output knows it is red) and the UNet can read objects off their nouns. This recipe gives the
testbed the same: a `CLIPTextModel` (causal mask, final layer norm, start/end tokens) trained with a
symmetric InfoNCE loss (captions vs a small image encoder, captions that are equal count as positives)
on world images whose captions vary in form (colour sometimes left out, objects in either order,
"there is ...", colour after the noun), so nouns, not colours, must carry object identity. The result
(`--out`, the text encoder's state and the tokenizer's extra words) is read by `attnedit testbed train
--text-init`, which freezes it while the UNet trains.

`probe` measures what the issue asks of the text side before any UNet is trained: whether a noun's
output state tells its colour (a linear probe on held-out colour/shape combinations; chance 1/6).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .world import COLOURS, PLURALS, SHAPES, VOCABULARY, Scene

#: words the varied captions add to the world's vocabulary (each one token)
EXTRA_WORDS: tuple[str, ...] = ("there", "is", "are", "that", "with")


def vocabulary() -> tuple[str, ...]:
    return (*VOCABULARY, *EXTRA_WORDS)


def _groups(scene: Scene) -> list[tuple[int, str, str]]:
    """(count, colour, shape) groups of a scene's objects, in order of first appearance."""
    counts = Counter(o.label for o in scene.objects)
    seen: list[tuple[str, str]] = []
    for o in scene.objects:
        if o.label not in seen:
            seen.append(o.label)
    return [(counts[label], label[1], label[0]) for label in seen]


def _noun(count: int, colour: str | None, shape: str, after: bool = False) -> str:
    head = {1: "a", 2: "two", 3: "three"}[count]
    name = PLURALS[shape] if count > 1 else shape
    if colour is None:
        return f"{head} {name}"
    if after:
        return f"{head} {name} that {'are' if count > 1 else 'is'} {colour}"
    return f"{head} {colour} {name}"


def varied_caption(scene: Scene, rng: np.random.Generator, keep: float = 0.4) -> str:
    """A caption of `scene` in one of several forms (`keep`: share left in the world's standard form)."""
    if rng.random() < keep:
        return scene.caption
    groups = _groups(scene)
    drop = rng.random() < 0.35  # leave some colours out: the noun alone must name the object
    after = rng.random() < 0.2
    nouns = [_noun(n, None if drop and rng.random() < 0.6 else c, s, after and len(groups) == 1)
             for n, c, s in groups]
    if scene.relations and len(nouns) == 2:
        text = f"{nouns[0]} {scene.relations[0].relation} {nouns[1]}"
    else:
        if len(nouns) > 1 and rng.random() < 0.5:
            nouns = [nouns[i] for i in rng.permutation(len(nouns))]
        text = nouns[0] if len(nouns) == 1 else ", ".join(nouns[:-1]) + " and " + nouns[-1]
    if rng.random() < 0.2:
        many = groups[0][0] > 1 and not (scene.relations and len(nouns) == 2)
        text = f"there {'are' if many else 'is'} {text}"
    return text


class ImageEncoder(torch.nn.Module):
    """A small CNN: 64x64 RGB -> one embedding (the image side of the contrastive objective)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        chans = (3, 32, 64, 128, 128)
        layers: list[torch.nn.Module] = []
        for a, b in itertools.pairwise(chans):
            layers += [torch.nn.Conv2d(a, b, 3, stride=2, padding=1), torch.nn.GroupNorm(8, b), torch.nn.SiLU()]
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(128 * 4 * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, captions: list[str], scale: torch.Tensor):
    """Symmetric InfoNCE where every pair with the same caption is a positive (no false negatives)."""
    t, i = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    logits = scale.exp() * t @ i.t()
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target.t())) / 2


def build_text(vocab_size: int, layers: int, seed: int = 0):
    from .train import build_models

    return build_models(vocab_size, seed, layers)[1]


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Train the text encoder (and a throwaway image encoder) contrastively; write `args.out`."""
    from tqdm import tqdm

    from .train import Dataset, build_tokenizer, lr_at, tokenize

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    tok = build_tokenizer(vocabulary())
    text = build_text(len(tok), args.text_layers, args.seed)
    image_enc = ImageEncoder(text.config.hidden_size)
    proj = torch.nn.Linear(text.config.hidden_size, text.config.hidden_size, bias=False)
    scale = torch.nn.Parameter(torch.tensor(float(np.log(10.0))))
    data = Dataset(args.seed + 1, args.data)  # another world seed than the UNet's data
    scenes_rng = np.random.default_rng(args.seed)
    from .world import World

    world = World(seed=args.seed + 1)
    scenes = [world.scene(i) for i in range(args.data)]
    params = [*text.parameters(), *image_enc.parameters(), *proj.parameters(), scale]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    losses = []
    for step in tqdm(range(args.steps), desc="text", mininterval=5):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 100)
        idx = torch.randint(len(data), (args.batch,), generator=gen)
        x, _ = data.batch(idx)
        caps = [varied_caption(scenes[i], scenes_rng, args.keep) for i in idx.tolist()]
        ids = tokenize(tok, caps)
        out = text(ids)
        loss = contrastive_loss(proj(out.pooler_output), image_enc(x), caps, scale)
        if args.pad_weight > 0:
            loss = loss + args.pad_weight * padding_loss(text, tok, ids, out.last_hidden_state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            scale.clamp_(0, float(np.log(100.0)))
        losses.append(float(loss.detach()))
    text.eval()
    with torch.no_grad():
        ids = tokenize(tok, ["a red circle and a blue square", "a green star and a yellow ring"])
        last = text(ids).last_hidden_state[:, -1]
    padding_spread = float((last[0] - last[1]).norm() / last[0].norm())
    result = {"steps": args.steps, "layers": args.text_layers, "pad_weight": args.pad_weight,
              "padding_difference": padding_spread, "final_loss": float(np.mean(losses[-50:])),
              "first_loss": float(np.mean(losses[:50])), "wall_s": round(time.time() - t0, 1),
              "probe": probe(text, tok), "extra_words": list(EXTRA_WORDS)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"text": text.state_dict(), "config": text.config.to_dict(), **result}, args.out)
    return result


def padding_loss(text, tok, ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the states after each caption's end token to the empty caption's states there.

    Why: in a causal encoder the padding positions see the whole caption, and a UNet trained on it reads the
    caption from them instead of from the words (measured: benchmarks/results/text_attention-trial-clip-*.md).
    Pulled to the empty caption's (detached) states, the padding stays a constant, caption-free sink, as
    the shipped layer-less encoder's is.
    """
    from .train import tokenize

    with torch.no_grad():
        empty = text(tokenize(tok, [""])).last_hidden_state  # (1, L, D)
    end = (ids == tok.eos_token_id).int().argmax(1)  # first end token of each caption
    after = torch.arange(ids.shape[1])[None] > end[:, None]
    if not after.any():
        return states.sum() * 0.0
    return (states - empty).pow(2).mean(-1)[after].mean()


@torch.no_grad()
def probe(text, tok, seed: int = 0) -> dict[str, float]:
    """What a noun's output state knows: accuracy of a linear probe reading its colour (chance 1/6), fitted
    on the second noun of two-object captions and scored on held-out (colour, shape, context) combinations."""
    from .train import tokenize

    rows, colours = [], []
    for c1 in COLOURS:
        for s1 in SHAPES:
            for c2 in COLOURS:
                for s2 in SHAPES:
                    if (c1, s1) == (c2, s2):
                        continue
                    rows.append(f"a {c1} {s1} and a {c2} {s2}")
                    colours.append(COLOURS.index(c2))
    ids = tokenize(tok, rows)
    states = text(ids).last_hidden_state  # (N, L, D)
    noun_at = 7  # <start> a c1 s1 and a c2 [s2]
    feats = states[:, noun_at].float()
    labels = torch.tensor(colours)
    rng = np.random.default_rng(seed)
    order = torch.from_numpy(rng.permutation(len(rows)))
    cut = int(0.7 * len(rows))
    train, test = order[:cut], order[cut:]
    mean, std = feats[train].mean(0), feats[train].std(0) + 1e-6
    feats = (feats - mean) / std
    with torch.enable_grad():
        w = torch.zeros(feats.shape[1], len(COLOURS), requires_grad=True)
        b = torch.zeros(len(COLOURS), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(feats[train] @ w + b, labels[train]) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    acc = float(((feats[test] @ w + b).argmax(1) == labels[test]).float().mean())
    return {"noun_colour_probe_accuracy": acc, "chance": 1 / len(COLOURS), "held_out": len(test)}


def main(argv: list[str] | None = None) -> int:
    from .options import pretrain_text_parser

    result = pretrain(pretrain_text_parser().parse_args(argv))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
