"""attnedit.kernels: the attention dispatch and the fused Triton kernels.

Every control computes attention through `attention(...)`; the backend is chosen by
`use("torch" | "triton" | "auto")` or the `ATTNEDIT_KERNELS` environment variable.
"""

from .dispatch import attention, current, register_backend, torch_attention, use, using
from .types import KVDownsample, LocalWindow, RegionMask

__all__ = [
    "KVDownsample",
    "LocalWindow",
    "RegionMask",
    "attention",
    "current",
    "register_backend",
    "torch_attention",
    "use",
    "using",
]
