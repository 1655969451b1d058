"""The paths around a run: stock calls and the user's callbacks, direct denoiser calls, backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnedit
from attnedit import kernels
from attnedit.kernels import dispatch
from attnedit.tiny import tiny_call_kwargs

PROMPT = "a cat and a dog"


@pytest.fixture(scope="module")
def sd():
    return attnedit.load("tiny-sd")


def _call(edit_pipe, **extra):
    latents = edit_pipe.initial_latents(1, 64, 64, [torch.Generator().manual_seed(0)])
    return dict(num_inference_steps=3, guidance_scale=7.5, height=64, width=64, latents=latents, output_type="np",
                **tiny_call_kwargs(edit_pipe.family.name), **extra)


def test_user_callback_keeps_working_and_is_composed_with_guidance(sd):
    """The user's callback runs every step, sees its own tensor inputs, and what it returns is used;
    attnedit's update of the next step's latents comes after it, on the latents it returned."""
    seen: list[tuple[int, list[str]]] = []

    def mine(pipe, step, timestep, kw):
        seen.append((step, sorted(kw)))
        return {"latents": kw["latents"] * 0.5} if step == 0 else {}

    ae = attnedit.AttendExcite(words=["cat", "dog"], thresholds={}, steps=(0, 3))
    with attnedit.controlled(sd.pipe, ae):
        guided = sd.pipe(PROMPT, callback_on_step_end=mine,
                         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **_call(sd)).images
    assert [s for s, _ in seen] == [0, 1, 2]
    assert all(keys == ["latents", "prompt_embeds"] for _, keys in seen)
    assert [e["step"] for e in ae.records()["guidance"]] == [0, 1, 2]
    alone = sd.pipe(PROMPT, callback_on_step_end=mine, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                    **_call(sd)).images
    assert not np.array_equal(guided, alone)
    # without attnedit the user's callback behaves exactly as before (it halves the latents at step 0)
    plain = sd.pipe(PROMPT, **_call(sd)).images
    assert not np.array_equal(alone, plain)


def test_pipeline_callback_objects_are_composed(sd):
    """diffusers' PipelineCallback objects (their own tensor inputs) work under attnedit too."""
    from diffusers.callbacks import PipelineCallback

    class Count(PipelineCallback):
        tensor_inputs = ("prompt_embeds",)

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.steps = [*getattr(self, "steps", []), step_index]
            assert "prompt_embeds" in callback_kwargs
            return {}

    count = Count(cutoff_step_ratio=1.0)
    ae = attnedit.AttendExcite(words=["cat", "dog"], thresholds={}, steps=(0, 3))
    with attnedit.controlled(sd.pipe, ae):
        sd.pipe(PROMPT, callback_on_step_end=count, **_call(sd))
    assert count.steps == [0, 1, 2]
    assert [e["step"] for e in ae.records()["guidance"]] == [0, 1, 2]  # attnedit's half ran too


def test_edit_pipeline_composes_a_user_callback(sd):
    steps: list[int] = []
    res = sd(PROMPT, seed=0, steps=3, controls=[attnedit.AttendExcite(words=["cat", "dog"], thresholds={})],
             callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {})
    assert steps == [0, 1, 2]
    assert len(res.records["attend_excite"]["guidance"]) == 2  # Steps(0, 0.5) of 3 steps: 0 and 1


def test_direct_denoiser_call_resolves_the_top_level():
    """Calling the denoiser yourself after attnedit.apply: ToDo still downsamples the top level only."""
    pipe = attnedit.load("tiny-sd").pipe
    todo = attnedit.ToDo(factor=2)
    with attnedit.controlled(pipe, todo) as ctrl:
        sample = torch.randn(1, 4, 8, 8)
        pipe.unet(sample, 10, encoder_hidden_states=torch.randn(1, 77, 32))
        top = {n for n, i in ctrl.registry.layers.items() if i.kind == "self" and i.level == 0}
        assert set(todo.records()["layers"]) == top
        assert len(top) < len([i for i in ctrl.registry if i.kind == "self"])


