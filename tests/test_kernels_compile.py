"""Compile every kernel for sm_90 (H100/H200) on the CPU: what the interpreter cannot check.

The interpreter runs the kernels' Python but never lowers them, so a config that needs more shared
memory than an H100 has (227 KB per block), or a construct the compiler rejects, would only show
up on a GPU. Triton's wheel bundles ptxas, so the full pipeline (TTIR -> TTGIR -> LLIR -> PTX ->
cubin) runs here with a fixed target. It must run without TRITON_INTERPRET, hence the subprocess.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SMEM = 227 * 1024  # max dynamic shared memory per block on sm_90


def _signature(kernel, consts: dict, ptrs: dict, floats: tuple[str, ...]):
    from triton.compiler import ASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for p in params:
        if p in consts:
            sig[p] = "constexpr"
        elif p[0].isupper():  # tensors are the capitalised parameters
            sig[p] = ptrs.get(p, ptrs["*"])
        else:
            sig[p] = "fp32" if p in floats else "i32"
    return ASTSource(kernel, sig, constexprs={(params.index(k),): v for k, v in consts.items()})


def compile_all() -> list[str]:
    """Compile the configs the wrappers launch; return one problem line per failure."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from attnedit.kernels import flash_attention as fa
    from attnedit.kernels import local_window_attention as lw
    from attnedit.kernels import todo_attention as td

    target = GPUTarget("cuda", 90, 32)
    problems = []
    # The configs nearest the shared-memory limit (fp16 stays under 100 KB; fp32 near 227 KB).
    for dtype, name, head_dims in ((torch.float16, "fp16", (160,)), (torch.float32, "fp32", (80, 160))):
        prec = fa.input_precision(dtype)
        for head_d in head_dims:
            bd = fa.block_d_for(head_d)
            cfg = fa.launch_config(bd, dtype)
            opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            common = dict(HEAD_D=head_d, BLOCK_D=bd, IN_PREC=prec, UPCAST=False)
            tq = (8, 16) if cfg["BLOCK_M"] == 128 else (8, 8)
            tk = (8, 8) if cfg["BLOCK_N"] == 64 else (4, 8)
            tile = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
            jobs = [
                (
                    "flash regions+capture",
                    fa._flash_fwd_kernel,
                    dict(**common, **tile, BLOCK_C=64, HAS_REGIONS=True, CAPTURE=True),
                    {"*": f"*{name}", "QL": "*i32", "KL": "*i32", "TBL": "*i8", "CAP": "*i32", "P": "*fp32"},
                    ("qk_scale", "inv_heads"),
                    opts,
                ),
                (
                    "window",
                    lw._local_window_kernel,
                    dict(**common, TQY=tq[0], TQX=tq[1], TKY=tk[0], TKX=tk[1], BLOCK_T=cfg["BLOCK_N"]),
                    {"*": f"*{name}"},
                    ("r2", "qk_scale"),
                    opts,
                ),
            ]
            # nearest modes share flash's tiles; "avg" (unrolled cell loads, 1 stage) is the one to check
            for mode, stages in (("avg", 1),) if dtype == torch.float32 else ():
                consts = dict(**common, **tile, FY=2, FX=2, MODE=td.MODES[mode])
                jobs.append((f"todo {mode}", td._todo_kernel, consts, {"*": f"*{name}"}, ("qk_scale",),
                             dict(opts, num_stages=stages)))  # fmt: skip
            for label, kernel, consts, ptrs, floats, options in jobs:
                what = f"{label} {name} d={head_d}"
                try:
                    compiled = triton.compile(_signature(kernel, consts, ptrs, floats), target=target, options=options)
                except Exception as exc:
                    problems.append(f"{what}: {type(exc).__name__}: {str(exc)[:300]}")
                    continue
                if compiled.metadata.shared > H100_SMEM:
                    problems.append(f"{what}: {compiled.metadata.shared} B shared memory > {H100_SMEM}")
    return problems


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode == 3:
        pytest.skip(res.stdout.strip() or "no CUDA toolchain in the triton install")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]


if __name__ == "__main__":
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401

        found = compile_all()
    except (ImportError, RuntimeError, FileNotFoundError) as exc:  # no nvidia backend / ptxas
        if "ptxas" in str(exc) or isinstance(exc, ImportError):
            print(f"skip: {exc}")
            sys.exit(3)
        raise
    if found and all("ptxas" in line for line in found):
        print(f"skip: ptxas unusable here: {found[0]}")
        sys.exit(3)
    print("\n".join(found) or "all kernels compiled for sm_90 within shared memory")
    sys.exit(1 if found else 0)
