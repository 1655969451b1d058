"""The PyTorch backend of `attnedit.kernels.attention`: exact for every case, the fallback of every other backend.

SDPA (or xformers, on CUDA, for plain attention when installed), with region labels and CLEAR local
windows materialised as dense masks and ToDo's resampled keys/values built with `reference.py`.
Captured probabilities are exact (normalised over every key) and carry autograd. Registered as
"torch" with no constraints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import downsample_key_mask, downsample_kv, window_mask
from .registry import needs_grad, register_backend
from .types import KVDownsample, LocalWindow, RegionMask


def _combine_masks(
    mask: torch.Tensor | None, extra: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Combine a bool `extra` (True = keep) with an optional bool/additive mask -> additive."""
    neg = torch.finfo(dtype).min
    bias = torch.zeros(extra.shape, dtype=dtype, device=extra.device).masked_fill(~extra, neg)
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, neg)
    return (bias + mask.to(dtype)).clamp(min=neg)


def torch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    regions: RegionMask | None = None,
    downsample: KVDownsample | None = None,
    window: LocalWindow | None = None,
    capture: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch path: SDPA (or xformers) with masks materialised densely when needed."""
    if downsample is not None:
        n_keys = k.shape[1]
        k = downsample_kv(k, downsample)
        v = downsample_kv(v, downsample)
        if mask is not None and mask.shape[-1] == n_keys:  # a mask over the keys shrinks with them
            mask = downsample_key_mask(mask, downsample)
    n_q, n_k = q.shape[1], k.shape[1]
    keep: torch.Tensor | None = None
    if regions is not None:
        keep = regions.dense()  # (B, 1, Nq, Nk)
    if window is not None:
        wmask = window_mask(window, n_q, n_k, q.device)[None, None]
        keep = wmask if keep is None else keep & wmask
    attn_mask = mask
    if keep is not None:
        attn_mask = _combine_masks(mask, keep, q.dtype)
    if capture is None and attn_mask is None and _xformers is not None and q.is_cuda:
        return _xformers.memory_efficient_attention(q, k, v, scale=scale), None
    probs = None
    if capture is not None and _fused_lse_applies(q, k, v, attn_mask):
        out, probs = _capture_with_fused_lse(q, k, v, scale, attn_mask, capture)
    else:
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
        ).transpose(1, 2)
        # The output stays SDPA's (identical to an uncaptured call); captured probabilities come from
        # explicit logits normalised over every key (autograd flows through them for guidance).
        if capture is not None:
            probs = _captured_probs(q, k, scale, attn_mask, capture)
    if keep is not None:
        # Rows with no allowed key: the additive finfo.min bias gives them a uniform softmax;
        # the contract is zeros, for the output and the probabilities alike.
        empty = ~keep.any(-1)  # (B|1, 1, Nq)
        if bool(empty.any()):
            out = out.masked_fill(empty.transpose(1, 2).unsqueeze(-1), 0.0)
            if probs is not None:
                probs = probs.masked_fill(empty.transpose(1, 2), 0.0)
    return out, probs


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fused_lse_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """CPU fp32 without autograd: SDPA's own CPU kernel can return the log-sum-exp beside the output."""
    return (
        _CPU_FLASH is not None
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and not needs_grad(q, k, v)
        and (attn_mask is None or attn_mask.dtype == q.dtype)
    )


def _capture_with_fused_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    capture: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attention pass that also gives the probabilities of the captured keys.

    The output is the one `F.scaled_dot_product_attention` computes on the CPU (the same kernel, so
    bit-equal); the kernel's log-sum-exp normalises the logits of the captured keys only, instead of
    recomputing every logit and a second log-sum-exp beside SDPA (`_captured_probs`, the autograd path).
    """
    out, lse = _CPU_FLASH(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
                          attn_mask=attn_mask, scale=scale)[:2]
    cols = capture.to(k.device)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k.index_select(1, cols)) * s
    if attn_mask is not None:
        logits = logits + attn_mask[..., cols]
    probs = torch.exp(logits - lse.unsqueeze(-1))
    return out.transpose(1, 2), torch.nan_to_num(probs, nan=0.0).mean(dim=1)


def _captured_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float | None,
    attn_mask: torch.Tensor | None,
    capture: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged softmax probabilities (B, Nq, Nc) of the keys `capture`."""
    d = q.shape[-1]
    s = scale if scale is not None else d**-0.5
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * s
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logits[..., capture.to(logits.device)]
    probs = torch.exp(picked - lse)
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows -> zeros
    return probs.mean(dim=1)


try:  # optional: xformers for plain attention on CUDA
    import xformers.ops as _xformers  # type: ignore[import-not-found]
except Exception:  # pragma: no cover - not installed on CPU machines
    _xformers = None


register_backend("torch", run=torch_attention)
