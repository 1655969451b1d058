"""AttenCraft (Shentu et al., arXiv 2405.17965): several concepts learned from one image, kept apart by attention.

The paper personalises a text-to-image model on one image holding several concepts, one new token per concept.
Masks come from the model itself: at a noisy step, each concept token's cross-attention map is squared, min-max
normalised and propagated through a power of the self-attention affinity (a random walk over pixels); a pixel goes to
a concept (or the background, read from the start token) when that concept beats every other by a margin. During
training the masks supervise each token's cross-attention (Jensen-Shannon loss), restrict the denoising loss to the
concepts the prompt names, and are refreshed when the new ones are stable (SSIM gate). This file holds the mask
mathematics, the recording control used by the trainer (`attnedit.train.attencraft`) and the loader behind
`attnedit.load(model, concepts=path)`. Differences from the official code (junjie-shentu/AttenCraft): layers and
tokens are found by module name and tokenizer (not by call counting or hard-coded CLIP ids), any number of concepts
>= 2, retries instead of aborting when the first masks collide, only the maps the losses use are recorded (no
64x64 maps, no anomaly detection), a small SSIM in torch instead of scikit-image (window shrunk to fit small
grids), and a checkpoint that carries its own metadata (tokens, layers, base-model fingerprint) instead of path
names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..controls import CallContext, Control
from ..layers import LayerInfo

FORMAT = "attnedit-attencraft"
FORMAT_VERSION = 1
WEIGHTS_NAME = "concepts.safetensors"
META_NAME = "concepts.json"


# ------------------------------------------------------------------------------------------ mask mathematics
def minmax(x: torch.Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-8) -> torch.Tensor:
    """(x - min) / (max - min) over `dim` (all elements when None); constant inputs give zeros."""
    if dim is None:
        lo, hi = x.min(), x.max()
    else:
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(eps)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, C) maps -> (h, w, C) by bicubic interpolation (the official cross grid -> self grid step)."""
    if tuple(maps.shape[:2]) == tuple(size):
        return maps
    x = maps.permute(2, 0, 1).unsqueeze(0).float()
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)[0].permute(1, 2, 0)


def propagate(cross: torch.Tensor, affinity: torch.Tensor, power: int = 4) -> torch.Tensor:
    """P = minmax(minmax(S)^power, global) @ minmax(X^2) per channel, min-max normalised per channel.

    `cross` is (N, C) (one column per concept plus background), `affinity` the (N, N) self-attention of
    the same N pixels (row = query). Squaring sharpens each map before the random walk spreads it along
    the regions self-attention links together.
    """
    if affinity.shape != (cross.shape[0], cross.shape[0]):
        raise ValueError(f"affinity {tuple(affinity.shape)} does not match {cross.shape[0]} pixels of the maps")
    sharp = minmax(cross.float() ** 2, dim=0)
    walk = minmax(affinity.float())
    walk = minmax(torch.linalg.matrix_power(walk, int(power))) if power > 1 else walk
    return minmax(walk @ sharp, dim=0)


