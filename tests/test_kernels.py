"""The Triton kernels against their PyTorch references, on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported: triton 3.x reads it in `@triton.jit`
(at decoration), and its own `tl.zeros`, `tl.cdiv`... are decorated when triton is imported. Importing
torch first is fine (it does not import triton). If another test module imported triton earlier, the
tests here skip and one test re-runs this file in a fresh process with TRITON_INTERPRET=1. With
TRITON_INTERPRET=0 and a GPU the same tests run on CUDA. Shapes are small and tiles tiny so ragged
tails and multi-tile loops are exercised fast.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from attnedit.kernels import dispatch  # noqa: E402
from attnedit.kernels.types import KVDownsample, LocalWindow, RegionMask  # noqa: E402

INTERPRET = bool(triton.knobs.runtime.interpret)
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no GPU: nothing can run the kernels", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

from attnedit.kernels import flash_attention as fa  # noqa: E402
from attnedit.kernels import local_window_attention as lw  # noqa: E402
from attnedit.kernels import todo_attention as td  # noqa: E402
from attnedit.kernels import triton_backend as backend  # noqa: E402


def _decorated_for_interpreter() -> bool:
    """False when triton (its own tl.zeros & co.) was imported before TRITON_INTERPRET=1 was set."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.standard.zeros, InterpretedFunction)


# Reloading our modules is not enough in that case (triton's standard library is jitted at import),
# so the whole file is re-run in a fresh interpreter process instead of being skipped.
STALE = INTERPRET and not _decorated_for_interpreter()


@pytest.fixture(autouse=True)
def _fresh_process_when_stale(request):
    if STALE and request.node.originalname != "test_in_fresh_process_if_triton_was_imported_early":
        pytest.skip("triton was imported before TRITON_INTERPRET=1: run by the fresh-process test")