def test_direct_denoiser_call_refuses_latent_guidance():
    """Also after a refused pipeline call, and after an explicit begin_run (the user's own loop)."""
    pipe = attnedit.load("tiny-sd").pipe
    unet_args = (torch.randn(1, 4, 8, 8), 10)
    with attnedit.controlled(pipe, attnedit.AttendExcite(words=["cat"])) as ctrl:
        with pytest.raises(RuntimeError, match="needs a pipeline call"):
            pipe.unet(*unet_args, encoder_hidden_states=torch.randn(1, 77, 32))
        with pytest.raises(ValueError, match="word 'cat' is not in the prompt"):
            pipe("a red circle", num_inference_steps=2, height=64, width=64)
        with pytest.raises(RuntimeError, match="needs a pipeline call"):
            pipe.unet(*unet_args, encoder_hidden_states=torch.randn(1, 77, 32))
        ctrl.begin_run(["a cat"], num_steps=2, height=64, width=64)
        with pytest.raises(RuntimeError, match="needs a pipeline call"):
            pipe.unet(*unet_args, encoder_hidden_states=torch.randn(1, 77, 32))


def test_direct_denoiser_call_checks_the_step_window():
    pipe = attnedit.load("tiny-sd").pipe
    pipe.scheduler.set_timesteps(4)
    with attnedit.controlled(pipe, attnedit.ToDo(steps=(100, None))), pytest.raises(ValueError, match="4-step run"):
        pipe.unet(torch.randn(1, 4, 8, 8), pipe.scheduler.timesteps[0], encoder_hidden_states=torch.randn(1, 77, 32))


def test_pipeline_is_restored_after_a_call_that_raised_and_keeps_its_own_attributes(sd):
    """A user's own instance prepare_latents survives a guided call and remove(); a call raising in the
    middle of the loop leaves the class, processors and attributes as they were."""
    pipe = sd.pipe
    stock_class, processors = type(pipe), dict(pipe.unet.attn_processors)
    calls: list[int] = []

    def my_prepare(*a, **kw):
        calls.append(1)
        return type(pipe).prepare_latents(pipe, *a, **kw)

    pipe.prepare_latents = my_prepare
    try:
        ae = attnedit.AttendExcite(words=["cat", "dog"], thresholds={})
        with attnedit.controlled(pipe, ae):
            pipe(PROMPT, **_call(sd))
            assert calls == [1] and ae.records()["guidance"][0]["step"] == 0

            def boom(p, i, t, kw):
                if i == 1:
                    raise KeyboardInterrupt
                return {}

            with pytest.raises(KeyboardInterrupt):
                pipe(PROMPT, callback_on_step_end=boom, **_call(sd))
        assert vars(pipe)["prepare_latents"] is my_prepare
    finally:
        del pipe.prepare_latents
    assert type(pipe) is stock_class and not hasattr(pipe, "_attnedit_controller")
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert "cache_context" not in vars(pipe.unet)


def test_a_backend_chosen_while_installed_stays_after_remove():
    pipe = attnedit.load("tiny-flux")
    try:
        with attnedit.controlled(pipe.pipe, attnedit.ToDo()):
            pipe.denoiser.set_attention_backend("_native_math")
        backends = {str(p._attention_backend) for p in pipe.denoiser.attn_processors.values()}
        assert backends == {"AttentionBackendName._NATIVE_MATH"}
    finally:
        pipe.denoiser.reset_attention_backend()


def test_empty_selections_are_refused_and_an_empty_window_warns(sd):
    with pytest.raises(ValueError, match=r"Steps\(5, 2\): the start is after the stop"):
        attnedit.Steps(5, 2)
    with pytest.raises(ValueError, match="selects no attention layer"):
        sd(PROMPT, steps=2, controls=[attnedit.AttentionStore(layers=attnedit.Select(min_index=10**9))])
    with pytest.raises(ValueError, match=r"selects no step of this 2-step run"):
        sd(PROMPT, steps=2, controls=[attnedit.ToDo(steps=(5, None))])
    with pytest.warns(UserWarning, match="selects no step, so it does not act"):
        sd(PROMPT, steps=2, controls=[attnedit.ToDo(steps=(0, 0))])


def test_masactrl_with_nothing_to_copy_from_is_refused(sd):
    with pytest.raises(ValueError, match="MasaCtrl has nothing to copy from"):
        sd("a cat", steps=2, controls=[attnedit.MasaCtrl()])
    with attnedit.controlled(sd.pipe, attnedit.MasaCtrl()), pytest.raises(ValueError, match="nothing to copy"):
        sd.pipe("a cat", **_call(sd))


def test_store_without_prompt_words_is_refused(sd):
    embeds, _ = sd.pipe.encode_prompt(PROMPT, "cpu", 1, False)
    with attnedit.controlled(sd.pipe, attnedit.AttentionStore()):
        with pytest.raises(ValueError, match="AttentionStore works on the prompt's words"):
            sd.pipe(prompt_embeds=embeds, **{**_call(sd), "guidance_scale": 1.0})


