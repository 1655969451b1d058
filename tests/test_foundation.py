"""The foundation: loading, the universal processor, registry grids, step tracking, restoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import attnedit
from attnedit.controls import Control
from attnedit.families import FAMILIES as ADAPTERS
from attnedit.processor import AttnEditProcessor
from attnedit.selectors import Select, Steps
from attnedit.tiny import tiny_call_kwargs

FAMILIES = tuple(ADAPTERS)
DIT_FAMILIES = tuple(name for name, fam in ADAPTERS.items() if fam.arch == "dit")


def _run(pipe, family, prompt="a red cube and a blue ball", steps=2, guidance=5.0, h=64, w=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, height=h, width=w,
               generator=gen, output_type="latent", **tiny_call_kwargs(family))
    return out.images


class Recorder(Control):
    """Records what every attention call saw (layer, step, grid, layout) without changing it."""

    name = "test-recorder"
    phases = ("denoise", "guidance", "inversion")

    def __init__(self, *, layers=None, steps=None, fail_at_step: int | None = None):
        self.fail_at_step = fail_at_step
        super().__init__(layers=layers, steps=steps)

    def reset(self):
        super().reset()
        self.state.calls = []

    def qkv(self, ctx, q, k, v):
        self.state.calls.append(
            dict(layer=ctx.layer.name, step=ctx.step, grid=ctx.grid, n_q=ctx.image.stop - ctx.image.start,
                 rows=[r.cfg for r in ctx.layout.rows], t=ctx.t, text=ctx.text)
        )
        if self.fail_at_step is not None and ctx.step == self.fail_at_step:
            raise RuntimeError("boom")
        return q, k, v


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_and_equal_to_stock_processors(tiny_dir, family):
    """attnedit.load(folder) works, and with no control active outputs equal the stock ones."""
    ep = attnedit.load(tiny_dir / family)
    assert ep.family.name == family
    stock = _run(ep.pipe, family)
    originals = dict(ep.denoiser.attn_processors)
    with attnedit.controlled(ep.pipe) as ctrl:
        assert all(isinstance(p, AttnEditProcessor) for p in ep.denoiser.attn_processors.values())
        ours = _run(ep.pipe, family)
        assert len(ctrl.registry) == len(originals)
    assert (stock - ours).abs().max().item() <= 1e-6
    # an inactive control (empty step window) takes the controlled path and still changes nothing
    with attnedit.controlled(ep.pipe, Recorder(steps=Steps(0, 0))):
        inactive = _run(ep.pipe, family)
    assert (stock - inactive).abs().max().item() <= 1e-6
    # a control that is active but leaves q/k/v alone also changes nothing
    rec = Recorder()
    with attnedit.controlled(ep.pipe, rec):
        active = _run(ep.pipe, family)
    assert rec.state.calls, "recorder never ran"
    assert (stock - active).abs().max().item() <= 1e-6
    after = dict(ep.denoiser.attn_processors)
    assert all(after[k] is originals[k] for k in originals)


def test_registry_grids_square_nonsquare_odd():
    """Grids come from the actual latent: 9x13 latent -> 9x13, 5x7, 3x4 on three UNet levels."""
    from attnedit.tiny import build_tiny

    pipe = build_tiny("sd", levels=3)
    rec = Recorder()
    with attnedit.controlled(pipe, rec) as ctrl:
        levels = ctrl.registry.levels()
        assert levels == [0, 1, 2]
        unet = pipe.unet
        for latent in [(8, 8), (8, 12), (9, 13)]:
            rec.reset()
            sample = torch.randn(1, 4, *latent)
            ehs = torch.randn(1, 77, 32)
            unet(sample, 10, encoder_hidden_states=ehs)
            expected = {0: latent, 1: (-(-latent[0] // 2), -(-latent[1] // 2)),
                        2: (-(-latent[0] // 4), -(-latent[1] // 4))}
            for call in rec.state.calls:
                info = ctrl.registry[call["layer"]]
                assert call["grid"] == expected[info.level], (call, latent)
                assert call["grid"][0] * call["grid"][1] == call["n_q"]
                assert info.grid(latent) == expected[info.level]


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_dit_grids_nonsquare(family):
    ep = attnedit.load(f"tiny-{family}")
    rec = Recorder()
    ep.generate("a red cube", controls=[rec], steps=1, height=64, width=96)
    stride = ep.pixel_stride
    assert {c["grid"] for c in rec.state.calls} == {(64 // stride, 96 // stride)}


def test_flux_true_cfg_uncond_pass_is_labelled():
    ep = attnedit.load("tiny-flux")
    rec = Recorder()
    ep.generate("a red cube", controls=[rec], steps=2, negative_prompt="blurry", true_cfg_scale=2.0)
    labels = {tuple(c["rows"]) for c in rec.state.calls}
    assert labels == {("cond",), ("uncond",)}
    assert sorted({c["step"] for c in rec.state.calls}) == [0, 1]


@pytest.mark.parametrize("guidance, cfg", [(5.0, True), (1.0, False)])
def test_step_tracking_by_timestep(guidance, cfg):
    ep = attnedit.load("tiny-sd")
    rec = Recorder()
    ep.generate(["a cube", "a ball"], controls=[rec], steps=3, guidance=guidance)
    steps = [c["step"] for c in rec.state.calls]
    assert sorted(set(steps)) == [0, 1, 2]
    assert steps == sorted(steps), "steps must be non-decreasing in execution order"
    rows = rec.state.calls[0]["rows"]
    assert rows == (["uncond"] * 2 + ["cond"] * 2 if cfg else ["cond"] * 2)
    # t decreases with the step
    ts = {c["step"]: c["t"] for c in rec.state.calls}
    assert ts[0] > ts[1] > ts[2]


def test_step_tracking_on_stock_pipeline_two_runs():
    """Stock calls through apply(): each call restarts at step 0, extra passes keep the step."""
    from attnedit.tiny import build_tiny

    pipe = build_tiny("sd")
    rec = Recorder()
    attnedit.apply(pipe, rec)
    try:
        pipe("a cube", num_inference_steps=3, guidance_scale=5.0, output_type="latent")
        first = [c["step"] for c in rec.state.calls]
        pipe("a ball", num_inference_steps=2, guidance_scale=5.0, output_type="latent")
        second = [c["step"] for c in rec.state.calls]
    finally:
        attnedit.remove(pipe)
    assert sorted(set(first)) == [0, 1, 2]
    assert sorted(set(second)) == [0, 1]
    assert not hasattr(pipe, "_attnedit_controller")
    assert "encode_prompt" not in vars(pipe)


def test_processors_restored_after_exception():
    ep = attnedit.load("tiny-sd")
    originals = dict(ep.denoiser.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        ep.generate("a cube", controls=[Recorder(fail_at_step=1)], steps=3)
    after = dict(ep.denoiser.attn_processors)
    assert after.keys() == originals.keys()
    assert all(after[k] is originals[k] for k in originals)
    assert not hasattr(ep.pipe, "_attnedit_controller")
    assert ep.denoiser._forward_pre_hooks == {}
    # and the pipeline works exactly as before
    a = ep.generate("a cube", steps=2).images[0]
    b = ep.generate("a cube", steps=2).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_seed_per_image_independent_of_batch():
    ep = attnedit.load("tiny-sd")
    batch = ep.generate(["a cube", "a ball"], seed=[3, 4], steps=2)
    alone = ep.generate("a ball", seed=4, steps=2)
    assert np.abs(np.asarray(batch.images[1], dtype=float) - np.asarray(alone.images[0], dtype=float)).max() <= 1


def test_selectors():
    ep = attnedit.load("tiny-sd")
    ctrl = ep.controller([])
    reg = ctrl.registry
    assert {i.kind for i in reg} == {"self", "cross"}
    up_self = Select(kind="self", block="up").pick(reg)
    assert up_self and all(i.name.startswith("up_blocks") and i.name.endswith("attn1") for i in up_self)
    assert all(i.level == 0 for i in Select(top=True).pick(reg))
    assert [i.name for i in Select(name="mid_block.*attn2").pick(reg)] == [
        "mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert all(i.index >= 3 for i in Select(min_index=3).pick(reg))
    with pytest.raises(ValueError, match="unknown layer kind 'selff'"):
        Select(kind="selff")
    s = Steps(0.5, None)
    assert not s.active(1, 4) and s.active(2, 4)
    with pytest.raises(ValueError):
        Steps(1.5)


def test_conflicting_controls_refused():
    class Replace(Control):
        name = "test-replace"

        def attend(self, ctx, q, k, v, mask):
            return None

    ep = attnedit.load("tiny-sd")
    with pytest.raises(ValueError, match="both set the attention attend"):
        ep.generate("a cube", controls=[Replace(), Replace()], steps=1)
    # disjoint layers compose
    ep.generate("a cube", controls=[Replace(layers=Select(block="down")), Replace(layers=Select(block="up"))],
                steps=1)


def test_unknown_model_and_family(tmp_path):
    with pytest.raises(ValueError, match="neither a folder"):
        attnedit.load("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        attnedit.load(tmp_path / "empty")
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="supported families: Stable Diffusion 1.x"):
        attnedit.load(other)
    with pytest.raises(ValueError, match="load\\(\\) got an unknown keyword argument 'sheduler'"):
        attnedit.load("tiny-sd", sheduler="ddim")
    with pytest.raises(ValueError, match="dtype must be one of float32, fp32, float16"):
        attnedit.load("tiny-sd", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            attnedit.load("tiny-sd", device="cuda")


def test_bad_generate_inputs():
    ep = attnedit.load("tiny-sd")
    with pytest.raises(ValueError, match="height must be a multiple of 8 for this model .*, got 60; e.g. 56 or 64"):
        ep.generate("a cube", height=60)
    with pytest.raises(ValueError, match="seed must be one seed per image: 1 images, 2 seeds given, got"):
        ep.generate("a cube", seed=[1, 2])
    with pytest.raises(ValueError, match="unknown option 'wrds' for control 'store'; valid options: words"):
        attnedit.make_control("store", {"wrds": ["cube"]})
    with pytest.raises(ValueError, match="unknown control 'nope'"):
        attnedit.make_control("nope", {})
    with pytest.raises(ValueError, match=r"latents must be of shape \(1, 4, 8, 8\) .*shape \(1, 4, 9, 8\)"):
        ep.generate("a cube", latents=torch.zeros(1, 4, 9, 8))
    with pytest.raises(ValueError, match="latents must be torch.float32 on cpu .*got torch.float64"):
        ep.generate("a cube", latents=torch.zeros(1, 4, 8, 8, dtype=torch.float64))
    ep.pipe.text_encoder.to(torch.device("meta"))
    try:
        with pytest.raises(ValueError, match="pipeline components are on different devices"):
            ep.generate("a cube")
    finally:
        ep.pipe.text_encoder.to_empty(device="cpu")


def test_long_prompt_warns_with_cut_text():
    ep = attnedit.load("tiny-sd")
    long_prompt = "a red cube " * 12  # 132 byte-level tokens > 75
    with pytest.warns(UserWarning, match="this part is cut"):
        ep.generate(long_prompt, steps=1, controls=[attnedit.AttentionStore()])


def test_store_word_lookup_and_multitoken_words():
    ep = attnedit.load("tiny-sd")
    store = attnedit.AttentionStore()
    ep.generate("a red cube and a blue ball", controls=[store], steps=2)
    tokens = store._run.tokens[0]
    # the tiny tokenizer is byte-level: "cube" is four tokens, merged into one word map
    assert len(tokens.find("cube")) == 4
    m = store.word_map("cube")
    assert m.shape == store.grids()[0]
    assert torch.isfinite(m).all() and m.sum() > 0
    with pytest.raises(ValueError, match="word 'zebra' is not in the prompt; its words are: a, red, cube"):
        store.word_map("zebra")
    with pytest.raises(ValueError, match="not in the prompt"):
        ep.generate("a cube", controls=[attnedit.AttentionStore(words=["zebra"])], steps=1)
    n_chars = len("a red cube and a blue ball".replace(" ", ""))  # whitespace is not a token
    assert tokens.bos == [0] and tokens.eos == [n_chars + 1] and tokens.n_tokens == n_chars
    # probabilities of all tokens of a row sum to <= 1 (captured positions are a subset)
    total = store.token_maps().sum(-1)
    assert float(total.max()) <= 1.0 + 1e-5


def test_store_memory_bound_sd15_512():
    """Every 16x16 and 32x32 cross map of a 50-step SD1.5 run at 512 (+ per-step maps) < 50 MB."""
    from attnedit.controls import CallContext
    from attnedit.layers import LayerInfo
    from attnedit.layout import BatchLayout

    store = attnedit.AttentionStore(per_step=True)
    store.reset()
    store._positions = torch.arange(77)
    layout = BatchLayout.standard(1, cfg=True)
    layers = [(f"down_blocks.1.attentions.{i}.transformer_blocks.0.attn2", (32, 32)) for i in range(2)]
    layers += [(f"up_blocks.2.attentions.{i}.transformer_blocks.0.attn2", (32, 32)) for i in range(3)]
    layers += [(f"down_blocks.2.attentions.{i}.transformer_blocks.0.attn2", (16, 16)) for i in range(2)]
    layers += [(f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2", (16, 16)) for i in range(3)]
    for step in range(50):
        for name, grid in layers:
            info = LayerInfo(name, "cross", "up", 0, 0, 0, 0, 0, "attn2")
            n = grid[0] * grid[1]
            ctx = CallContext(info, None, step, 50, 1.0, "denoise", layout, grid, slice(0, n), slice(0, 77))
            store.observe(ctx, torch.rand(2, n, 77))
    assert store.nbytes() < 50 * 2**20, store.nbytes()


def test_stock_apply_records_maps_and_context_manager_restores():
    from attnedit.tiny import build_tiny

    pipe = build_tiny("sd")
    originals = dict(pipe.unet.attn_processors)
    store = attnedit.AttentionStore()
    with pytest.raises(RuntimeError):
        with attnedit.controlled(pipe, store):
            pipe("a red cube", num_inference_steps=2, output_type="latent")
            assert "red" in store.word_maps()
            raise RuntimeError("user code failed")
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())


def test_foreign_processor_detected_is_refused():
    ep = attnedit.load("tiny-sd")
    attnedit.apply(ep.pipe)
    ep.pipe.enable_attention_slicing()  # replaces attnedit processors behind its back
    with pytest.raises(RuntimeError, match="was replaced by SlicedAttnProcessor"):
        ep.pipe("a cube", num_inference_steps=1, output_type="latent")
    attnedit.remove(ep.pipe)
    ctrl = attnedit.apply(ep.pipe)
    with pytest.raises(RuntimeError, match="already applied"):
        attnedit.apply(ep.pipe)
    attnedit.remove(ep.pipe)
    attnedit.remove(ep.pipe)  # idempotent
    assert not ctrl._installed
