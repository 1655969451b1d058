"""The PyTorch path of the attention dispatch on hand-built inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from attnedit import kernels
from attnedit.kernels.dispatch import downsample_kv, grid_centres, window_mask
from attnedit.kernels.types import KVDownsample, LocalWindow, RegionMask


def _ref(q, k, v, keep=None):
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    p = torch.nan_to_num(torch.softmax(logits, -1))
    return torch.einsum("bhqk,bkhd->bqhd", p, v), p


def test_capture_is_exact_and_output_unchanged():
    q, k, v = (torch.randn(2, 7, 3, 8) for _ in range(3))
    plain = kernels.attention(q, k, v)
    out, probs = kernels.attention(q, k, v, capture=torch.tensor([0, 4, 5]))
    assert torch.equal(out, plain)
    _, p = _ref(q, k, v)
    assert torch.allclose(probs, p.mean(1)[..., [0, 4, 5]], atol=1e-6)
    _, every = kernels.attention(q, k, v, capture=torch.arange(7))
    assert torch.allclose(every.sum(-1), torch.ones(2, 7), atol=1e-5)


def test_regions_match_dense_mask_and_empty_rows_are_zero():
    q, k, v = (torch.randn(1, 6, 2, 4) for _ in range(3))
    ql = torch.tensor([[0, 0, 1, 1, 2, 2]])
    kl = torch.tensor([[0, 1, 1, 2, 2, 2]])
    allowed = torch.tensor([[True, False, False], [True, True, False], [False, False, False]])
    regions = RegionMask(ql, kl, allowed)
    keep = regions.dense()
    assert keep.shape == (1, 1, 6, 6)
    assert keep[0, 0, 0].tolist() == [True, False, False, False, False, False]
    assert keep[0, 0, 2].tolist() == [True, True, True, False, False, False]
    out, probs = kernels.attention(q, k, v, regions=regions, capture=torch.arange(6))
    ref, p = _ref(q, k, v, keep)
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.allclose(probs, p.mean(1), atol=1e-6)
    assert torch.all(out[:, 4:] == 0) and torch.all(probs[:, 4:] == 0)  # label 2 may attend nothing


def test_downsample_nearest_exact_on_odd_grid():
    grid = (5, 7)
    x = torch.arange(35, dtype=torch.float32).view(1, 35, 1, 1)
    spec = KVDownsample(grid=grid, factor=(2, 2), mode="nearest-exact")
    assert spec.out_grid == (3, 4)
    out = downsample_kv(x, spec).view(3, 4)
    ys, xs = grid_centres(5, 2), grid_centres(7, 2)
    # token f//2 of each cell (torch's nearest-exact), the last token of a 1-token border cell
    assert ys.tolist() == [1, 3, 4] and xs.tolist() == [1, 3, 5, 6]
    # cells follow the factor: 9 tokens, factor 4 -> cells [0,4) [4,8) [8,9) -> tokens 2, 6, 8
    assert grid_centres(9, 4).tolist() == [2, 6, 8]
    assert out[1, 2].item() == 3 * 7 + 5
    avg = downsample_kv(x, KVDownsample(grid=grid, factor=(2, 2), mode="avg")).view(3, 4)
    assert avg[0, 0].item() == pytest.approx((0 + 1 + 7 + 8) / 4)
    assert avg[2, 3].item() == pytest.approx(34.0)  # partial border cell: mean of valid tokens only
    text = torch.full((1, 3, 1, 1), -1.0)
    joined = downsample_kv(torch.cat([text, x], 1), KVDownsample(grid=grid, factor=(2, 2), start=3))
    assert joined.shape[1] == 3 + 12 and torch.all(joined[:, :3] == -1)


def test_window_mask_text_global_and_radius_strict():
    w = LocalWindow(grid=(3, 4), radius=1.0, text_len=2, text_first=True)
    m = window_mask(w, 14, 14, torch.device("cpu"))
    assert m[:2].all() and m[:, :2].all()
    img = m[2:, 2:]
    assert img.diagonal().all() and img.sum() == 12  # radius 1, strict: only the token itself
    w2 = LocalWindow(grid=(3, 4), radius=1.5, text_len=0)
    assert window_mask(w2, 12, 12, torch.device("cpu"))[5].sum() == 9  # interior token: 3x3 block
    q, k, v = (torch.randn(1, 14, 2, 4) for _ in range(3))
    out = kernels.attention(q, k, v, window=w)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=m).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-6)


def test_backend_choice():
    assert kernels.current() in ("auto", "torch", "triton")
    with kernels.using("torch"):
        assert kernels.current() == "torch"
    with pytest.raises(ValueError, match="choose one of auto, torch, triton"):
        kernels.use("cuda")


@pytest.mark.parametrize("masked", [False, True])
def test_capture_without_grad_uses_sdpa_lse_and_agrees_with_the_autograd_path(masked):
    """No-grad capture (AttentionStore) reads the log-sum-exp of SDPA's own CPU kernel: the output is
    plain SDPA's bit for bit and the probabilities equal the explicit-logit path used for guidance."""
    from attnedit.kernels.dispatch import _captured_probs, _combine_masks, torch_attention

    q, k, v = torch.randn(2, 48, 3, 8), torch.randn(2, 20, 3, 8), torch.randn(2, 20, 3, 8)
    regions = RegionMask(torch.randint(0, 2, (2, 48)), torch.randint(0, 2, (2, 20)),
                         torch.tensor([[True, False], [True, True]])) if masked else None
    capture = torch.tensor([0, 3, 7, 19])
    out, probs = torch_attention(q, k, v, regions=regions, capture=capture)
    bias = _combine_masks(None, regions.dense(), q.dtype) if masked else None
    plain = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=bias).transpose(1, 2)
    assert torch.equal(out, plain)
    expected = _captured_probs(q, k, None, bias, capture)
    assert torch.allclose(probs, expected, atol=1e-6)
    q.requires_grad_(True)
    _, with_grad = torch_attention(q, k, v, regions=regions, capture=capture)
    assert with_grad.grad_fn is not None and torch.allclose(with_grad, expected, atol=1e-6)