# ------------------------------------------------------------------------------------ backends
def test_triton_is_skipped_when_gradients_must_flow():
    """The kernels are forward-only: with grad needed, forced "triton" computes on the PyTorch path."""
    q, k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3))
    with kernels.using("triton"):
        out, probs = kernels.attention(q, k, v, capture=torch.tensor([0, 3]))
        assert out.grad_fn is not None and probs.grad_fn is not None
        (probs.sum() + out.sum()).backward()
        assert q.grad is not None and float(q.grad.abs().sum()) > 0
        with torch.no_grad():
            out2, _ = kernels.attention(q, k, v, capture=torch.tensor([0, 3]))
    assert out2.grad_fn is None
    assert torch.allclose(out, out2, atol=1e-5)


def test_forced_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    q = torch.randn(1, 4, 1, 8)
    with kernels.using("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.attention(q, q, q)


def test_guidance_moves_the_image_the_same_on_both_backends(sd):
    """The guidance passes need gradients, so they run on PyTorch whatever the backend; the denoising
    passes run on the Triton kernels: the guided image agrees (a large step, so the move is visible)."""
    ae = dict(words=["cat", "dog"], thresholds={}, scale_factor=1e4)
    torch_img = np.asarray(sd(PROMPT, seed=0, steps=3, controls=[attnedit.AttendExcite(**ae)]).image, dtype=np.int16)
    with kernels.using("triton"):
        triton_img = np.asarray(sd(PROMPT, seed=0, steps=3, controls=[attnedit.AttendExcite(**ae)]).image,
                                dtype=np.int16)
    plain = np.asarray(sd(PROMPT, seed=0, steps=3).image, dtype=np.int16)
    assert np.abs(torch_img - triton_img).max() <= 2
    assert np.abs(torch_img - plain).max() > 20  # the guidance moved the image on both


@pytest.mark.parametrize("controls", [[], ["store"]])
def test_users_diffusers_attention_backend_holds(controls, monkeypatch):
    """With attnedit on (a control active or not), plain attention of a layer whose stock processor
    dispatches through diffusers goes to the backend the user chose with set_attention_backend."""
    import diffusers.models.attention_dispatch as ad

    pipe = attnedit.load("tiny-flux")
    seen: list[object] = []
    real = ad.dispatch_attention_fn

    def spy(*args, backend=None, **kw):
        seen.append(backend)
        return real(*args, backend=backend, **kw)

    monkeypatch.setattr(ad, "dispatch_attention_fn", spy)
    pipe.denoiser.set_attention_backend("_native_math")
    try:
        store = [attnedit.AttentionStore(layers=attnedit.Select(name="single_transformer_blocks.0.*"))] \
            if controls else []
        pipe("a red cube", seed=0, steps=1, controls=store)
    finally:
        pipe.denoiser.reset_attention_backend()
    assert seen and all(str(b) == "AttentionBackendName._NATIVE_MATH" for b in seen)


# ------------------------------------------------------------------------------- the final guard
class _NaNAt(attnedit.Control):
    """A test control whose attention output turns NaN from one step on."""

    name = "test-nan-at"

    def __init__(self, step: int):
        self.at = step
        super().__init__(layers=attnedit.Select(kind="self"))

    def output(self, ctx, out):
        return out * float("nan") if ctx.step >= self.at else out


def test_a_nan_prediction_stops_the_run_naming_the_step_and_the_control(sd, tmp_path):
    from attnedit.controller import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"NaN or inf at step 1 .*controls acting there: _NaNAt"):
        sd(PROMPT, seed=0, steps=3, controls=[_NaNAt(1)])
    with attnedit.controlled(sd.pipe, _NaNAt(0)), pytest.raises(NonFiniteError, match="at step 0"):
        sd.pipe(PROMPT, **_call(sd))  # the stock path too
    assert not hasattr(sd.pipe, "_attnedit_controller")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_decoded_image_is_refused_not_written(sd, bad):
    """inf would be clamped to a saturated image and NaN cast to black: the decoder's output is checked."""
    from attnedit.controller import NonFiniteError

    handle = sd.pipe.vae.decoder.conv_out.register_forward_hook(lambda m, a, out: out * bad)
    try:
        with pytest.raises(NonFiniteError, match="decoded image holds NaN or inf"):
            sd(PROMPT, seed=0, steps=1)
    finally:
        handle.remove()
