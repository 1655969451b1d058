"""CLEAR: local attention for DiTs (Liu, Tan, Wang, arXiv 2412.16112; NeurIPS 2025).

CLEAR lets each image query of FLUX attend only to image keys inside a circle of `radius` tokens
on the 2-D grid (strict (dy^2 + dx^2) < r^2), while text stays global (every query sees all text
keys, text queries see everything); an optional global branch appends (H/df)(W/df) down-sampled
image keys/values (a trainable df x df weighted sum per layer, `spatial_weight`, over the post-norm,
post-RoPE keys) that only image queries see. The pretrained model expects global attention, so the
image-stream q/k/v/out projections (and the spatial weights) are distilled from the full-attention
teacher (`attnedit train clear`, `attnedit/train/clear.py`). Differences from the official code
(Huage001/CLEAR): the text length is read per call (the official hard-codes 512); the mask is a
description (`LocalWindow`) or a block mask cached per (grid, text length, radius, df), so any
resolution works without re-creating processors; one processor serves FLUX, SD3 ([image | text])
and PixArt; the attention runs on attnedit's 2-D-tiled Triton kernel on CUDA, FlexAttention with a
block mask (`backend="flex"`, and always for the down-sampled variant on CUDA), or a dense-mask
reference on the CPU; border cells of grids not divisible by df are padded by replication instead
of requiring divisible sizes; adapters carry the model's config hash and a weight fingerprint so
loading one on another model is a clear error, not silent garbage.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .. import kernels
from ..controls import PHASES, CallContext, Control, Example, register
from ..kernels.types import LocalWindow
from ..selectors import Select

if TYPE_CHECKING:
    from ..controller import Run
    from ..pipeline import EditPipeline

__all__ = ["CLEAR", "ClearWeights"]  # adapters: attnedit.methods.clear.load_adapter / save_adapter

BACKENDS = ("auto", "kernels", "flex", "dense")
DEFAULT_RADIUS = 16
ADAPTER_FORMAT = "attnedit-clear"
ADAPTER_VERSION = "1"
# image-stream projections the distillation trains (official: names containing these)
TRAINABLE_PROJ = (".to_q.", ".to_k.", ".to_v.", ".to_out.")
_SPATIAL_PREFIX = "spatial."
_MASK_CACHE_SIZE = 16


# ------------------------------------------------------------------------------------ weights
class ClearWeights(torch.nn.Module):
    """The per-layer df x df `spatial_weight`s of the down-sampled global tokens (init 1/df^2).

    A plain `nn.Module`, so `.to()`, `state_dict()` and optimisers treat it as usual; `attach`
    registers it on a denoiser (as `attnedit_clear`) so it follows `pipe.to(...)`. A loaded adapter
    always attaches one (empty when the student has no down-sampled tokens) carrying its radius:
    `CLEAR()` with default radius and down_factor then runs the adapter's window.
    """

    def __init__(self, layers: list[str], down_factor: int | None, radius: float | None = None) -> None:
        super().__init__()
        self.down_factor = None if down_factor is None else int(down_factor)
        self.radius = radius  # set when the weights come from an adapter: the radius they were trained for
        params = {}
        if self.down_factor is not None:
            init = torch.full((self.down_factor, self.down_factor), 1.0 / self.down_factor**2)
            params = {_key(n): torch.nn.Parameter(init.clone()) for n in sorted(layers)}
        self.weights = torch.nn.ParameterDict(params)

    @property
    def layers(self) -> list[str]:
        return [k.replace("__", ".") for k in self.weights]

    def of(self, layer: str) -> torch.nn.Parameter:
        if _key(layer) not in self.weights:
            raise ValueError(
                f"CLEAR has no spatial weight for layer {layer!r}; it has {len(self.weights)} layers, "
                f"e.g. {', '.join(self.layers[:3])}"
            )
        return self.weights[_key(layer)]

    def attach(self, denoiser: torch.nn.Module) -> None:
        denoiser.add_module("attnedit_clear", self)


def _key(layer: str) -> str:
    return layer.replace(".", "__")


def pool_image(x: torch.Tensor, grid: tuple[int, int], weight: torch.Tensor) -> torch.Tensor:
    """Weighted df x df pooling of image tokens x (B, H*W, heads, d) -> (B, ceil(H/df)*ceil(W/df), heads, d).

    Partial border cells are padded by replicating the last row/column (so average-pooling
    weights stay an average there).
    """
    b, _, nh, d = x.shape
    h, w = grid
    df = weight.shape[0]
    img = x.reshape(b, h, w, nh * d).permute(0, 3, 1, 2)
    ph, pw = (-h) % df, (-w) % df
    if ph or pw:
        img = F.pad(img.float(), (0, pw, 0, ph), mode="replicate").to(x.dtype)
    oh, ow = (h + ph) // df, (w + pw) // df
    cells = img.reshape(b, nh * d, oh, df, ow, df)
    pooled = torch.einsum("bcyixj,ij->byxc", cells, weight.to(x.device, x.dtype))
    return pooled.reshape(b, oh * ow, nh, d)


# -------------------------------------------------------------------------------------- masks
def tile_order(grid: tuple[int, int], tile: tuple[int, int] | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Row-major image token indices re-ordered tile by tile (th x tw tiles, row-major inside each).

    FlexAttention skips work per 128 x 128 block of the sequence; in row-major order a block of
    128 queries is a thin strip of rows and touches ~2r rows of keys, while 8 x 16 tiles make each
    block a compact patch (performance-anchors.md §8: 4096^2, r = 16: 11.7 % -> 2.7 % of the blocks).
    """
    h, w = grid
    idx = torch.arange(h * w, device=device)
    if tile is None:
        return idx
    th, tw = tile
    y, x = idx // w, idx % w
    key = (((y // th) * (-(-w // tw)) + x // tw) * th + y % th) * tw + x % tw
    return idx[torch.argsort(key)]


def _layout(
    grid: tuple[int, int],
    text_len: int,
    text_first: bool,
    n_pool: int,
    device: torch.device | str,
    tile: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key position: kind (0 text, 1 image, 2 pooled) and grid row/column of image tokens
    (image tokens in `tile_order` when `tile` is given)."""
    h, w = grid
    n_img = h * w
    idx = tile_order(grid, tile, device)
    kinds = [torch.ones(n_img, dtype=torch.int32, device=device)]
    ys, xs = [idx // w], [idx % w]
    text = (torch.zeros(text_len, dtype=torch.int32, device=device), torch.zeros(text_len, dtype=torch.long,
                                                                                  device=device))
    if text_first:
        kinds.insert(0, text[0])
        ys.insert(0, text[1])
        xs.insert(0, text[1])
    else:
        kinds.append(text[0])
        ys.append(text[1])
        xs.append(text[1])
    kinds.append(torch.full((n_pool,), 2, dtype=torch.int32, device=device))
    zeros = torch.zeros(n_pool, dtype=torch.long, device=device)
    ys.append(zeros)
    xs.append(zeros)
    return torch.cat(kinds), torch.cat(ys).int(), torch.cat(xs).int()


def clear_mask(
    grid: tuple[int, int],
    radius: float,
    text_len: int = 0,
    *,
    text_first: bool = True,
    n_pool: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Dense (Nq, Nk) bool mask of CLEAR (reference and small sizes).

    Queries are [text | image] (or [image | text]); keys are the same plus `n_pool` down-sampled
    tokens at the end. Image queries see text, their disk and every pooled token; text queries see
    text and all full-resolution image tokens but no pooled token.
    """
    kind, ys, xs = _layout(grid, text_len, text_first, n_pool, device)
    n_q = kind.shape[0] - n_pool
    kq, yq, xq = kind[:n_q, None], ys[:n_q, None], xs[:n_q, None]
    kk, yk, xk = kind[None], ys[None], xs[None]
    local = ((yq - yk) ** 2 + (xq - xk) ** 2).float() < float(radius) ** 2
    image_q = (kk == 0) | (kk == 2) | ((kk == 1) & local)
    return torch.where(kq == 0, kk != 2, image_q)


_BLOCK_MASKS: OrderedDict[tuple, Any] = OrderedDict()
_COMPILED_FLEX: dict[str, Any] = {}


def flex_available() -> bool:
    """FlexAttention can run here (PyTorch >= 2.5; compiled on CUDA, eager elsewhere)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def block_mask(
    grid: tuple[int, int],
    radius: float,
    text_len: int,
    text_first: bool,
    n_pool: int,
    device: torch.device,
    tile: tuple[int, int] | None = None,
):
    """FlexAttention `BlockMask` of CLEAR, cached per (grid, radius, text length, order, pooled, tile, device).

    With `tile`, image tokens are expected in `tile_order(grid, tile)` (the caller permutes them).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    key = (tuple(grid), float(radius), int(text_len), bool(text_first), int(n_pool), tile, str(device))
    hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        _BLOCK_MASKS.move_to_end(key)
        return hit
    kind, ys, xs = _layout(grid, text_len, text_first, n_pool, device, tile)
    r2 = float(radius) ** 2
    n_k = kind.shape[0]
    n_q = n_k - n_pool

    def mask_mod(b, h, q_idx, kv_idx):
        kq, kk = kind[q_idx], kind[kv_idx]
        dy = ys[q_idx] - ys[kv_idx]
        dx = xs[q_idx] - xs[kv_idx]
        local = (dy * dy + dx * dx).float() < r2
        image_q = (kk == 0) | (kk == 2) | ((kk == 1) & local)
        return torch.where(kq == 0, kk != 2, image_q)

    compile_mask = torch.device(device).type == "cuda"
    mask = create_block_mask(mask_mod, None, None, n_q, n_k, device=device, _compile=compile_mask)
    _BLOCK_MASKS[key] = mask
    if len(_BLOCK_MASKS) > _MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return mask


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float | None) -> torch.Tensor:
    """FlexAttention on BSHD tensors (compiled once per process on CUDA; eager on the CPU)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if q.is_cuda:
        fn = _COMPILED_FLEX.get("cuda")
        if fn is None:
            fn = torch.compile(flex, dynamic=False)
            _COMPILED_FLEX["cuda"] = fn
        return fn(*args, block_mask=mask, scale=scale).transpose(1, 2)
    with warnings.catch_warnings():  # eager (unfused) flex: fine for the CPU reference sizes it serves
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex(*args, block_mask=mask, scale=scale).transpose(1, 2)


# ------------------------------------------------------------------------------------ control
def _check_radius(radius: object) -> float:
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius <= 0:
        raise ValueError(f"CLEAR radius must be a positive number of tokens, got {radius!r}")
    return float(radius) if not float(radius).is_integer() else int(radius)


@register
class CLEAR(Control):
    """Local attention on the image grid of a DiT, text global (CLEAR).

    - `radius`: window radius in tokens (strict (dy^2 + dx^2) < r^2); 8, 16 or 32 in the paper.
      Default: the loaded adapter's radius (`attnedit.load(..., clear=path)`), else 16.
    - `down_factor`: int >= 2 adds the down-sampled global tokens (trainable `spatial_weight`s,
      kept in `self.weights`, a `ClearWeights` module); None = plain local window; "auto"
      (default) = the loaded adapter's, else None.
    - `backend`: "auto" (Triton kernel on CUDA when it takes the case, else the reference; the
      down-sampled variant uses FlexAttention on CUDA), "kernels", "flex" or "dense".
    - `proportional`: scale logits by sqrt(log N_kv / log train_len) (high-resolution recipe).
    - `tile`: FlexAttention path only: image tokens are re-ordered into (rows, cols) tiles so the
      128 x 128 blocks FlexAttention skips are compact patches (None = row-major order).
    Without distilled weights the output differs from the model's (train with `attnedit train clear`,
    load with `attnedit.load(..., clear=path)`).

    >>> pipe = attnedit.load("tiny-flux")
    >>> result = pipe("a red circle", controls=[attnedit.CLEAR(radius=2)])
    """

    name = "clear"
    phases = PHASES
    requires = ("dit",)
    unsupported = "it needs one image-token grid per layer (a DiT); on UNets ToDo or AgentAttention speed attention up"

    @classmethod
    def example(cls) -> Example:
        return Example(options={"radius": 2})

    def __init__(
        self,
        radius: float | None = None,
        down_factor: int | str | None = "auto",
        *,
        backend: str = "auto",
        proportional: bool = False,
        train_len: int = 4608,
        tile: tuple[int, int] | None = (8, 16),
        weights: ClearWeights | None = None,
        layers: Select | None = None,
        steps=None,
    ) -> None:
        super().__init__(layers=layers, steps=steps)
        self._given = (radius, down_factor)
        self.radius = DEFAULT_RADIUS if radius is None else _check_radius(radius)
        if down_factor is not None and down_factor != "auto":
            if isinstance(down_factor, bool) or not isinstance(down_factor, int) or down_factor < 2:
                raise ValueError(f"CLEAR down_factor must be an integer >= 2, None or 'auto', got {down_factor!r}")
        self.down_factor = None if down_factor == "auto" else down_factor
        if backend not in BACKENDS:
            raise ValueError(f"unknown CLEAR backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self.proportional = bool(proportional)
        if isinstance(train_len, bool) or not isinstance(train_len, int) or train_len < 2:
            raise ValueError(f"train_len must be an integer >= 2, got {train_len!r}")
        self.train_len = train_len
        if tile is not None:
            tile = tuple(tile)
            if len(tile) != 2 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tile):
                raise ValueError(f"tile must be two integers >= 1 (rows, columns) or None, got {tile!r}")
        self.tile = tile
        if weights is not None and weights.down_factor != self.down_factor:
            raise ValueError(
                f"weights were made for down_factor={weights.down_factor}, the control has down_factor={down_factor}"
            )
        self.weights = weights
        self._user_weights = weights is not None

    def default_layers(self) -> Select:
        return Select(kind=("self", "joint"))

    def setup(self, run: Run) -> None:
        denoiser = run.family.denoiser
        attached = getattr(denoiser, "attnedit_clear", None)
        attached = attached if isinstance(attached, ClearWeights) else None
        radius, down_factor = self._given
        self.radius = DEFAULT_RADIUS if radius is None else _check_radius(radius)
        self.down_factor = None if down_factor == "auto" else down_factor
        if attached is not None and attached.radius is not None:  # a loaded student: defaults follow it
            if radius is None:
                self.radius = attached.radius
            if down_factor == "auto":
                self.down_factor = attached.down_factor
        if not self._user_weights:
            self.weights = None  # resolved again on every run: the model's attached weights or fresh ones
        if self.down_factor is not None:
            if self.weights is None:
                if (attached is not None and attached.down_factor == self.down_factor
                        and set(attached.layers) >= set(self.selected_layers)):
                    self.weights = attached
                else:
                    param = next(denoiser.parameters())
                    self.weights = ClearWeights(sorted(self.selected_layers), self.down_factor).to(param.device)
            device = next(denoiser.parameters()).device
            if next(self.weights.parameters()).device != device:
                self.weights.to(device)  # follow the model (in place: optimisers keep their parameters)
            missing = sorted(set(self.selected_layers) - set(self.weights.layers))
            if missing:
                raise ValueError(f"CLEAR weights lack layer {missing[0]!r} ({len(missing)} missing)")

    def options(self) -> dict[str, Any]:
        out = super().options()
        out["weights"] = None if self.weights is None else f"{len(self.weights.weights)} layers"
        return out

    def to(self, *args, **kwargs) -> CLEAR:
        """Move the spatial weights (like `nn.Module.to`); returns self."""
        if self.weights is not None:
            self.weights.to(*args, **kwargs)
        return self

    # --------------------------------------------------------------------------------- hooks
    def _geometry(self, ctx: CallContext, n_k: int) -> tuple[int, bool]:
        text = ctx.text
        text_len = 0 if text is None else text.stop - text.start
        text_first = ctx.image.start > 0
        if text_len + ctx.n_image != n_k:
            raise RuntimeError(
                f"CLEAR on {ctx.layer.name}: {n_k} keys are not text ({text_len}) + image ({ctx.n_image}) tokens"
            )
        return text_len, text_first

    def _scale(self, d: int, n_kv: int) -> float | None:
        if not self.proportional:
            return None
        return d**-0.5 * math.sqrt(math.log(n_kv) / math.log(self.train_len))

    def window(self, ctx: CallContext) -> LocalWindow | None:
        if self.down_factor is not None or self.backend in ("flex", "dense") or self.proportional:
            return None
        text_len, text_first = self._geometry(ctx, ctx.n_image + (0 if ctx.text is None else
                                                                  ctx.text.stop - ctx.text.start))
        return LocalWindow(grid=ctx.grid, radius=self.radius, text_len=text_len, text_first=text_first)

    def attend(
        self, ctx: CallContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        if self.down_factor is None and self.backend in ("auto", "kernels") and not self.proportional:
            return None  # the `window` description goes to the dispatch (Triton kernel on CUDA)
        keep = _key_mask(mask, k.shape[1], ctx)
        text_len, text_first = self._geometry(ctx, k.shape[1])
        n_pool = 0
        if self.down_factor is not None:
            img = ctx.image
            weight = self.weights.of(ctx.layer.name)
            k = torch.cat([k, pool_image(k[:, img], ctx.grid, weight)], dim=1)
            v = torch.cat([v, pool_image(v[:, img], ctx.grid, weight)], dim=1)
            n_pool = k.shape[1] - q.shape[1]
        scale = self._scale(q.shape[-1], k.shape[1])
        use_flex = self.backend == "flex" or (self.backend == "auto" and q.is_cuda and flex_available())
        if use_flex and keep is not None:
            _warn_flex_mask(ctx.layer.name)
            use_flex = False
        if use_flex:
            tile = self.tile
            if tile is None:
                bm = block_mask(ctx.grid, self.radius, text_len, text_first, n_pool, q.device)
                return flex_attention(q, k, v, bm, scale)
            img = ctx.image
            order = tile_order(ctx.grid, tile, q.device)
            perm = torch.arange(k.shape[1], device=q.device)
            perm[img] = order + img.start
            bm = block_mask(ctx.grid, self.radius, text_len, text_first, n_pool, q.device, tile)
            out = flex_attention(q[:, perm[: q.shape[1]]], k[:, perm], v[:, perm], bm, scale)
            restored = torch.empty_like(out)
            restored[:, perm[: q.shape[1]]] = out
            return restored
        dense = clear_mask(ctx.grid, self.radius, text_len, text_first=text_first, n_pool=n_pool, device=q.device)
        dense = dense[None, None]
        if keep is not None:  # padded text keys stay masked; the pooled keys (down_factor) are all valid
            dense = dense & torch.cat([keep, keep.new_ones(*keep.shape[:-1], n_pool)], dim=-1)
        return kernels.attention(q, k, v, scale=scale, mask=dense)


def _key_mask(mask: torch.Tensor | None, n_keys: int, ctx: CallContext) -> torch.Tensor | None:
    """The model's mask as a boolean keep-mask over keys (Qwen-Image's padded text), or a clear refusal."""
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if keep.dim() != 4 or keep.shape[1] != 1 or keep.shape[2] != 1 or keep.shape[-1] != n_keys:
        raise ValueError(f"CLEAR combines its window with a mask over keys only; layer {ctx.layer.name} got a mask "
                         f"of shape {tuple(mask.shape)}")
    return keep


_FLEX_WARNED: set[str] = set()


def _warn_flex_mask(layer: str) -> None:
    """FlexAttention's block mask has no per-batch key mask here: such calls take the dense path (same result)."""
    if not _FLEX_WARNED:
        warnings.warn(f"CLEAR: a call with the model's text mask (e.g. {layer}: prompts of different lengths) runs "
                      "the window densely instead of with FlexAttention (same result, more memory)", stacklevel=3)
    _FLEX_WARNED.add(layer)


# ------------------------------------------------------------------------------------ adapters
def config_hash(denoiser: torch.nn.Module) -> str:
    """Short hash of the denoiser's architecture config (private keys ignored)."""
    cfg = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    blob = json.dumps(cfg, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weight_fingerprint(denoiser: torch.nn.Module) -> list[float]:
    """Mean and std of frozen input/output embedding weights: tells same-architecture models apart."""
    out: list[float] = []
    for name, p in denoiser.named_parameters():
        if any(t in name for t in TRAINABLE_PROJ) or name.startswith("attnedit_clear"):
            continue
        if p.dim() >= 2:
            x = p.detach().float()
            out += [float(x.mean()), float(x.std())]
        if len(out) >= 6:
            break
    return out


def trainable_parameters(denoiser: torch.nn.Module, layers: list[str] | set[str]) -> dict[str, torch.nn.Parameter]:
    """The image-stream q/k/v/out projection parameters of `layers` (what CLEAR distils)."""
    layers = set(layers)
    picked = {}
    for name, p in denoiser.named_parameters():
        owner = name.split(".to_")[0] if ".to_" in name else None
        if owner in layers and any(t in name for t in TRAINABLE_PROJ):
            picked[name] = p
    return picked


def save_adapter(
    path: str | os.PathLike,
    denoiser: torch.nn.Module,
    clear: CLEAR,
    *,
    model_id: str = "",
    dtype: torch.dtype | None = None,
    extra: dict[str, str] | None = None,
) -> str:
    """Write the trained projections and spatial weights of `clear` as a safetensors adapter."""
    from safetensors.torch import save_file

    layers = sorted(clear.selected_layers) or sorted(
        n for n, m in denoiser.named_modules() if n.endswith(".attn") and hasattr(m, "to_q")
    )
    tensors = {}
    for name, p in trainable_parameters(denoiser, layers).items():
        t = p.detach()
        tensors[name] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
    if clear.weights is not None:
        for layer in clear.weights.layers:
            tensors[_SPATIAL_PREFIX + layer] = clear.weights.of(layer).detach().float().contiguous().cpu()
    meta = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "model_id": str(model_id),
        "model_class": type(denoiser).__name__,
        "config_hash": config_hash(denoiser),
        "fingerprint": json.dumps(weight_fingerprint(denoiser)),
        "radius": json.dumps(clear.radius),
        "down_factor": json.dumps(clear.down_factor),
        "layers": json.dumps(layers),
        **(extra or {}),
    }
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    return path


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a CLEAR adapter file (ValueError when it is not one)."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"CLEAR adapter {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise ValueError(f"{path!r} is not a safetensors file ({err})") from err
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path!r} is not an attnedit CLEAR adapter (format {meta.get('format')!r})")
    return tensors, meta


def check_adapter(denoiser: torch.nn.Module, meta: dict[str, str], path: str = "adapter") -> None:
    """ValueError when the adapter was distilled from another model than `denoiser`."""
    cls = type(denoiser).__name__
    if meta.get("model_class") != cls:
        raise ValueError(
            f"CLEAR adapter {path} was trained for a {meta.get('model_class')} "
            f"(model {meta.get('model_id') or '?'}), not this {cls}"
        )
    if meta.get("config_hash") != config_hash(denoiser):
        raise ValueError(
            f"CLEAR adapter {path} was trained for model {meta.get('model_id') or '?'} with config hash "
            f"{meta.get('config_hash')}; this {cls} has config hash {config_hash(denoiser)} (another architecture)"
        )
    want = json.loads(meta.get("fingerprint", "[]"))
    have = weight_fingerprint(denoiser)
    if want and (len(want) != len(have) or any(abs(a - b) > 1e-3 * max(1.0, abs(a)) for a, b in zip(want, have))):
        raise ValueError(
            f"CLEAR adapter {path} was distilled from model {meta.get('model_id') or '?'}: same architecture, but "
            "this model's frozen weights differ (another checkpoint); load it on the model it was trained from"
        )


def load_adapter(edit_pipe: EditPipeline, path: str | os.PathLike) -> CLEAR:
    """Load a distilled CLEAR student into `edit_pipe` (what `attnedit.load(..., clear=path)` calls).

    The projections are replaced in place, the spatial weights are attached to the denoiser (so
    they follow `pipe.to(...)`), and the CLEAR control becomes one of the pipeline's default
    controls, active in every `generate`.
    """
    if edit_pipe.family.arch != "dit":
        raise ValueError(f"CLEAR adapters apply to DiTs; {edit_pipe.model_name!r} is a {edit_pipe.family.label} UNet")
    denoiser = edit_pipe.denoiser
    tensors, meta = read_adapter(path)
    check_adapter(denoiser, meta, os.fspath(path))
    params = dict(denoiser.named_parameters())
    spatial = {k[len(_SPATIAL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_SPATIAL_PREFIX)}
    for name, t in tensors.items():
        if name.startswith(_SPATIAL_PREFIX):
            continue
        if name not in params:
            raise ValueError(f"CLEAR adapter {path} has parameter {name!r}, which this model lacks")
        if params[name].shape != t.shape:
            raise ValueError(f"CLEAR adapter {path}: {name} is {tuple(t.shape)}, the model's is "
                             f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            if not name.startswith(_SPATIAL_PREFIX):
                params[name].copy_(t.to(params[name].dtype))
    down_factor = json.loads(meta.get("down_factor", "null"))
    layers = json.loads(meta.get("layers", "[]"))
    radius = json.loads(meta["radius"])
    weights = ClearWeights(sorted(spatial), down_factor, radius=radius)
    with torch.no_grad():
        for layer, t in spatial.items():
            weights.of(layer).copy_(t)
    weights.to(next(denoiser.parameters()).device)
    weights.attach(denoiser)  # follows pipe.to(...); also tells the app and CLEAR() an adapter is loaded
    names = layers or None
    control = CLEAR(
        radius=radius,
        down_factor=down_factor,
        weights=weights if down_factor is not None else None,
        layers=Select(name=names) if names else None,
    )
    defaults = getattr(edit_pipe, "default_controls", None)
    if defaults is None:
        raise ValueError("this attnedit build's EditPipeline has no default controls; cannot activate CLEAR")
    defaults[:] = [c for c in defaults if not isinstance(c, CLEAR)] + [control]
    edit_pipe.clear = control
    return control
