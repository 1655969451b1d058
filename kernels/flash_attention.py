"""Flash-attention forward in Triton, with optional region-label masking and attention-map capture.

One kernel: each program owns a BLOCK_M tile of queries for one (batch, head) and streams the keys
through SRAM with an online softmax, so no N x M matrix ever reaches memory. Two constexpr flags
add the attnedit features without a second kernel:

- HAS_REGIONS: per-query / per-key int labels and an (R, R) or (B, R, R) table read in the inner
  loop (O(N + M) mask memory instead of a dense N x M mask). Rows with no allowed key output zeros.
- CAPTURE: after the main loop the final max and sum are known, so a short second loop over the
  captured keys recomputes their logits and writes exact probabilities, averaged over heads with
  fp32 atomics into one (B, Nq, Nc) buffer (no per-head probability tensor).

Head dims that are not powers of two (40, 72, 80, 160) are padded to BLOCK_D inside the kernel
with masked loads. `reference_flash_attention` is the PyTorch definition the kernel is tested
against. Forward only: no autograd.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .types import RegionMask

LOG2E = 1.4426950408889634


@triton.jit
def mma(a, b, IN_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot, or an fp32 dot of the same values when UPCAST.

    UPCAST is set only for bf16 under TRITON_INTERPRET=1: triton 3.9's interpreter multiplies
    bf16 operands as their raw uint16 bit patterns (np.matmul on the storage), so the CPU tests
    would be garbage. On a GPU it is always False.
    """
    if UPCAST:
        res = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        res = tl.dot(a, b, input_precision=IN_PREC)
    return res


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v, P_DTYPE: tl.constexpr, IN_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Fold one key tile into the running (acc, max, sum); `s` is in log2 units, -inf = masked.

    Fully masked rows keep m = -inf; their max is replaced by 0 before exp2 so they contribute
    exp2(-inf) = 0 instead of NaN. Shared by every attnedit attention kernel.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(P_DTYPE), v, IN_PREC, UPCAST)
    return acc, m_new, l_i


@triton.jit
def load_rows(base, idx, dims, stride, idx_ok, d_ok):
    """(len(idx), BLOCK_D) tile of tokens `idx` (row stride `stride`), zeros where masked."""
    mask = idx_ok[:, None] & d_ok[None, :]
    return tl.load(base + idx[:, None] * stride + dims[None, :], mask=mask, other=0.0)


@triton.jit
def load_cols(base, idx, dims, stride, idx_ok, d_ok):
    """(BLOCK_D, len(idx)) transposed tile of tokens `idx`, ready as the right operand of q @ k^T."""
    mask = d_ok[:, None] & idx_ok[None, :]
    return tl.load(base + idx[None, :] * stride + dims[:, None], mask=mask, other=0.0)


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, QL, KL, TBL, CAP, P,
    sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
    sql_b, skl_b, stb, n_regions,
    n_q, n_k, n_heads, n_cap, qk_scale, inv_heads,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_REGIONS: tl.constexpr, CAPTURE: tl.constexpr, IN_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
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
    if HAS_REGIONS:
        q_lab = tl.load(QL + b * sql_b + rows, mask=row_ok, other=0)
        tbl_rows = TBL + b * stb + q_lab * n_regions  # pointer to each query's table row

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    for start in range(0, n_k, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n_k
        k_t = load_cols(k_base, cols, dims, sks, col_ok, d_ok)
        s = mma(q, k_t, IN_PREC, UPCAST) * qk_scale
        keep = row_ok[:, None] & col_ok[None, :]
        if HAS_REGIONS:
            k_lab = tl.load(KL + b * skl_b + cols, mask=col_ok, other=0)
            allowed = tl.load(tbl_rows[:, None] + k_lab[None, :], mask=keep, other=0)
            keep = keep & (allowed != 0)
        s = tl.where(keep, s, float("-inf"))
        v = load_rows(v_base, cols, dims, svs, col_ok, d_ok)
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, V.dtype.element_ty, IN_PREC, UPCAST)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + b * sob + h * soh + rows[:, None] * sos + dims[None, :],
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )

    if CAPTURE:
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        inv_l = tl.where(l_i > 0, 1.0 / l_safe, 0.0) * inv_heads
        p_base = P + b * n_q * n_cap
        for c0 in range(0, n_cap, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            c_ok = cs < n_cap
            idx = tl.load(CAP + cs, mask=c_ok, other=0)
            k_t = load_cols(k_base, idx, dims, sks, c_ok, d_ok)
            s = mma(q, k_t, IN_PREC, UPCAST) * qk_scale
            keep = row_ok[:, None] & c_ok[None, :]
            if HAS_REGIONS:
                k_lab = tl.load(KL + b * skl_b + idx, mask=c_ok, other=0)
                allowed = tl.load(tbl_rows[:, None] + k_lab[None, :], mask=keep, other=0)
                keep = keep & (allowed != 0)
            p = tl.where(keep, tl.exp2(s - m_safe[:, None]), 0.0) * inv_l[:, None]
            p_mask = row_ok[:, None] & c_ok[None, :]
            tl.atomic_add(p_base + rows[:, None] * n_cap + cs[None, :], p, mask=p_mask)


# ----------------------------------------------------------------------------- launch helpers

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def block_d_for(head_dim: int) -> int:
    """Padded head-dim tile (power of two, >= 16 because tl.dot needs K >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact ("ieee") dots; TF32 would miss the fp32 tolerance."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Work around the interpreter's bf16 dot (see `mma`); never on a GPU."""
    return dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)