def margin_masks(scores: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """(N, C) scores -> (C, N) bool masks: pixel p is class c iff P_c(p) - P_c'(p) > margin for every c' != c."""
    if scores.shape[1] < 2:
        raise ValueError("margin masks need at least two classes")
    top2 = scores.topk(2, dim=1)
    sure = (top2.values[:, 0] - top2.values[:, 1]) > margin
    labels = torch.where(sure, top2.indices[:, 0], torch.full_like(top2.indices[:, 0], -1))
    return labels.unsqueeze(0) == torch.arange(scores.shape[1], device=scores.device).unsqueeze(1)


def match_masks(scores: torch.Tensor, masks: torch.Tensor) -> list[int]:
    """For each mask k the class c maximising sum_p P_c(p) M_k(p) (the official token matching)."""
    overlap = masks.float() @ scores.float()  # (C_masks, C_classes)
    return [int(i) for i in overlap.argmax(dim=1)]


@dataclass
class MaskResult:
    """Masks of one extraction: `masks` (C, H, W) float in {0, 1}, class order = concepts then background."""

    masks: torch.Tensor
    scores: torch.Tensor  # (C, H, W) propagated maps P
    matching: list[int]
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def extract_masks(
    cross: torch.Tensor,
    affinity: torch.Tensor,
    grid: tuple[int, int],
    *,
    power: int = 4,
    margin: float = 0.1,
    names: list[str] | None = None,
) -> MaskResult:
    """Concept masks from the model's own attention.

    `cross` (Hc, Wc, C): cross-attention maps, one channel per concept and the start token (background)
    last; `affinity` (N, N) self-attention at `grid` (N = H * W). Cross maps are upsampled to `grid`,
    propagated (`propagate`) and assigned by the margin rule; a problem (an empty mask, two masks claiming
    the same concept) is reported in `problem`, never raised, so callers can retry.

    >>> res = extract_masks(cross_maps, self_affinity, (32, 32))
    >>> res.ok, res.masks.shape   # (True, (3, 32, 32)) for two concepts
    """
    h, w = grid
    n_cls = cross.shape[-1]
    names = names or [f"concept {i}" for i in range(n_cls - 1)] + ["background"]
    x = upsample_maps(cross, (h, w)).reshape(h * w, n_cls)
    scores = propagate(x, affinity, power)
    masks = margin_masks(scores, margin)
    matching = match_masks(scores, masks)
    problem = None
    empty = [names[k] for k in range(n_cls) if not bool(masks[k].any())]
    if empty:
        problem = f"no pixel is assigned to {', '.join(empty)} (margin {margin})"
    else:
        seen: dict[int, int] = {}
        for k, c in enumerate(matching):
            if c in seen:
                problem = (f"the masks of {names[seen[c]]} and {names[k]} both match {names[c]}: "
                           "the attention maps do not separate them")
                break
            seen[c] = k
    ordered = masks.float()
    if problem is None:  # reorder so that channel c is the mask matched to class c
        inverse = {c: k for k, c in enumerate(matching)}
        ordered = ordered[[inverse[c] for c in range(n_cls)]]
    return MaskResult(ordered.reshape(n_cls, h, w), scores.T.reshape(n_cls, h, w), matching, problem)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7, data_range: float = 1.0) -> float:
    """Mean structural similarity of two (H, W) maps, as scikit-image's default (uniform window, sample covariance).

    The window shrinks to the largest odd size that fits grids smaller than `window` (scikit-image refuses them).
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"ssim needs two (H, W) maps of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    win = min(window, a.shape[0], a.shape[1])
    win -= 1 - win % 2
    if win < 1:
        raise ValueError("ssim needs maps of at least 1x1")
    x = torch.stack([a, b]).float().unsqueeze(1)  # (2, 1, H, W)
    pool = lambda t: F.avg_pool2d(t, win, stride=1)  # noqa: E731  valid region only, as skimage's crop
    mu = pool(x)
    mu_x, mu_y = mu[0], mu[1]
    n = win * win
    cov = n / (n - 1) if n > 1 else 1.0
    vx = cov * (pool(x[0:1] ** 2)[0] - mu_x**2)
    vy = cov * (pool(x[1:2] ** 2)[0] - mu_y**2)
    vxy = cov * (pool(x[0:1] * x[1:2])[0] - mu_x * mu_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * vxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def jsd(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Jensen-Shannon divergence of softmax(p / T) and softmax(q / T) over the last dim: H(m) - (H(p) + H(q)) / 2."""
    p = torch.softmax(p_logits.float() / temperature, dim=-1)
    q = torch.softmax(q_logits.float() / temperature, dim=-1)
    m = 0.5 * (p + q)

    def entropy(d: torch.Tensor) -> torch.Tensor:
        return -(d * torch.log(d.clamp_min(1e-12))).sum(-1)

    return entropy(m) - 0.5 * (entropy(p) + entropy(q))