# ----------------------------------------------------------------------------- the backend registry


@pytest.fixture
def registry_state(monkeypatch):
    """Backends registered by a test are removed after it, and the fallback warnings start afresh."""
    from attnedit.kernels import dispatch

    before = dict(dispatch.BACKENDS)
    monkeypatch.setattr(dispatch, "_WARNED", set())
    yield dispatch
    dispatch.BACKENDS.clear()
    dispatch.BACKENDS.update(before)


def test_auto_on_the_cpu_explains_why_triton_is_not_taken():
    q = torch.randn(1, 6, 2, 8)
    e = kernels.explain(q, q, q, backend="auto")
    assert (e.choice, e.backend, e.error) == ("auto", "torch", None)
    assert e.refused["triton"].constraint == "auto_devices"
    assert e.refused["triton"].reason == "'auto' takes it for cuda tensors only, not cpu"
    assert str(e).splitlines()[0] == "auto -> torch" and "auto_devices" in str(e)
    assert kernels.explain(q, q, q, backend="torch").backend == "torch"
    with pytest.raises(ValueError, match="choose one of auto, torch, triton"):
        kernels.explain(q, q, q, backend="cuda")


def test_triton_declared_constraints_are_checked_before_triton_is_needed(monkeypatch):
    """Forward-only and the device are decided by the dispatch's declaration, before triton_backend is imported."""
    from attnedit.kernels import dispatch

    q = torch.randn(1, 4, 1, 8, requires_grad=True)
    e = kernels.explain(q, q, q, backend="triton")
    assert e.backend == "torch" and e.refused["triton"].constraint == "forward_only"
    assert e.refused["triton"].reason == "gradients must flow (the kernels are forward-only)"
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    e = kernels.explain(q.detach(), q.detach(), q.detach(), backend="triton")
    assert e.backend is None and e.refused["triton"].constraint == "cuda_or_interpreter"
    assert e.refused["triton"].reason == "CPU tensors need TRITON_INTERPRET=1" and e.refused["triton"].unavailable
    assert "use('triton') was forced but cannot run here" in e.error and "use('torch') on the CPU" in e.error
    with pytest.raises(ValueError, match="no attention backend 'nope'"):
        dispatch.get_backend("nope")


def _only_with_regions(q, k, v, *, regions=None, **_):
    return None if regions is not None else "needs region labels"