def test_in_fresh_process_if_triton_was_imported_early():
    if not STALE:
        pytest.skip("kernels already run under the interpreter in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {  # (atol, rtol) on outputs of magnitude ~1; fp16/bf16 allow ~2 ulps of the output
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
PROB_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def _qkv(b, nq, nk, h, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for n in (nq, nk, nk))
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def _close(out, ref, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def test_kernels_run_under_the_interpreter_when_asked():
    if not INTERPRET:
        pytest.skip("running compiled on a GPU")
    from triton.runtime.interpreter import InterpretedFunction

    assert _decorated_for_interpreter()
    for kernel in (fa._flash_fwd_kernel, lw._local_window_kernel, td._todo_kernel):
        assert isinstance(kernel, InterpretedFunction)


# ----------------------------------------------------------------------------- flash attention


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [40, 64, 72, 80, 128, 160])
def test_flash_matches_reference(dtype, head_dim):
    q, k, v = _qkv(2, 37, 29, 2, head_dim, dtype, seed=head_dim)  # neither length a tile multiple
    out, probs = fa.flash_attention(q, k, v, block_m=16, block_n=16)
    ref, _ = fa.reference_flash_attention(q, k, v)
    assert probs is None and out.dtype == dtype and out.shape == q.shape
    _close(out, ref, dtype)


def test_flash_default_tiles_custom_scale_and_strided_inputs():
    # q, k, v as views of one fused projection (non-contiguous seq/head strides), default GPU tiles.
    b, n, h, d = 1, 131, 2, 64
    qkv = torch.randn(b, n, 3, h, d).to(DEVICE)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out, _ = fa.flash_attention(q, k, v, scale=0.3)
    ref, _ = fa.reference_flash_attention(q, k, v, scale=0.3)
    _close(out, ref, torch.float32)
    wrong, _ = fa.reference_flash_attention(q, k, v)  # the scale really is used
    assert (out - wrong).abs().max() > 1e-3


def _regions(b, nq, nk, batched, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_lab = torch.randint(0, 4, (b, nq), generator=g)
    k_lab = torch.randint(0, 3, (b, nk), generator=g)  # label 3 never appears among the keys
    allowed = torch.rand((b, 4, 4) if batched else (4, 4), generator=g) > 0.3
    allowed[..., 3] = True  # label 3 is allowed but empty: must not matter
    allowed[..., 1, :] = False  # queries of label 1 see no key: zero rows
    q_lab[:, 0] = 1
    return RegionMask(q_lab.to(DEVICE), k_lab.to(DEVICE), allowed.to(DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batched", [False, True], ids=["table", "batched-table"])
def test_flash_regions(dtype, batched):
    q, k, v = _qkv(2, 45, 38, 2, 40, dtype, seed=1)
    regions = _regions(2, 45, 38, batched)
    out, _ = fa.flash_attention(q, k, v, regions=regions, block_m=16, block_n=16)
    ref, _ = fa.reference_flash_attention(q, k, v, regions=regions)
    _close(out, ref, dtype)
    empty = ~regions.dense()[:, 0].any(-1)  # (B, Nq): rows with no allowed key
    assert empty[regions.q_labels == 1].all() and (out[empty] == 0).all()
    assert (out[~empty].abs().sum(-1) > 0).all()
    # the same labels through the dense mask: the regions really change the result
    plain, _ = fa.flash_attention(q, k, v, block_m=16, block_n=16)
    assert (plain.float() - out.float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_regions", [False, True], ids=["plain", "regions"])
def test_capture_is_exact(dtype, with_regions):
    q, k, v = _qkv(2, 33, 80, 3, 64, dtype, seed=2)
    regions = _regions(2, 33, 80, batched=True, seed=3) if with_regions else None
    capture = torch.tensor([0, 5, 79, 5, 17, 40], device=DEVICE)  # unsorted, with a duplicate
    out, probs = fa.flash_attention(q, k, v, regions=regions, capture=capture, block_m=16, block_n=32)
    ref, ref_probs = fa.reference_flash_attention(q, k, v, regions=regions, capture=capture)
    _close(out, ref, dtype)
    assert probs.shape == (2, 33, 6) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, ref_probs, atol=PROB_TOL[dtype], rtol=1e-3)
    if with_regions:
        assert (probs[regions.q_labels == 1] == 0).all()


def test_capture_of_every_key_sums_to_one_across_several_chunks():
    # 80 captured keys > BLOCK_C (64): the capture loop runs twice; full capture is a probability row.
    q, k, v = _qkv(1, 20, 80, 2, 64, torch.float32, seed=4)
    _, probs = fa.flash_attention(q, k, v, capture=torch.arange(80, device=DEVICE), block_m=16, block_n=16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 20, device=DEVICE), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- local window (CLEAR)

WINDOWS = [  # (grid, radius, text_len, text_first)
    ((7, 11), 3.0, 5, True),  # odd, non-square, text first (FLUX)
    ((9, 6), 2.5, 6, False),  # text last, fractional radius
    ((5, 13), 1.0, 0, True),  # no text, radius 1 = the token itself only
    ((6, 6), 0.0, 3, False),  # radius 0: image queries see only text
    ((6, 5), 20.0, 4, True),  # disk bigger than the grid: dense
]


@pytest.mark.parametrize("case", WINDOWS, ids=lambda c: f"{c[0][0]}x{c[0][1]}-r{c[1]}-t{c[2]}-{c[3]}")
def test_local_window_matches_dense_mask(case):
    grid, radius, text, first = case
    window = LocalWindow(grid, radius, text, first)
    n = grid[0] * grid[1] + text
    q, k, v = _qkv(1, n, n, 2, 40, torch.float32, seed=5)
    out = lw.local_window_attention(q, k, v, window, query_tile=(4, 4), key_tile=(4, 4), text_block=16)
    ref = lw.reference_local_window_attention(q, k, v, window)
    _close(out, ref, torch.float32)


def test_local_window_zero_rows_without_text():
    window = LocalWindow((4, 5), 0.0, 0, True)
    q, k, v = _qkv(1, 20, 20, 1, 16, torch.float32)
    out = lw.local_window_attention(q, k, v, window, query_tile=(2, 4), key_tile=(2, 4))
    assert (out == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_local_window_dtypes(dtype, head_dim):
    window = LocalWindow((9, 10), 3.5, 7, False)
    n = 97
    q, k, v = _qkv(2, n, n, 1, head_dim, dtype, seed=6)
    out = lw.local_window_attention(q, k, v, window, query_tile=(4, 8), key_tile=(4, 4), text_block=16)
    _close(out, lw.reference_local_window_attention(q, k, v, window), dtype)


def test_local_window_reach():
    assert [lw.window_reach(r) for r in (0.0, 0.5, 1.0, 1.5, 2.0, 3.2)] == [-1, 0, 0, 1, 1, 3]


# ----------------------------------------------------------------------------- ToDo


TODO_CASES = [  # (grid, factor, start, tokens after the image)
    ((8, 8), (2, 2), 0, 0),
    ((7, 9), (2, 2), 0, 0),  # partial border cells
    ((9, 5), (4, 3), 3, 5),  # text before and after; ceil(9/3) != 4 for nearest-exact
    ((6, 8), (1, 2), 0, 4),
]


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "avg"])
@pytest.mark.parametrize("case", TODO_CASES, ids=lambda c: f"{c[0]}-f{c[1]}-{c[2]}-{c[3]}".replace(" ", ""))
def test_todo_matches_downsample_then_sdpa(mode, case):
    grid, factor, start, after = case
    spec = KVDownsample(grid, factor, mode, start)
    n_k = start + grid[0] * grid[1] + after
    q, k, v = _qkv(2, 21, n_k, 2, 40, torch.float32, seed=7)
    out = td.todo_attention(q, k, v, spec, block_m=16, block_n=16)
    _close(out, td.reference_todo_attention(q, k, v, spec), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["nearest-exact", "avg"])
def test_todo_half_precision(dtype, mode):
    spec = KVDownsample((7, 6), (2, 2), mode, 2)
    q, k, v = _qkv(1, 30, 44 + 3, 2, 80, dtype, seed=8)
    out = td.todo_attention(q, k, v, spec, block_m=16, block_n=16)
    _close(out, td.reference_todo_attention(q, k, v, spec), dtype)


# ----------------------------------------------------------------------------- backend and dispatch


def test_backend_supports():
    q, k, v = _qkv(1, 20, 20, 2, 64, torch.float16)
    win = LocalWindow((4, 5), 2.0)
    ds = KVDownsample((4, 5), (2, 2))
    regions = _regions(1, 20, 20, batched=False)
    assert backend.supports(q, k, v)
    assert backend.supports(q, k, v, regions=regions, capture=torch.tensor([1, 2]))
    assert backend.supports(q, k, v, window=win) and backend.supports(q, k, v, downsample=ds)
    assert not backend.supports(q, k, v, mask=torch.ones(20, 20, dtype=torch.bool))
    assert not backend.supports(q, k, v, window=win, downsample=ds)
    assert not backend.supports(q, k, v, downsample=ds, capture=torch.tensor([0]))
    assert not backend.supports(q, k, v, downsample=KVDownsample((4, 5), (2, 2), "bilinear"))
    assert not backend.supports(q, k, v, window=LocalWindow((4, 4), 2.0))  # 16 != 20 tokens
    assert not backend.supports(q, k, v, capture=torch.tensor([20]))  # out of range
    assert not backend.supports(q.double(), k.double(), v.double())
    assert not backend.supports(*_qkv(1, 20, 20, 2, 320, torch.float16))
    assert dispatch._BACKENDS["triton"].run is backend.run


def _constraint_cases():
    """(name, q/k/v, features, constraint, reason) on hand-built cases, one per constraint of the Triton backend."""
    q, k, v = _qkv(1, 20, 20, 2, 64, torch.float16)
    win, ds = LocalWindow((4, 5), 2.0), KVDownsample((4, 5), (2, 2))
    regions = _regions(1, 20, 20, batched=False)
    wide = _qkv(1, 20, 20, 2, 320, torch.float16)
    lab = regions.q_labels
    return [
        ("mask", (q, k, v), dict(mask=torch.ones(20, 20, dtype=torch.bool)), "no_dense_mask",
         "dense masks are not supported"),
        ("device", (q, k.to("meta"), v.to("meta")), {}, "one_device", "q, k, v are on different devices"),
        ("3-d", (q[0], k[0], v[0]), {}, "bshd_shapes", "q, k, v must be 4-D (batch, seq, heads, head_dim)"),
        ("k-v", (q, k, v[:, :10]), {}, "bshd_shapes", "k (1, 20, 2, 64) and v (1, 10, 2, 64) differ in shape"),
        ("heads", (q, k[:, :, :1], v[:, :, :1]), {}, "bshd_shapes", "q and k differ in batch, heads or head_dim"),
        ("mixed", (q, k.float(), v), {}, "kernel_dtype", "q, k, v differ in dtype"),
        ("double", (q.double(), k.double(), v.double()), {}, "kernel_dtype",
         "dtype float64 is not one of float16, bfloat16, float32"),
        ("head-dim", wide, {}, "head_dim", "head_dim 320 > 256"),
        ("two-features", (q, k, v), dict(window=win, downsample=ds), "one_feature",
         "regions, downsample and window are fused one at a time"),
        ("capture-ds", (q, k, v), dict(downsample=ds, capture=torch.tensor([0])), "capture_without_resampling",
         "capture is fused with plain and region attention only (not downsample or window)"),
        ("labels", (q, k, v), dict(regions=RegionMask(lab[:, :5], regions.k_labels, regions.allowed)),
         "region_labels", "region labels must be (1, 20) and (1, 20)"),
        ("table", (q, k, v), dict(regions=RegionMask(lab, regions.k_labels, regions.allowed.expand(2, 4, 4))),
         "region_labels", "a (B, R, R) region table needs B = batch size"),
        ("bilinear", (q, k, v), dict(downsample=KVDownsample((4, 5), (2, 2), "bilinear")), "fused_downsample",
         "downsample mode 'bilinear' is not fused (only nearest, nearest-exact, avg)"),
        ("factor", (q, k, v), dict(downsample=KVDownsample((4, 5), (0, 2))), "fused_downsample",
         "downsample factor (0, 2) is not >= 1"),
        ("avg-cell", (q, k, v), dict(downsample=KVDownsample((4, 5), (9, 9), "avg")), "fused_downsample",
         "avg cells of 9x9 tokens > 64"),
        ("image-range", (q, k, v), dict(downsample=KVDownsample((4, 5), (2, 2), start=3)), "fused_downsample",
         "the image tokens [3, 23) exceed the 20 keys"),
        ("window", (q, k, v), dict(window=LocalWindow((4, 4), 2.0)), "window_layout",
         "a local window needs Nq = Nk = text_len + h*w = 16"),
        ("capture-2d", (q, k, v), dict(capture=torch.tensor([[1, 2]])), "capture_indices",
         "capture must be a 1-D tensor of key indices"),
        ("capture-range", (q, k, v), dict(capture=torch.tensor([20])), "capture_indices",
         "capture indices outside [0, 20)"),
    ]


def test_every_constraint_says_why_on_a_hand_built_case():
    cases = _constraint_cases()
    assert {c[3] for c in cases} == {check.__name__ for check in backend.CONSTRAINTS}
    for label, (q, k, v), features, constraint, reason in cases:
        e = dispatch.explain(q, k, v, backend="triton", **features)
        assert (e.backend, e.error) == ("torch", None), label
        refusal = e.refused["triton"]
        assert (refusal.constraint, refusal.reason) == (constraint, reason), label
        assert backend.refusal(q, k, v, **features) == reason and not backend.supports(q, k, v, **features)
    q, k, v = _qkv(1, 20, 20, 2, 64, torch.float16)
    assert dispatch.explain(q, k, v, backend="triton", regions=_regions(1, 20, 20, False),
                            capture=torch.tensor([1, 2])).backend == "triton"
    triton_entry = dispatch.get_backend("triton")
    names = [check.__name__ for check in triton_entry.all_constraints()]
    assert names[:2] == ["forward_only", "cuda_or_interpreter"] and triton_entry.auto_devices == ("cuda",)


def test_forced_triton_falls_back_with_one_warning_per_reason(monkeypatch):
    import warnings

    monkeypatch.setattr(dispatch, "_WARNED", set())
    q, k, v = _qkv(1, 12, 12, 2, 32, torch.float32, seed=13)
    mask = torch.rand(12, 12, device=DEVICE) > 0.3
    mask[:, 0] = True
    with dispatch.using("triton"):
        with pytest.warns(UserWarning) as caught:
            out = dispatch.attention(q, k, v, mask=mask)
            again = dispatch.attention(q, k, v, mask=~mask | (torch.arange(12, device=DEVICE) == 0))
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1 and "runs on PyTorch instead: dense masks are not supported" in messages[0]
        assert "[no_dense_mask]" in messages[0]
        with pytest.warns(UserWarning, match="head_dim 320 > 256"):
            dispatch.attention(*_qkv(1, 4, 4, 1, 320, torch.float32))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dispatch.attention(q, k, v, mask=mask)  # that reason was given already
            plain = dispatch.attention(q, k, v)  # the kernels take it: nothing to say
    _close(out, dispatch.torch_attention(q, k, v, mask=mask)[0], torch.float32)
    _close(again, dispatch.torch_attention(q, k, v, mask=~mask | (torch.arange(12, device=DEVICE) == 0))[0],
           torch.float32)
    _close(plain, fa.reference_flash_attention(q, k, v)[0], torch.float32)
    with warnings.catch_warnings():  # "auto" falls back silently
        warnings.simplefilter("error")
        dispatch.attention(q, k, v, mask=mask)


def test_backend_run_matches_torch_path():
    q, k, v = _qkv(2, 30, 30, 2, 40, torch.float32, seed=9)
    regions = _regions(2, 30, 30, batched=True, seed=10)
    capture = torch.tensor([3, 0, 29], device=DEVICE)
    cases = [
        dict(regions=regions, capture=capture),  # empty query rows included: zeros on both paths
        dict(window=LocalWindow((5, 5), 2.0, 5, True)),
        dict(downsample=KVDownsample((5, 5), (2, 2), "avg", 5)),
        dict(scale=0.2),
    ]
    for features in cases:
        out, probs = backend.run(q, k, v, **features)
        ref, ref_probs = dispatch.torch_attention(q, k, v, **features)
        _close(out, ref, torch.float32)
        if ref_probs is not None:
            torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-4)


def test_dispatch_torch_path_equals_references():
    q, k, v = _qkv(2, 30, 30, 2, 32, torch.float32, seed=11)
    regions = _regions(2, 30, 30, batched=False, seed=12)
    capture = torch.tensor([1, 7], device=DEVICE)
    window = LocalWindow((5, 5), 1.5, 5, False)
    spec = KVDownsample((5, 5), (2, 3), "nearest-exact", 0)
    with dispatch.using("torch"):
        out = dispatch.attention(q, k, v, regions=regions)
        out_c, probs = dispatch.attention(q, k, v, regions=regions, capture=capture)
        out_w = dispatch.attention(q, k, v, window=window)
        out_d = dispatch.attention(q, k, v, downsample=spec)
    ref, ref_probs = fa.reference_flash_attention(q, k, v, regions=regions, capture=capture)
    _close(out, ref, torch.float32)
    _close(out_c, ref, torch.float32)
    torch.testing.assert_close(probs, ref_probs, atol=1e-5, rtol=1e-4)
    _close(out_w, lw.reference_local_window_attention(q, k, v, window), torch.float32)
    _close(out_d, td.reference_todo_attention(q, k, v, spec), torch.float32)


# ----------------------------------------------------------------------------- benchmark plan


def test_benchmark_plan_matches_the_performance_anchors(capsys, load_benchmark):
    """The GPU benchmark cannot run here; its shapes and FLOP counts can (anchors §5, §6, §8)."""
    bench = load_benchmark("kernels")
    cases = {(c.model, c.res, c.layer, c.feature): c for c in bench.build_cases()}
    flux = {res: cases[("FLUX", res, "joint", "plain")] for res in (1024, 2048, 4096)}
    assert [c.n_q for c in flux.values()] == [4608, 16896, 66048]
    assert [round(c.flops() / 1e12, 2) for c in flux.values()] == [0.26, 3.51, 53.6]
    sd = cases[("SD1.5", 1024, "self latent/1", "plain")]
    assert (sd.batch, sd.heads, sd.head_dim, sd.n_q) == (2, 8, 40, 16384) and round(sd.flops() / 1e12, 2) == 0.69
    assert round(cases[("SD1.5", 1024, "self latent/1", "todo")].flops() / 1e12, 2) == 0.17
    assert cases[("SDXL", 2048, "self latent/2", "plain")].n_q == 16384
    for side, r, density in ((64, 8, 4.2), (128, 16, 4.3), (256, 8, 0.29)):
        got = 100 * bench.window_density(LocalWindow((side, side), float(r)))
        assert abs(got - density) < 0.06
    assert bench.main(["--dry-run", "--filter", "FLUX 4096"]) == 0
    assert "5 cases" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact", "avg"])
def test_downsample_shortens_a_key_mask_with_the_keys(mode):
    """A padded-text key mask (Qwen-Image) under ToDo: the masked text keys stay masked, image keys kept."""
    from attnedit.kernels.reference import downsample_key_mask, downsample_kv

    torch.manual_seed(0)
    b, n_txt, grid, heads, d = 2, 3, (4, 4), 2, 8
    n = n_txt + grid[0] * grid[1]
    q, k, v = (torch.randn(b, n, heads, d) for _ in range(3))
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[1, ..., 1:n_txt] = False  # the second prompt is one token long, padded to three
    spec = KVDownsample(grid, (2, 2), mode, start=n_txt)
    out = dispatch.torch_attention(q, k, v, mask=mask, downsample=spec)[0]
    small_k, small_v = downsample_kv(k, spec), downsample_kv(v, spec)
    kept = torch.cat([mask[..., :n_txt], torch.ones(b, 1, 1, 4, dtype=torch.bool)], dim=-1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), small_k.transpose(1, 2), small_v.transpose(1, 2), attn_mask=kept).transpose(1, 2)
    assert (out - ref).abs().max().item() <= 1e-5
    # a mask on image keys keeps the entry of the key each cell picks: corners (nearest), centres (nearest-exact)
    if mode != "avg":
        img = torch.rand(b, 1, 1, n) > 0.3
        cells = [0, 2, 8, 10] if mode == "nearest" else [5, 7, 13, 15]
        expected = torch.cat([img[..., :n_txt], img[..., [n_txt + c for c in cells]]], dim=-1)
        assert torch.equal(downsample_key_mask(img, spec), expected)
