"""Per-call cost of two hot spots of the PyTorch attention path, before and after, side by side.

    python benchmarks/call_cost.py                 # SD1.5 shapes, CPU, fp32
    python benchmarks/call_cost.py --repeats 50 --device cuda

1. AttentionStore capture on a cross-attention call (B=2 for CFG, 8 heads of 40, 77 text keys,
   12 captured tokens) at the 64x64, 32x32 and 16x16 levels of SD1.5 at 512 px:
   - `sdpa`: the plain call (what the stock processor does);
   - `before`: SDPA, then every logit again in fp32 and a second log-sum-exp (the explicit path,
     still used when gradients must flow);
   - `after`: what `attnedit.kernels.torch_attention` does now without autograd on the CPU (SDPA's
     own kernel returns its log-sum-exp; only the captured keys' logits are computed).
2. ToDo's K/V resampling at the top level of SD1.5 (64x64 tokens, factor 2, nearest-exact):
   - `before`: the index tensors rebuilt every call, the image tokens reshaped, permuted, gathered
     and concatenated with the rest (the old `downsample_kv`);
   - `after`: one cached index per (length, grid, factor, mode, start, device), one `index_select`
     per tensor (`attnedit.kernels.dispatch.downsample_kv`).
   Also at a small size (16x16 tokens, 8 heads of 8), where the fixed costs dominated.

Times are medians of `--repeats` calls after warm-up; the claim is the ratio in each row.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from attnedit.kernels.dispatch import _captured_probs, downsample_kv, torch_attention
from attnedit.kernels.types import KVDownsample


def _time(fn, repeats: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _two_pass(q, k, v, capture):
    return _sdpa(q, k, v), _captured_probs(q, k, None, None, capture)


def _both(resample, k, v, spec):
    return resample(k, spec), resample(v, spec)


def old_downsample_kv(x: torch.Tensor, spec: KVDownsample) -> torch.Tensor:
    """The previous nearest-exact resampling: indices rebuilt and the image reshaped on every call."""
    h, w = spec.grid
    f = spec.factor[0]
    b, _, nh, d = x.shape
    start, end = spec.start, spec.start + h * w
    img = x[:, start:end].reshape(b, h, w, nh * d).permute(0, 3, 1, 2)
    oh, ow = spec.out_grid

    def centres(size: int) -> torch.Tensor:
        starts = torch.arange(-(-size // f), device=x.device) * f
        return torch.clamp(starts + f // 2, max=size - 1)

    small = img[:, :, centres(h)][:, :, :, centres(w)]
    small = small.permute(0, 2, 3, 1).reshape(b, oh * ow, nh, d)
    return torch.cat([x[:, :start], small, x[:, end:]], dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)

    print(f"# per-call cost on {device} ({args.threads} thread(s)), median of {args.repeats}, microseconds\n")
    print("## AttentionStore capture of a cross-attention call (B=2, 8 heads x 40, 77 keys, 12 captured)\n")
    print("| grid | sdpa | before | after | capture overhead before | after |")
    print("|---|---|---|---|---|---|")
    capture = torch.arange(12, device=device)
    with torch.no_grad():
        for side in (64, 32, 16):
            q = torch.randn(2, side * side, 8, 40, generator=gen).to(device)
            k, v = (torch.randn(2, 77, 8, 40, generator=gen).to(device) for _ in range(2))
            plain = _time(partial(_sdpa, q, k, v), args.repeats, device)
            before = _time(partial(_two_pass, q, k, v, capture), args.repeats, device)
            after = _time(partial(torch_attention, q, k, v, capture=capture), args.repeats, device)
            print(f"| {side}x{side} | {plain:.0f} | {before:.0f} | {after:.0f} | {before - plain:+.0f} "
                  f"({before / plain:.2f}x) | {after - plain:+.0f} ({after / plain:.2f}x) |")

        print("\n## ToDo K/V resampling (nearest-exact, factor 2), both K and V\n")
        print("| tokens | heads x dim | before | after | ratio |")
        print("|---|---|---|---|---|")
        for side, heads, dim in ((64, 8, 40), (16, 8, 8)):
            k, v = (torch.randn(2, side * side, heads, dim, generator=gen).to(device) for _ in range(2))
            spec = KVDownsample((side, side), (2, 2), "nearest-exact")
            assert torch.equal(old_downsample_kv(k, spec), downsample_kv(k, spec))
            before = _time(partial(_both, old_downsample_kv, k, v, spec), args.repeats, device)
            after = _time(partial(_both, downsample_kv, k, v, spec), args.repeats, device)
            print(f"| {side}x{side} | {heads} x {dim} | {before:.0f} | {after:.0f} | {before / after:.2f}x faster |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