def _cpu_only(q, k, v, **_):
    return None if q.device.type == "cpu" else f"{q.device.type} tensors are not supported"


def test_a_third_backend_registers_with_constraints(registry_state):
    calls = []

    @kernels.register_backend("mine", constraints=[_cpu_only, _only_with_regions], auto_devices=("cpu",))
    def mine(q, k, v, **features):
        calls.append(sorted(name for name, value in features.items() if value is not None))
        return kernels.torch_attention(q, k, v, **features)

    assert kernels.backend_names() == ["torch", "triton", "mine"]
    assert [c.__name__ for c in registry_state.get_backend("mine").all_constraints()] == ["_cpu_only",
                                                                                           "_only_with_regions"]
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    regions = RegionMask(torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long),
                         torch.ones(1, 1, dtype=torch.bool))
    # "auto" takes it on its devices when its constraints pass, else falls back silently
    assert kernels.explain(q, k, v, regions=regions).backend == "mine"
    kernels.attention(q, k, v, regions=regions)
    assert calls == [["regions"]]
    e = kernels.explain(q, k, v)
    assert e.backend == "torch" and e.refused["mine"].reason == "needs region labels"
    assert e.refused["mine"].constraint == "_only_with_regions"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.attention(q, k, v)
    assert len(calls) == 1
    # forced: falls back to PyTorch with one warning per distinct reason
    with kernels.using("mine"):
        assert kernels.current() == "mine"
        with pytest.warns(UserWarning, match=r"use\('mine'\): a call runs on PyTorch instead: needs region labels"):
            out = kernels.attention(q, k, v)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(kernels.attention(q, k, v), out)
    assert torch.equal(out, kernels.torch_attention(q, k, v)[0])
    kernels.unregister_backend("mine")
    with pytest.raises(ValueError, match="choose one of auto, torch, triton"):
        kernels.use("mine")


def test_the_older_registration_form_and_an_unimportable_declared_backend(registry_state):
    q = torch.randn(1, 4, 1, 8)
    kernels.register_backend("legacy", lambda q, k, v, **f: f["mask"] is None, kernels.torch_attention)
    e = kernels.explain(q, q, q, backend="legacy", mask=torch.ones(4, 4, dtype=torch.bool))
    assert e.backend == "torch" and e.refused["legacy"].reason.endswith("() is False")
    assert kernels.explain(q, q, q, backend="legacy").backend == "legacy"
    kernels.register_backend("ghost", module="attnedit.kernels._no_such_module", constraints=[_cpu_only],
                             auto_devices=("cpu",))
    e = kernels.explain(q, q, q, backend="auto")
    assert e.backend == "torch" and e.refused["ghost"].constraint == "importable"
    assert "ghost is not importable" in e.refused["ghost"].reason
    with kernels.using("ghost"), pytest.raises(RuntimeError, match="use\\('ghost'\\) was forced but cannot run here"):
        kernels.attention(q, q, q)
    with pytest.raises(ValueError, match="fallback"):
        kernels.unregister_backend("torch")


def test_only_the_dispatch_imports_the_dispatch():
    """No cycle: kernels, references and backends import `types`, `reference`, `registry` and each other, never
    `dispatch`, which imports the backends (the Triton one lazily, through its declaration)."""
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "kernels").glob("*.py"):
        if path.name == "dispatch.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.module != "dispatch", f"{path.name} imports the dispatch"
                assert node.module or all(a.name != "dispatch" for a in node.names), path.name


def test_the_kernels_folder_does_not_shadow_the_pypi_kernels_package():
    """transformers imports the PyPI package `kernels`; run from a checkout (the repository root on sys.path), a
    top-level `kernels` package of ours would shadow it and break every model load. So `kernels/` holds the kernel
    files without an `__init__.py`, and `attnedit/kernels/` (the package) links each of them."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert not (root / "kernels" / "__init__.py").exists()
    files = {p.name for p in (root / "kernels").glob("*.py")}
    links = {p.name for p in (root / "attnedit" / "kernels").glob("*.py") if p.is_symlink()}
    assert files == links, f"kernel files without a link in attnedit/kernels: {sorted(files - links)}"
    for name in files:
        assert (root / "attnedit" / "kernels" / name).resolve() == (root / "kernels" / name).resolve()
