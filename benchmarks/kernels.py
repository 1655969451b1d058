"""GPU benchmark of attnedit's Triton kernels against PyTorch SDPA, xformers and FlexAttention.

Times every implementation of a case in one run, side by side (median ms and TFLOP/s), at the
shapes of SD1.5 (512/1024/2048), SDXL (1024/2048) and FLUX.1 (1024/2048/4096), and writes a
markdown table to `benchmarks/results/kernels-<device>-<date>.md` with the command and versions.
Targets (issue 7): plain >= 0.8x SDPA's best backend; regions >= 0.8x plain; capture <= +15 %
over plain; fused ToDo >= downsample-then-SDPA; CLEAR window >= 3x FlexAttention at FLUX 4096.

    python benchmarks/kernels.py            # on a CUDA machine
    python benchmarks/kernels.py --dry-run  # anywhere: the planned cases and their FLOPs

FLOPs are 4 * B * H * Nq * Nk_effective * d (QK^T and PV, forward); for region and window masks
the count is the dense one (the work a dense kernel would do), so their TFLOP/s read as "dense
equivalent"; the window case also lists the share of pairs inside the mask.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnedit.kernels.dispatch import downsample_kv
from attnedit.kernels.types import KVDownsample, LocalWindow, RegionMask

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    """One attention call of a model at a resolution, and the feature it exercises."""

    model: str
    res: int
    layer: str
    batch: int
    heads: int
    head_dim: int
    n_q: int
    n_k: int
    feature: str = "plain"  # plain | regions | capture | todo | window
    grid: tuple[int, int] = (0, 0)
    text_len: int = 0
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.model} {self.res}² {self.layer} {self.feature}"

    def flops(self) -> float:
        """Forward FLOPs of the dense-equivalent computation (ToDo: the reduced key count)."""
        n_k = self.n_k
        if self.feature == "todo":
            spec = self.extra["downsample"]
            oh, ow = spec.out_grid
            n_k = self.n_k - self.grid[0] * self.grid[1] + oh * ow
        return 4.0 * self.batch * self.heads * self.n_q * n_k * self.head_dim


def _sq(n: int) -> tuple[int, int]:
    return (n, n)


def build_cases() -> list[Case]:
    """Published-size attention shapes of SD1.5, SDXL and FLUX at their resolutions (batch 2 = CFG for the UNets)."""
    cases: list[Case] = []
    for res in (512, 1024, 2048):  # SD1.5: 8 heads, d = 40 / 80 / 160 at latent /1 /2 /4
        side = res // 8
        for level, d in ((1, 40), (2, 80), (4, 160)):
            g = _sq(side // level)
            n = g[0] * g[1]
            layer = f"self latent/{level}"
            cases.append(Case("SD1.5", res, layer, 2, 8, d, n, n, "plain", g))
            if level == 1:
                cases.append(Case("SD1.5", res, layer, 2, 8, d, n, n, "regions", g))
                ds = KVDownsample(g, (2, 2), "nearest-exact")
                cases.append(Case("SD1.5", res, layer, 2, 8, d, n, n, "todo", g, extra={"downsample": ds}))
                ds_avg = KVDownsample(g, (2, 2), "avg")
                cases.append(Case("SD1.5", res, layer, 2, 8, d, n, n, "todo", g, extra={"downsample": ds_avg}))
        cases.append(Case("SD1.5", res, "cross latent/1", 2, 8, 40, (side) ** 2, 77, "capture", _sq(side)))
    for res in (1024, 2048):  # SDXL: d = 64, 10 heads at latent/2, 20 at latent/4
        side = res // 8
        for level, heads in ((2, 10), (4, 20)):
            g = _sq(side // level)
            n = g[0] * g[1]
            layer = f"self latent/{level}"
            cases.append(Case("SDXL", res, layer, 2, heads, 64, n, n, "plain", g))
            cases.append(Case("SDXL", res, layer, 2, heads, 64, n, n, "regions", g))
            if level == 2:
                ds = KVDownsample(g, (2, 2), "nearest-exact")
                cases.append(Case("SDXL", res, layer, 2, heads, 64, n, n, "todo", g, extra={"downsample": ds}))
        cases.append(Case("SDXL", res, "cross latent/2", 2, 10, 64, (side // 2) ** 2, 77, "capture", _sq(side // 2)))
    for res in (1024, 2048, 4096):  # FLUX.1: 24 x 128, joint [512 text | image/16]
        g = _sq(res // 16)
        n = 512 + g[0] * g[1]
        cases.append(Case("FLUX", res, "joint", 1, 24, 128, n, n, "plain", g, 512))
        cases.append(Case("FLUX", res, "joint", 1, 24, 128, n, n, "regions", g, 512))
        cases.append(Case("FLUX", res, "joint", 1, 24, 128, n, n, "capture", g, 512))
        for r in (8, 16):
            win = LocalWindow(g, float(r), 512, True)
            cases.append(Case("FLUX", res, f"joint r={r}", 1, 24, 128, n, n, "window", g, 512, {"window": win}))
    return cases


def window_density(win: LocalWindow) -> float:
    """Share of (q, k) pairs allowed by a CLEAR mask (text rows/cols dense), counted per offset."""
    h, w = win.grid
    reach = math.ceil(abs(win.radius)) - 1
    local = 0
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy * dy + dx * dx < win.radius**2 and abs(dy) < h and abs(dx) < w:
                local += (h - abs(dy)) * (w - abs(dx))
    n = h * w + win.text_len
    dense_text = n * n - (h * w) ** 2
    return (local + dense_text) / (n * n)


# ----------------------------------------------------------------------------- implementations


def _regions_for(case: Case, device: torch.device) -> RegionMask:
    """4 regions: label = image quadrant (text tokens label 0), allowed = same region or label 0."""
    g = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(0, 4, (case.batch, case.n_q), generator=g)
    k_labels = torch.randint(0, 4, (case.batch, case.n_k), generator=g)
    allowed = torch.eye(4, dtype=torch.bool)
    allowed[:, 0] = True
    return RegionMask(labels.to(device), k_labels.to(device), allowed.to(device))


def _bhsd(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.transpose(1, 2) for x in xs]


def implementations(case: Case, q, k, v, args) -> dict[str, Callable[[], object]]:
    """name -> zero-argument callable running one forward; unavailable ones are left out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from attnedit.kernels import flash_attention as fa
    from attnedit.kernels import local_window_attention as lw
    from attnedit.kernels import todo_attention as td

    qt, kt, vt = _bhsd(q, k, v)
    impls: dict[str, Callable[[], object]] = {}

    def sdpa(backend, mask=None, kk=kt, vv=vt):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qt, kk, vv, attn_mask=mask)

        return run

    def flex(mask_mod, kk=kt, vv=vt):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, case.batch, None, case.n_q, kk.shape[2], device=q.device)
        return lambda: compiled(qt, kk, vv, block_mask=block_mask)

    feat = case.feature
    if feat in ("plain", "capture"):
        impls["attnedit triton"] = lambda: fa.flash_attention(q, k, v)
        if feat == "capture":
            cap = torch.arange(0, case.n_k, max(1, case.n_k // 16), device=q.device)[:16]
            impls["attnedit triton + capture(16)"] = lambda: fa.flash_attention(q, k, v, capture=cap)
        impls["sdpa flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
        impls["sdpa cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
        impls["sdpa efficient"] = sdpa(SDPBackend.EFFICIENT_ATTENTION)
        impls["flex (no mask)"] = flex(None)
        try:
            import xformers.ops as xops  # type: ignore[import-not-found]

            impls["xformers"] = lambda: xops.memory_efficient_attention(q, k, v)
        except ImportError:
            pass
    elif feat == "regions":
        regions = _regions_for(case, q.device)
        impls["attnedit triton (no mask)"] = lambda: fa.flash_attention(q, k, v)
        impls["attnedit triton regions"] = lambda: fa.flash_attention(q, k, v, regions=regions)
        ql, kl, table = regions.q_labels, regions.k_labels, regions.allowed

        def region_mod(b, h, qi, ki):
            return table[ql[b, qi], kl[b, ki]]

        impls["flex regions"] = flex(region_mod)
        if case.batch * case.n_q * case.n_k <= args.max_mask_gb * 2**30:  # bool dense mask bytes
            dense = regions.dense()
            impls["sdpa efficient + dense mask"] = sdpa(SDPBackend.EFFICIENT_ATTENTION, dense)
    elif feat == "todo":
        spec = case.extra["downsample"]
        impls[f"attnedit triton todo {spec.mode}"] = lambda: td.todo_attention(q, k, v, spec)

        def unfused():
            ks, vs = _bhsd(downsample_kv(k, spec), downsample_kv(v, spec))
            return F.scaled_dot_product_attention(qt, ks, vs)

        impls[f"downsample_kv {spec.mode} + sdpa (auto)"] = unfused
        impls["sdpa flash, full K/V"] = sdpa(SDPBackend.FLASH_ATTENTION)
    elif feat == "window":
        win = case.extra["window"]
        impls["attnedit triton window"] = lambda: lw.local_window_attention(q, k, v, win)
        t, w = win.text_len, win.grid[1]
        r2 = float(win.radius) ** 2

        def window_mod(b, h, qi, ki):
            qy, qx = (qi - t) // w, (qi - t) % w
            ky, kx = (ki - t) // w, (ki - t) % w
            near = ((qy - ky) * (qy - ky) + (qx - kx) * (qx - kx)) < r2
            return (qi < t) | (ki < t) | near

        impls["flex CLEAR block mask (row-major)"] = flex(window_mod)
        impls["sdpa flash, dense (no window)"] = sdpa(SDPBackend.FLASH_ATTENTION)
    return impls


def bench(fn: Callable[[], object], warmup: int, rep: int) -> float:
    """Median milliseconds of `fn` with CUDA events (after warm-up, which also compiles)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def run_case(case: Case, args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    shape_q = (case.batch, case.n_q, case.heads, case.head_dim)
    shape_k = (case.batch, case.n_k, case.heads, case.head_dim)
    q = torch.randn(shape_q, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(shape_k, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(shape_k, device="cuda", dtype=dtype, generator=g)
    rows = []
    reference = None
    for name, fn in implementations(case, q, k, v, args).items():
        try:
            out = _first(fn())
            ms = bench(fn, args.warmup, args.rep)
        except Exception as exc:  # unsupported backend/shape: report it, keep going
            rows.append(dict(case=case, impl=name, ms=None, note=f"n/a: {type(exc).__name__}: {exc}"[:90]))
            torch.cuda.empty_cache()
            continue
        if out.shape[1] != case.n_q:  # BHSD -> BSHD
            out = out.transpose(1, 2)
        if reference is None:
            reference = out.float()
            note = "reference for max err"
        else:
            note = f"max err vs first {float((out.float() - reference).abs().max()):.2e}"
        rows.append(dict(case=case, impl=name, ms=ms, note=note))
        print(f"  {name:42s} {ms:9.3f} ms {case.flops() / ms / 1e9:8.1f} TFLOP/s  {note}", flush=True)
    return rows


def to_markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| case | B×H×d | Nq × Nk | implementation | ms | TFLOP/s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c: Case = r["case"]
        ms = "" if r["ms"] is None else f"{r['ms']:.3f}"
        tf = "" if r["ms"] is None else f"{c.flops() / r['ms'] / 1e9:.1f}"
        note = r["note"]
        if c.feature == "window":
            note += f"; mask density {100 * window_density(c.extra['window']):.1f} %"
        lines.append(
            f"| {c.name} | {c.batch}×{c.heads}×{c.head_dim} | {c.n_q} × {c.n_k} | {r['impl']} | {ms} | {tf} | {note} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the planned cases and FLOPs (no GPU needed)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--filter", default="", help="regex on the case name, e.g. 'FLUX 4096'")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--max-mask-gb", type=float, default=4.0, help="largest dense bool mask for SDPA")
    args = p.parse_args(argv)
    cases = [c for c in build_cases() if re.search(args.filter, c.name)]
    if args.dry_run:
        for c in cases:
            extra = ""
            if c.feature == "window":
                extra = f" density {100 * window_density(c.extra['window']):.2f} %"
            if c.feature == "todo":
                extra = f" {c.extra['downsample'].mode} x{c.extra['downsample'].factor}"
            print(
                f"{c.name:40s} B={c.batch} H={c.heads:2d} d={c.head_dim:3d} Nq={c.n_q:6d} Nk={c.n_k:6d} "
                f"{c.flops() / 1e12:8.3f} TFLOP{extra}"
            )
        print(f"{len(cases)} cases")
        return 0
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (none found); use --dry-run to list the cases.", file=sys.stderr)
        return 2
    import triton

    device = torch.cuda.get_device_name()
    rows: list[dict] = []
    for c in cases:
        print(c.name, flush=True)
        rows += run_case(c, args)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    date = dt.date.today().isoformat()
    header = (
        f"# attnedit kernels on {device}, {date}\n\n"
        f"Command: `python benchmarks/kernels.py {' '.join(sys.argv[1:])}` ({args.dtype}, median of {args.rep}).  \n"
        f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
        f"{platform.python_version()}. Dense bf16 peak for the report: 989 TFLOP/s (H100/H200 SXM)."
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"kernels-{slug}-{date}.md"
    path.write_text(to_markdown(rows, header))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