def launch_config(block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and warps for a GPU launch.

    Untuned (no GPU was available when this was written), but checked at compile time for sm_90:
    every config stays under H100's 227 KB of shared memory (tests/test_kernels_compile.py).
    fp32 tiles are halved because fp32 K/V tiles in the software pipeline would not fit.
    """
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4 if block_d <= 64 else 8, num_stages=2)
    if block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


def tiles(block_d: int, dtype: torch.dtype) -> dict[str, int]:
    """The launch configuration a wrapper uses: `launch_config` on a GPU, wide tiles in the interpreter.

    Triton's interpreter runs each program in NumPy and pays per loop iteration and per nested
    `@triton.jit` call, so whole pipelines under TRITON_INTERPRET=1 (CI) run several times faster
    with 128-wide tiles; the results are the same up to the order of the online-softmax sums.
    """
    if triton.knobs.runtime.interpret:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_C=128, num_warps=4, num_stages=1)
    return launch_config(block_d, dtype)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shape/dtype checks shared by the kernels' Python wrappers."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be BSHD (batch, seq, heads, head_dim)")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {SUPPORTED_DTYPES}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {q.shape[3]} > {MAX_HEAD_DIM} is not supported")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1; other strides are passed through."""
    return x if x.stride(-1) == 1 else x.contiguous()


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    regions: RegionMask | None = None,
    capture: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale) v on BSHD tensors, optional region labels and capture.

    Returns (out, probs) with probs (B, Nq, len(capture)) fp32 head-averaged probabilities of the
    captured key indices, or None. `out` may be a preallocated (strided) BSHD view to write into.
    `block_m`/`block_n` override the tile sizes (tests use small tiles to exercise ragged tails).
    """
    check_qkv(q, k, v)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    bsz, n_q, n_heads, head_d = q.shape
    n_k = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_d)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError("out must have q's shape and a unit last stride")
    block_d = block_d_for(head_d)
    cfg = tiles(block_d, q.dtype)
    bm = block_m or cfg["BLOCK_M"]
    bn = block_n or cfg["BLOCK_N"]

    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    ql = kl = tbl = dummy
    sql_b = skl_b = stb = n_regions = 0
    if regions is not None:
        ql = regions.q_labels.to(device=q.device, dtype=torch.int32).contiguous()
        kl = regions.k_labels.to(device=q.device, dtype=torch.int32).contiguous()
        if ql.shape != (bsz, n_q) or kl.shape != (bsz, n_k):
            raise ValueError(f"region labels must be ({bsz}, {n_q}) and ({bsz}, {n_k})")
        tbl = regions.allowed.to(device=q.device, dtype=torch.int8).contiguous()
        n_regions = tbl.shape[-1]
        stb = n_regions * n_regions if tbl.dim() == 3 else 0
        if tbl.dim() == 3 and tbl.shape[0] != bsz:
            raise ValueError("a (B, R, R) region table needs B = batch size")
        sql_b, skl_b = n_q, n_k

    cap = dummy
    probs: torch.Tensor | None = None
    n_cap = 0
    if capture is not None:
        cap = capture.to(device=q.device, dtype=torch.int32).reshape(-1).contiguous()
        n_cap = cap.numel()
        probs = torch.zeros(bsz, n_q, n_cap, dtype=torch.float32, device=q.device)
    block_c = min(cfg.get("BLOCK_C", 64), max(16, triton.next_power_of_2(max(n_cap, 1))))

    grid = (triton.cdiv(n_q, bm), bsz * n_heads)
    if n_q == 0:
        return out, probs
    _flash_fwd_kernel[grid](
        q, k, v, out, ql, kl, tbl, cap, probs if probs is not None else dummy,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        sql_b, skl_b, stb, n_regions,
        n_q, n_k, n_heads, n_cap, float(scale) * LOG2E, 1.0 / n_heads,
        HEAD_D=head_d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=block_c,
        HAS_REGIONS=regions is not None, CAPTURE=capture is not None,
        IN_PREC=input_precision(q.dtype), UPCAST=upcast_dots(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return out, probs


def reference_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    regions: RegionMask | None = None,
    capture: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain PyTorch definition in fp32 (dense logits): what the kernel must reproduce."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if regions is not None:
        logits = logits.masked_fill(~regions.dense().to(q.device), float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)  # empty rows -> zeros
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float()).to(q.dtype)
    captured = None
    if capture is not None:
        captured = probs[..., capture.to(q.device).long()].mean(dim=1)
    return out, captured
