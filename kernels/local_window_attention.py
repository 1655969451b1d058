"""CLEAR's 2D local-window attention in Triton: 2D query tiles that visit only the key tiles they need.

Image query (y, x) attends image keys with dy^2 + dx^2 < radius^2 plus every text key; text
queries attend everything. FlexAttention tiles the row-major sequence in 128-token runs, so a
query tile is a thin strip whose disk touches ~2r full rows of key tiles. Here each program owns a
TQY x TQX patch of the image grid and walks TKY x TKX key patches over the bounding box of the
patch grown by the radius, computed on the fly from the tile coordinates (no per-tile list in
memory), skipping key patches whose nearest point is outside the disk. Text keys are one dense
1D loop; text query rows go through the plain flash kernel. Works with text first (FLUX) or last.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .flash_attention import (
    LOG2E,
    block_d_for,
    check_qkv,
    flash_attention,
    input_precision,
    last_dim_contiguous,
    load_cols,
    load_rows,
    mma,
    online_softmax_step,
    tiles,
    upcast_dots,
)
from .reference import window_mask
from .types import LocalWindow


@triton.jit
def _local_window_kernel(
    Q, K, V, O,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    n_heads, grid_h, grid_w, text_len, img_off, text_off, r2, reach, qk_scale,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, TQY: tl.constexpr, TQX: tl.constexpr,
    TKY: tl.constexpr, TKX: tl.constexpr, BLOCK_T: tl.constexpr, IN_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    tiles_x = tl.cdiv(grid_w, TQX)
    y0 = (pid_t // tiles_x) * TQY
    x0 = (pid_t % tiles_x) * TQX
    r = tl.arange(0, TQY * TQX)
    qy = y0 + r // TQX
    qx = x0 + r % TQX
    row_ok = (qy < grid_h) & (qx < grid_w)
    rows = img_off + qy * grid_w + qx
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_D

    q = load_rows(Q + b * sqb + h * sqh, rows, dims, sqs, row_ok, d_ok)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([TQY * TQX], float("-inf"), tl.float32)
    l_i = tl.zeros([TQY * TQX], tl.float32)
    acc = tl.zeros([TQY * TQX, BLOCK_D], tl.float32)

    # Text keys: dense for every image query.
    for t0 in range(0, text_len, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < text_len
        cols = text_off + t
        s = mma(q, load_cols(k_base, cols, dims, sks, t_ok, d_ok), IN_PREC, UPCAST) * qk_scale
        s = tl.where(row_ok[:, None] & t_ok[None, :], s, float("-inf"))
        v = load_rows(v_base, cols, dims, svs, t_ok, d_ok)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, V.dtype.element_ty, IN_PREC, UPCAST)

    # Image keys: key patches inside the query patch's bounding box grown by `reach`.
    y1 = tl.minimum(y0 + TQY, grid_h) - 1
    x1 = tl.minimum(x0 + TQX, grid_w) - 1
    ty_lo = tl.maximum(y0 - reach, 0) // TKY
    ty_hi = tl.minimum(y1 + reach, grid_h - 1) // TKY
    tx_lo = tl.maximum(x0 - reach, 0) // TKX
    tx_hi = tl.minimum(x1 + reach, grid_w - 1) // TKX
    c = tl.arange(0, TKY * TKX)
    for kty in range(ty_lo, ty_hi + 1):
        ky0 = kty * TKY
        ky1 = tl.minimum(ky0 + TKY, grid_h) - 1
        gap_y = tl.maximum(tl.maximum(ky0 - y1, y0 - ky1), 0)
        for ktx in range(tx_lo, tx_hi + 1):
            kx0 = ktx * TKX
            kx1 = tl.minimum(kx0 + TKX, grid_w) - 1
            gap_x = tl.maximum(tl.maximum(kx0 - x1, x0 - kx1), 0)
            if (gap_y * gap_y + gap_x * gap_x).to(tl.float32) < r2:  # patch corner inside the disk
                ky = ky0 + c // TKX
                kx = kx0 + c % TKX
                col_ok = (ky < grid_h) & (kx < grid_w)
                cols = img_off + ky * grid_w + kx
                s = mma(q, load_cols(k_base, cols, dims, sks, col_ok, d_ok), IN_PREC, UPCAST) * qk_scale
                dy = qy[:, None] - ky[None, :]
                dx = qx[:, None] - kx[None, :]
                near = (dy * dy + dx * dx).to(tl.float32) < r2
                s = tl.where(near & row_ok[:, None] & col_ok[None, :], s, float("-inf"))
                v = load_rows(v_base, cols, dims, svs, col_ok, d_ok)
                acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, V.dtype.element_ty, IN_PREC, UPCAST)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_mask = row_ok[:, None] & d_ok[None, :]
    o_ptrs = O + b * sob + h * soh + rows[:, None] * sos + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=o_mask)


def window_reach(radius: float) -> int:
    """Largest integer offset d with d^2 < radius^2 (-1 when the radius is 0: no image key)."""
    return math.ceil(abs(radius)) - 1


def local_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: LocalWindow,
    *,
    scale: float | None = None,
    query_tile: tuple[int, int] | None = None,
    key_tile: tuple[int, int] | None = None,
    text_block: int | None = None,
) -> torch.Tensor:
    """CLEAR self-attention on BSHD tensors laid out as `window` says (Nq = Nk = text + h*w).

    Tiles are (rows, cols) of the image grid, powers of two; by default 8 x 16 queries and 8 x 8
    keys (half of each for fp32 or head dims > 128, as `launch_config` says). Tests pass small
    tiles to exercise partial border tiles.
    """
    check_qkv(q, k, v)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    bsz, n_q, n_heads, head_d = q.shape
    gh, gw = window.grid
    n_img, text = gh * gw, window.text_len
    if n_q != n_img + text or k.shape[1] != n_q:
        raise ValueError(f"local window needs Nq = Nk = text_len + h*w = {n_img + text}")
    scale = 1.0 / math.sqrt(head_d) if scale is None else scale
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    img_off, text_off = (text, 0) if window.text_first else (0, n_img)
    if text:  # text queries see every key: plain flash attention into the text rows of `out`
        sl = slice(text_off, text_off + text)
        flash_attention(q[:, sl], k, v, scale=scale, out=out[:, sl])
    if n_img == 0:
        return out
    block_d = block_d_for(head_d)
    cfg = tiles(block_d, q.dtype)
    (tqy, tqx) = query_tile or ((8, 16) if cfg["BLOCK_M"] == 128 else (8, 8))
    (tky, tkx) = key_tile or ((8, 8) if cfg["BLOCK_N"] == 64 else (4, 8))
    grid = (triton.cdiv(gh, tqy) * triton.cdiv(gw, tqx), bsz * n_heads)
    _local_window_kernel[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n_heads, gh, gw, text, img_off, text_off,
        float(window.radius) ** 2, window_reach(window.radius), float(scale) * LOG2E,
        HEAD_D=head_d, BLOCK_D=block_d, TQY=tqy, TQX=tqx, TKY=tky, TKX=tkx,
        BLOCK_T=text_block or cfg["BLOCK_N"], IN_PREC=input_precision(q.dtype), UPCAST=upcast_dots(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out


def reference_local_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: LocalWindow, *, scale: float | None = None
) -> torch.Tensor:
    """Dense-mask definition in fp32 (`reference.window_mask`); small sizes only."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keep = window_mask(window, q.shape[1], k.shape[1], q.device)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    probs = torch.nan_to_num(torch.softmax(logits.masked_fill(~keep, float("-inf")), -1), nan=0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)
