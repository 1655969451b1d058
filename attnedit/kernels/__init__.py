"""attnedit.kernels: the attention dispatch, its backend registry and the fused Triton kernels.

Every control computes attention through `attention(...)`; the backend is chosen by
`use("torch" | "triton" | "auto")` (or another registered name) or the `ATTNEDIT_KERNELS`
environment variable. Backends register with small named constraints (`register_backend`);
`explain(q, k, v, **features)` says which backend a call takes and why the others refused.
"""

from .dispatch import (
    Explanation,
    attention,
    current,
    explain,
    register_backend,
    torch_attention,
    unregister_backend,
    use,
    using,
)
from .registry import Backend, Refusal, Unavailable, backend_names
from .types import KVDownsample, LocalWindow, RegionMask

__all__ = [
    "Backend",
    "Explanation",
    "KVDownsample",
    "LocalWindow",
    "Refusal",
    "RegionMask",
    "Unavailable",
    "attention",
    "backend_names",
    "current",
    "explain",
    "register_backend",
    "torch_attention",
    "unregister_backend",
    "use",
    "using",
]
