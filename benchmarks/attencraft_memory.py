"""Memory of one AttenCraft training step on an SD1.5-architecture UNet (random weights), three ways of keeping maps.

    python benchmarks/attencraft_memory.py                    # accounting at 512 + a real CPU check at 128
    python benchmarks/attencraft_memory.py --real-size 0      # accounting only (seconds, no weights allocated)

Variants (batch 2 = instance + prior image, K/V of every attn2 trainable, start token's K/V detached):
- plain:      no maps recorded (Custom-Diffusion-style step).
- attencraft: attnedit's recorder: head-averaged cross maps of SOT + 2 tokens at latent/4 (16x16 at 512) with
              gradient; on a mask-refresh step also the latent/2 (32x32) self-attention, without gradient.
- official:   the official store: every attention map with <= 64*64 queries (cross and self, every head) kept
              inside the autograd graph, as `AttentionStore.forward` does (its between_steps clones not counted,
              so this is a lower bound for the official code).

What is measured (no GPU in this project's sessions, so nothing here is a CUDA reading):
1. "saved": exact bytes of every tensor autograd saves for backward during the forward, plus the maps kept
   by the store, deduplicated by storage, counted by `torch.autograd.graph.saved_tensors_hooks` on the meta
   device (shapes only, nothing allocated); weights autograd saves are not counted (they are the weights).
   SDPA is replaced by a function that saves what the fused kernels
   save (q, k, v, out and the log-sum-exp), because the meta device would otherwise take the math path and
   count N x N matrices that flash / memory-efficient attention never store.
2. "real": peak resident memory of a real forward + backward on the CPU (VmHWM in a fresh process, reset
   just before the step, minus the resident size at that moment) at a small size, to check the accounting against an
   allocator. Weights, K/V gradients and Adam states are listed separately (they do not depend on the maps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SD15 = dict(
    sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
    attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
VARIANTS = ("plain", "attencraft", "attencraft-refresh", "official")
GiB = 2**30


class _FusedSDPA(torch.autograd.Function):
    """Saves what flash / memory-efficient attention save for backward: q, k, v, out and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the accounting run stops after the forward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FusedSDPA.apply(q, k, v)


def _build(device: str):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from attnedit.tiny import build_tiny

    tiny = build_tiny("sd")  # tokenizer / text encoder / VAE only complete the pipeline: the step uses the UNet
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15)
    pipe = StableDiffusionPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet, scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    unet.requires_grad_(False)
    trainable = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            for proj in (module.to_k, module.to_v):
                proj.weight.requires_grad_(True)
                trainable.append(proj.weight)
    return pipe, trainable


def _official_store():
    from attnedit.controls import Control

    class OfficialStore(Control):
        """Explicit per-head attention probabilities of every layer with <= 64*64 queries, kept with gradient."""

        name = "official_store"
        phases = ("guidance",)

        def __init__(self):
            super().__init__()
            self.kept: list[torch.Tensor] = []

        def attend(self, ctx, q, k, v, mask):
            scale = q.shape[-1] ** -0.5
            probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale, dim=-1)
            if q.shape[1] <= 64 * 64:
                self.kept.append(probs)
            return torch.einsum("bhqk,bkhd->bqhd", probs, v)

    return OfficialStore()


