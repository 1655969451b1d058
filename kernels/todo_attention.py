"""ToDo attention in Triton: K/V downsampled on the fly while they stream through SRAM.

The unfused path writes a downsampled copy of K and V (`reference.downsample_kv`) and then runs
SDPA. Here the kernel iterates over the *downsampled* key sequence
`[before (start) | out_grid cells | after]` and maps each cell to its full-resolution tokens:
"nearest" reads the cell's top-left token, "nearest-exact" token f//2 of each axis (torch's
`interpolate` rule, `reference.grid_centres`), "avg" sums the cell's valid tokens in fp32 and divides by their count
(partial border cells included), rounding to the input dtype as the reference does. Tokens outside
the image range are read as they are. No downsampled tensor is ever allocated.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .flash_attention import (
    LOG2E,
    block_d_for,
    check_qkv,
    input_precision,
    last_dim_contiguous,
    load_cols,
    load_rows,
    mma,
    online_softmax_step,
    tiles,
    upcast_dots,
)
from .reference import downsample_kv
from .types import KVDownsample

MODES = {"nearest": 0, "nearest-exact": 1, "avg": 2}


@triton.jit
def _todo_kernel(
    Q, K, V, O,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    n_heads, n_q, n_k_out, start, grid_h, grid_w, out_w, n_img_out, cell_y, cell_x, qk_scale,
    FY: tl.constexpr, FX: tl.constexpr, MODE: tl.constexpr,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IN_PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_q
    d_ok = dims < HEAD_D
    q = load_rows(Q + b * sqb + h * sqh, rows, dims, sqs, row_ok, d_ok)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_img_full = grid_h * grid_w

    for j0 in range(0, n_k_out, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        col_ok = j < n_k_out
        in_img = (j >= start) & (j < start + n_img_out)
        cell = j - start
        cy = cell // out_w
        cx = cell % out_w
        # tokens outside the image keep their place, shifted by the size change of the image part
        plain = tl.where(j < start, j, j + (n_img_full - n_img_out))
        if MODE == 2:
            plain_ok = col_ok & (~in_img)
            k_t = load_cols(k_base, plain, dims, sks, plain_ok, d_ok).to(tl.float32)
            v = load_rows(v_base, plain, dims, svs, plain_ok, d_ok).to(tl.float32)
            k_sum = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
            v_sum = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            count = tl.zeros([BLOCK_N], tl.float32)
            for t in tl.static_range(FY * FX):
                yy = cy * FY + t // FX
                xx = cx * FX + t % FX
                ok = col_ok & in_img & (yy < grid_h) & (xx < grid_w)
                src = start + yy * grid_w + xx
                k_sum += load_cols(k_base, src, dims, sks, ok, d_ok).to(tl.float32)
                v_sum += load_rows(v_base, src, dims, svs, ok, d_ok).to(tl.float32)
                count += ok.to(tl.float32)
            inv = 1.0 / tl.maximum(count, 1.0)
            k_t = tl.where(in_img[None, :], k_sum * inv[None, :], k_t).to(K.dtype.element_ty)
            v = tl.where(in_img[:, None], v_sum * inv[:, None], v).to(V.dtype.element_ty)
        else:
            if MODE == 0:
                sy = cy * FY
                sx = cx * FX
            else:  # token c*f + f//2 of the cell, its last token in a partial border cell (`grid_centres`)
                sy = tl.minimum(cy * cell_y + cell_y // 2, grid_h - 1)
                sx = tl.minimum(cx * cell_x + cell_x // 2, grid_w - 1)
            src = tl.where(in_img, start + sy * grid_w + sx, plain)
            k_t = load_cols(k_base, src, dims, sks, col_ok, d_ok)
            v = load_rows(v_base, src, dims, svs, col_ok, d_ok)
        s = mma(q, k_t, IN_PREC, UPCAST) * qk_scale
        s = tl.where(row_ok[:, None] & col_ok[None, :], s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, V.dtype.element_ty, IN_PREC, UPCAST)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = O + b * sob + h * soh + rows[:, None] * sos + dims[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def todo_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    downsample: KVDownsample,
    *,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Attention of q over `downsample_kv(k)`, `downsample_kv(v)` without materialising them."""
    check_qkv(q, k, v)
    if downsample.mode not in MODES:
        raise ValueError(f"fused ToDo supports modes {sorted(MODES)}, not {downsample.mode!r}")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    bsz, n_q, n_heads, head_d = q.shape
    gh, gw = downsample.grid
    fy, fx = downsample.factor
    oh, ow = downsample.out_grid
    n_k = k.shape[1]
    if downsample.start < 0 or downsample.start + gh * gw > n_k:
        raise ValueError(f"image range [{downsample.start}, {downsample.start + gh * gw}) exceeds Nk = {n_k}")
    n_k_out = n_k - gh * gw + oh * ow
    scale = 1.0 / math.sqrt(head_d) if scale is None else scale
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if n_q == 0:
        return out
    block_d = block_d_for(head_d)
    cfg = tiles(block_d, q.dtype)
    bm = block_m or cfg["BLOCK_M"]
    bn = block_n or cfg["BLOCK_N"]
    # "avg" unrolls fy*fx K/V loads per tile; pipelining them would multiply shared memory.
    stages = 1 if downsample.mode == "avg" else cfg["num_stages"]
    grid = (triton.cdiv(n_q, bm), bsz * n_heads)
    _todo_kernel[grid](
        q, k, v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n_heads, n_q, n_k_out, downsample.start, gh, gw, ow, oh * ow,
        fy, fx, float(scale) * LOG2E,
        FY=fy, FX=fx, MODE=MODES[downsample.mode],
        HEAD_D=head_d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn,
        IN_PREC=input_precision(q.dtype), UPCAST=upcast_dots(q.dtype),
        num_warps=cfg["num_warps"], num_stages=stages,
    )  # fmt: skip
    return out


def reference_todo_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, downsample: KVDownsample, *, scale: float | None = None
) -> torch.Tensor:
    """The unfused definition: `reference.downsample_kv` then SDPA (fp32)."""
    k_small, v_small = downsample_kv(k, downsample), downsample_kv(v, downsample)
    q32, k32, v32 = (x.float().transpose(1, 2) for x in (q, k_small, v_small))
    return F.scaled_dot_product_attention(q32, k32, v32, scale=scale).transpose(1, 2).to(q.dtype)