# ------------------------------------------------------------------------------------ recording control
def map_levels(layers: list[LayerInfo], latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(cross level, self level): the official latent/4 and latent/2 (16 and 32 at 512 px), kept usable on small
    latents: the self grid stays >= 16 when a level allows it (else the finest level), and the cross grid is the
    official one only while it keeps >= 16 cells a side, else the self level itself.

    Why 16: on the 64 px testbed model (latent 16) the 8x8 maps blur the objects together (the map of "red" is
    0.15 on the grey background against 0.20 on the circle), while its 16x16 maps put each colour word and the
    start token (background) on their own regions, as SD's 16x16 maps do at 512 px
    (`benchmarks/attencraft_maps.py`)."""
    levels = sorted({i.level for i in layers if i.block in ("down", "up") and i.kind == "cross"})
    if not levels:
        raise ValueError("AttenCraft needs a UNet with cross-attention in its down/up blocks")
    side = min(latent_hw)

    def grid(level: int) -> int:
        return math.ceil(side / 2**level)

    self_level = max([lv for lv in levels if lv <= 1 and grid(lv) >= 16], default=levels[0])
    above = [lv for lv in levels if lv == self_level + 1 and grid(lv) >= 16]
    return (above[0] if above else self_level), self_level


class MapRecorder(Control):
    """Training-time control: keeps the cross maps the losses use (with gradient) and, on mask steps only,
    the self-attention affinity (without gradient); holds the start token's K/V fixed on every cross layer.

    It runs inside `Controller.pass_phase("guidance", step=0)`: training forwards use random timesteps, so the
    step is forced instead of tracked (the controller would otherwise take each new timestep for a new run).
    """

    name = "attencraft_recorder"
    phases = ("guidance",)

    def __init__(self, registry, cross_level: int, self_level: int, row: int = 0) -> None:
        cross_all = {i.name for i in registry if i.kind == "cross"}
        self.cross_names = {i.name for i in registry if i.kind == "cross" and i.level == cross_level
                            and i.block in ("down", "up")}
        self.self_names = {i.name for i in registry if i.kind == "self" and i.level == self_level
                           and i.block in ("down", "up")}
        wanted = cross_all | self.self_names
        super().__init__(layers=lambda info: info.name in wanted)
        self.row = row
        self.positions: torch.Tensor | None = None
        self.record_self = False
        self.detach_sot = True
        self.clear()

    def clear(self) -> None:
        """Forget the maps of the previous forward."""
        self.cross_sum: torch.Tensor | None = None
        self.cross_n = 0
        self.cross_grid: tuple[int, int] | None = None
        self.self_sum: torch.Tensor | None = None
        self.self_n = 0
        self.self_grid: tuple[int, int] | None = None

    def qkv(self, ctx: CallContext, q, k, v):
        if self.detach_sot and ctx.layer.kind == "cross":
            k = torch.cat([k[:, :1].detach(), k[:, 1:]], dim=1)
            v = torch.cat([v[:, :1].detach(), v[:, 1:]], dim=1)
        elif self.record_self and ctx.layer.name in self.self_names:
            self._add_affinity(ctx, q, k)
        return q, k, v

    @torch.no_grad()
    def _add_affinity(self, ctx: CallContext, q: torch.Tensor, k: torch.Tensor) -> None:
        """Head-averaged self-attention of the recorded row, head by head and outside the autograd graph
        (the captured-probability path would keep an N x N logit tensor per layer in the graph)."""
        qr, kr = q[self.row].float(), k[self.row].float()  # (N, H, D)
        scale = q.shape[-1] ** -0.5
        acc = torch.zeros(qr.shape[0], kr.shape[0], device=q.device)
        for h in range(qr.shape[1]):
            acc += torch.softmax(qr[:, h] @ kr[:, h].T * scale, dim=-1)
        acc /= qr.shape[1]
        self.self_sum = acc if self.self_sum is None else self.self_sum + acc
        self.self_n += 1
        self.self_grid = ctx.grid

    def capture(self, ctx: CallContext):
        if ctx.layer.name in self.cross_names and self.positions is not None:
            return self.positions
        return None

    def observe(self, ctx: CallContext, probs: torch.Tensor) -> None:
        m = probs[self.row]
        self.cross_sum = m if self.cross_sum is None else self.cross_sum + m
        self.cross_n += 1
        self.cross_grid = ctx.grid

    def cross_maps(self) -> torch.Tensor:
        """(Hc, Wc, len(positions)) mean over the recorded layers (carries the gradient)."""
        if self.cross_sum is None:
            raise RuntimeError("no cross-attention map was recorded in the last forward")
        h, w = self.cross_grid
        return (self.cross_sum / self.cross_n).reshape(h, w, -1)

    def affinity(self) -> torch.Tensor:
        if self.self_sum is None:
            raise RuntimeError("no self-attention map was recorded in the last forward")
        return self.self_sum / self.self_n


# ---------------------------------------------------------------------------------------- save / load
def model_fingerprint(pipe: Any) -> dict[str, Any]:
    """A few statistics of weights training never changes: tells two base models apart across dtypes."""
    unet = pipe.unet
    first = sorted(n for n, _ in unet.named_modules() if n.endswith("attn2"))[0]
    q = unet.get_submodule(first).to_q.weight.detach().float()
    emb = pipe.text_encoder.get_input_embeddings().weight.detach().float()[:256]
    return {
        "unet_class": type(unet).__name__,
        "cross_attention_dim": int(unet.config.cross_attention_dim),
        "block_out_channels": list(unet.config.block_out_channels),
        "text_hidden": int(emb.shape[1]),
        "to_q_stats": [float(q.mean()), float(q.std()), float(q.abs().max())],
        "embedding_stats": [float(emb.mean()), float(emb.std())],
    }


def _same_fingerprint(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    for key in ("unet_class", "cross_attention_dim", "block_out_channels", "text_hidden"):
        if a.get(key) != b.get(key):
            return f"{key} {a.get(key)} != {b.get(key)}"
    for key in ("to_q_stats", "embedding_stats"):
        for x, y in zip(a.get(key, []), b.get(key, [])):
            if not math.isclose(x, y, rel_tol=2e-2, abs_tol=1e-5):
                return f"weights differ ({key})"
    return None


def save_concepts(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `concepts.safetensors` + `concepts.json` into folder `path` (atomically: temp file, then rename)."""
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **meta}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"attencraft": json.dumps(meta)})
    tmp.replace(folder / WEIGHTS_NAME)
    tmp_meta = folder / (META_NAME + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    tmp_meta.replace(folder / META_NAME)
    return folder / WEIGHTS_NAME


def read_concepts(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a concepts folder or its `.safetensors` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix == ".json":
        p = p.parent
    weights = p / WEIGHTS_NAME if p.is_dir() else p
    if not weights.is_file():
        raise ValueError(f"no AttenCraft concepts at {p} (expected a folder with {WEIGHTS_NAME} or that file)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            raw = (f.metadata() or {}).get("attencraft")
        tensors = load_file(str(weights))
    except Exception as err:
        raise ValueError(f"cannot read {weights}: {err}") from err
    if raw is None and (weights.parent / META_NAME).is_file():
        raw = (weights.parent / META_NAME).read_text()
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{weights} is not an AttenCraft concepts file (format {meta.get('format')!r})")
    return meta, tensors


def load_concepts(edit_pipe: Any, path: str | Path) -> list[str]:
    """Add the learned concept tokens and K/V weights to a pipeline (what `attnedit.load(model, concepts=path)` does).

    Every check runs before anything changes, so a refused file leaves the pipeline as it was. The new tokens
    then work in any prompt and with every control (they are ordinary single tokens of the tokenizer).

    >>> pipe = attnedit.load("shapes-sd", concepts="runs/attencraft")
    >>> pipe("a <c0> and a <c1>", seed=0)
    """
    pipe = getattr(edit_pipe, "pipe", edit_pipe)
    meta, tensors = read_concepts(path)
    from ..families import family_of

    family = family_of(pipe)
    if meta.get("family") != family.name:
        raise ValueError(f"{path} holds concepts for a {meta.get('family')!r} model, this pipeline is "
                         f"{family.name!r}")
    differs = _same_fingerprint(meta.get("fingerprint", {}), model_fingerprint(pipe))
    if differs:
        raise ValueError(f"{path} was trained on another model ({meta.get('model')!r}; {differs}); "
                         f"load it into that model")
    tokens = list(meta["tokens"])
    pairs = family.text_encoders()
    embeddings = []
    for n, (tok, enc) in enumerate(pairs):
        clash = [t for t in tokens if t in tok.get_vocab()]
        if clash:
            raise ValueError(f"token(s) {', '.join(clash)} are already in the tokenizer (concepts loaded twice?)")
        key = "token_embeddings" if n == 0 else f"token_embeddings_{n + 1}"
        emb = tensors.get(key)
        if emb is None or emb.shape != (len(tokens), enc.get_input_embeddings().weight.shape[1]):
            shape = None if emb is None else tuple(emb.shape)
            raise ValueError(f"{key} {shape} does not fit {len(tokens)} tokens of text encoder {n + 1}")
        embeddings.append(emb)
    unet = family.denoiser
    modules = dict(unet.named_modules())
    updates: dict[str, torch.Tensor] = {}
    for layer in meta["layers"]:
        if layer not in modules:
            raise ValueError(f"layer {layer} of {path} is not in this UNet")
        attn = modules[layer]
        for proj in ("to_k", "to_v"):
            weight = getattr(attn, proj).weight
            key = f"{layer}.{proj}"
            if meta.get("train") == "lora":
                a, b = tensors[f"{key}.lora_A"], tensors[f"{key}.lora_B"]
                if (b.shape[0], a.shape[1]) != tuple(weight.shape):
                    raise ValueError(f"{key}: LoRA shape {tuple(b.shape)}x{tuple(a.shape)} does not fit "
                                     f"{tuple(weight.shape)}")
                delta = float(meta.get("lora_scale", 1.0)) * (b.float() @ a.float())
                updates[key] = weight.detach().float().cpu() + delta
            else:
                new = tensors[f"{key}.weight"]
                if tuple(new.shape) != tuple(weight.shape):
                    raise ValueError(f"{key}: weight {tuple(new.shape)} does not fit {tuple(weight.shape)}")
                updates[key] = new
    # all checks passed: change the pipeline
    for (tok, enc), emb in zip(pairs, embeddings):
        tok.add_tokens(tokens)
        ids = tok.convert_tokens_to_ids(tokens)
        table = enc.get_input_embeddings()
        if max(ids) >= table.weight.shape[0]:
            enc.resize_token_embeddings(len(tok))
            table = enc.get_input_embeddings()
        with torch.no_grad():
            table.weight[ids] = emb.to(table.weight)
    with torch.no_grad():
        for key, value in updates.items():
            layer, proj = key.rsplit(".", 1)
            weight = getattr(modules[layer], proj).weight
            weight.copy_(value.to(weight))
    loaded = list(getattr(edit_pipe, "concepts", []) or []) + tokens
    try:
        edit_pipe.concepts = loaded
    except AttributeError:
        pass
    return tokens


__all__ = ["MaskResult", "extract_masks", "load_concepts"]