def step(variant: str, size: int, device: str, backward: bool, built=None) -> dict:
    """One training forward (and backward when `backward`); returns the saved-tensor accounting."""
    from attnedit.controller import Controller
    from attnedit.layout import BatchLayout
    from attnedit.methods.attencraft import MapRecorder, jsd, map_levels, minmax, upsample_maps

    pipe, trainable = built or _build(device)
    ctrl = Controller(pipe, [])
    reg = ctrl.registry
    if variant == "official":
        control = _official_store()
    else:
        cross_level, self_level = map_levels(list(reg), (size // 8, size // 8))
        control = MapRecorder(reg, cross_level, self_level)
        if variant != "plain":
            control.positions = torch.tensor([0, 5, 7])
            control.record_self = variant == "attencraft-refresh"
    ctrl.controls = [control]
    ctrl.install()
    ctrl.begin_run(None)
    lat = size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, lat, lat, generator=gen).to(device)
    ehs = torch.randn(2, 77, 768, generator=gen).to(device)
    target = torch.randn(2, 4, lat, lat, generator=gen).to(device)
    seen: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in pipe.unet.parameters()}

    def pack(t: torch.Tensor):  # weights saved for backward are not extra memory
        st = t.untyped_storage()
        if st._cdata not in weights:
            seen[st._cdata] = max(seen.get(st._cdata, 0), st.nbytes())
        return t

    real_unique = torch.unique
    real_sdpa = F.scaled_dot_product_attention
    if device == "meta":  # shapes only: keys are already sorted and unique; fused-kernel saving rule for SDPA
        torch.unique = lambda t, *a, **k: t if t.device.type == "meta" else real_unique(t, *a, **k)
        F.scaled_dot_product_attention = _fused_sdpa
    try:
        with ctrl.pass_phase("guidance", layout=BatchLayout.standard(2, False), step=0), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pred = pipe.unet(x, 500, encoder_hidden_states=ehs).sample
            loss = F.mse_loss(pred, target)
            if variant != "plain":
                if variant == "official":
                    cross = [p.mean(1)[0] for p in control.kept if p.shape[-1] == 77 and p.shape[2] == (lat // 4) ** 2]
                    maps = torch.stack(cross).mean(0)[:, [0, 5, 7]].reshape(lat // 4, lat // 4, 3)
                else:
                    maps = control.cross_maps()
                up = upsample_maps(maps, (lat // 2, lat // 2))
                masks = torch.rand(3, (lat // 2) ** 2, generator=gen).to(device)
                loss = loss + torch.stack([jsd(minmax(up[..., c]).flatten(), masks[c]) for c in range(3)]).mean()
        kept = control.kept if variant == "official" else [t for t in (control.cross_sum, control.self_sum)
                                                              if t is not None]
        for t in kept:
            st = t.untyped_storage()
            seen.setdefault(st._cdata, st.nbytes())
        saved = sum(seen.values())
        if backward:
            loss.backward()
    finally:
        torch.unique = real_unique
        F.scaled_dot_product_attention = real_sdpa
        ctrl.remove()
    n_weights = sum(p.numel() for p in pipe.unet.parameters())
    n_train = sum(p.numel() for p in trainable)
    return {"saved": saved, "weights": n_weights * 4, "trainable": n_train * 4 * 4}  # param + grad + 2 Adam


def _status(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _real(variant: str, size: int) -> dict:
    """Forward + backward on the CPU in this fresh process: peak RSS of the step minus RSS before it."""
    built = _build("cpu")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status("VmRSS")
    step(variant, size, "cpu", backward=True, built=built)
    return {"before": before, "peak": _status("VmHWM")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--real-size", type=int, default=128, help="size of the real CPU check (0 = skip)")
    ap.add_argument("--real-variants", default=",".join(VARIANTS), help="variants of the real CPU check")
    ap.add_argument("--out", default="benchmarks/results/attencraft_memory.json")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # a shared, busy machine: one thread is much faster than two fighting for cores
    if args._child:
        print(json.dumps(_real(args._child[0], int(args._child[1]))))
        return 0
    rows = {}
    print(f"saved-tensor accounting (meta device), SD1.5 UNet, batch 2, {args.size}x{args.size}")
    print(f"{'variant':<20}{'activations+maps GiB':>22}{'vs plain':>10}")
    for v in VARIANTS:
        r = step(v, args.size, "meta", backward=False)
        rows[v] = r
    base = rows["plain"]["saved"]
    for v in VARIANTS:
        print(f"{v:<20}{rows[v]['saved'] / GiB:>22.3f}{rows[v]['saved'] / base:>10.2f}x")
    w = rows["plain"]
    print(f"weights (fp32) {w['weights'] / GiB:.2f} GiB; K/V params+grads+Adam {w['trainable'] / GiB:.2f} GiB "
          "(same for every variant)")
    result = {"size": args.size, "accounting_bytes": {v: rows[v]["saved"] for v in VARIANTS},
              "weights_bytes": w["weights"], "trainable_state_bytes": w["trainable"]}
    if args.real_size:
        print(f"\nreal CPU check at {args.real_size}x{args.real_size} (fresh process per variant)")
        print(f"{'variant':<20}{'accounting GiB':>16}{'real peak - before GiB':>24}")
        real = {}
        for v in args.real_variants.split(","):
            acc = step(v, args.real_size, "meta", backward=False)["saved"]
            cmd = [sys.executable, __file__, "--_child", v, str(args.real_size)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            real[v] = {"accounting": acc, "peak_minus_before": r["peak"] - r["before"]}
            print(f"{v:<20}{acc / GiB:>16.3f}{real[v]['peak_minus_before'] / GiB:>24.3f}")
        result["real_cpu"] = {"size": args.real_size, **real}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
