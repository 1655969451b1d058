"""Family adapters: what each new family's adapter reads from its pipeline, checked against the pipeline itself.

The shared behaviour (reload, equality with the stock processors, grids, the conformance matrix) runs
for every registered family in test_foundation / test_conformance; here is what is particular to the
chat-template text encoders of FLUX.2 and Qwen-Image, to FLUX.2's second pipeline class ([dev]:
`Flux2Pipeline`, outside the matrix, whose tiny pipeline is a variant) and to Qwen-Image's padded-text mask.
"""

from __future__ import annotations

import pytest
import torch

import attnedit
from attnedit.families import FAMILIES, family_from_class, family_of
from attnedit.tiny import build_tiny, tiny_call_kwargs
from attnedit.tokens import index_prompt

PROMPT = "a red cube and a blue ball"


@pytest.fixture(scope="module")
def pipes():
    found = {name: build_tiny(name) for name in ("flux2", "qwenimage")}
    found["flux2-dev"] = build_tiny("flux2", variant="dev")
    return found


def _pipeline_ids(pipe, name: str, prompt: str) -> list[int]:
    """The token ids whose encoder outputs the pipeline hands to the denoiser, as diffusers computes them."""
    tok = pipe.tokenizer
    if name == "flux2-dev":
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input([prompt], system_message=pipe.system_message)
        return tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True,
                                       return_tensors="pt")["input_ids"][0].tolist()
    if name == "flux2":
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True, enable_thinking=False)
        return tok(text).input_ids
    text = pipe.prompt_template_encode.format(prompt)
    return tok(text).input_ids[pipe.prompt_template_encode_start_idx:]


@pytest.mark.parametrize("name", ["flux2", "flux2-dev", "qwenimage"])
def test_word_positions_are_the_pipelines_tokens(pipes, name):
    """A word's positions are where the pipeline's own encoder input holds that word's tokens."""
    pipe = pipes[name]
    index = index_prompt(PROMPT, family_of(pipe).text_segments())
    ids = _pipeline_ids(pipe, name, PROMPT)
    for word in ("red", "cube", "blue", "ball"):
        pos = index.find(word)
        assert pos and max(pos) < len(ids)
        assert pipe.tokenizer.decode([ids[p] for p in pos]).strip() == word


@pytest.mark.parametrize("name", ["flux2", "flux2-dev", "qwenimage"])
def test_registered_by_pipeline_class(pipes, name):
    fam = family_of(pipes[name])
    family = name.split("-")[0]
    assert type(fam) is FAMILIES[family]
    assert family_from_class(type(pipes[name]).__name__) is FAMILIES[family]
    registry = fam.build_registry(fam.denoiser)
    assert len(registry) == len(fam.denoiser.attn_processors)  # every attention layer, by module name
    assert {i.kind for i in registry} == {"joint"}  # text and image tokens attend in one sequence


QWEN_PROMPTS = ["a red circle", "a big blue square on the left of a small green ring"]


def _qwen_latents(pipe, batch, seeds, controls):
    """Latents of a tiny Qwen-Image call, one seeded generator per prompt."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with attnedit.controlled(pipe, *controls):
        return pipe(prompt=batch, num_inference_steps=2, height=64, width=64, generator=gens,
                    output_type="latent", **tiny_call_kwargs("qwenimage")).images


def test_qwenimage_padded_prompt_in_a_batch_equals_it_alone(pipes):
    """Qwen-Image pads the shorter prompt's text and masks it; ToDo shortens the keys under that mask."""
    prompts = QWEN_PROMPTS

    def latents(batch, seeds, controls):
        return _qwen_latents(pipes["qwenimage"], batch, seeds, controls)

    for controls in ([], [attnedit.ToDo(factor=2)]):
        both = latents(prompts, [0, 1], controls)
        for i, prompt in enumerate(prompts):
            alone = latents([prompt], [i], controls)
            assert (both[i] - alone[0]).abs().max().item() <= 1e-5, (controls, i)
    plain = latents(prompts[:1], [0], [])
    todo = latents(prompts[:1], [0], [attnedit.ToDo(factor=2)])
    assert (plain - todo).abs().max().item() > 1e-4  # ToDo acts here


def test_flux2_refuses_what_it_would_ignore(pipes):
    """Reference images and negative prompts: refused before denoising, not dropped."""
    ep = attnedit.EditPipeline(pipes["flux2"], model_name="tiny-flux2")
    with pytest.raises(ValueError, match="negative"):
        ep.generate(PROMPT, steps=1, negative_prompt="blurry")
    with attnedit.controlled(pipes["flux2"], attnedit.AttentionStore(words=["cube"])):
        with pytest.raises(ValueError, match="image"):
            pipes["flux2"](prompt=PROMPT, image=torch.zeros(1, 3, 64, 64), num_inference_steps=1, height=64,
                           width=64, **tiny_call_kwargs("flux2"))


def _dev_latents(pipe, controls=(), prompt=PROMPT, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with attnedit.controlled(pipe, *controls):
        return pipe(prompt=prompt, num_inference_steps=2, guidance_scale=4.0, height=64, width=64, generator=gen,
                    output_type="latent", **tiny_call_kwargs("flux2")).images


def test_flux2_dev_equals_stock_and_controls_act(pipes, tmp_path):
    """Flux2Pipeline: the stock result with no control and an inactive one; word maps, ToDo and CLEAR act."""
    pipe = pipes["flux2-dev"]
    gen = torch.Generator().manual_seed(0)
    stock = pipe(prompt=PROMPT, num_inference_steps=2, guidance_scale=4.0, height=64, width=64, generator=gen,
                 output_type="latent", **tiny_call_kwargs("flux2")).images
    assert (stock - _dev_latents(pipe)).abs().max().item() <= 1e-6
    assert (stock - _dev_latents(pipe, [attnedit.ToDo(factor=2, steps=attnedit.Steps(0, 0))])).abs().max() <= 1e-6
    store = attnedit.AttentionStore(words=["cube", "ball"])
    assert (stock - _dev_latents(pipe, [store])).abs().max().item() <= 1e-6  # capturing changes nothing
    cube, ball = store.word_map("cube"), store.word_map("ball")
    assert cube.shape == ball.shape == (4, 4) and not torch.allclose(cube, ball)
    for control in (attnedit.ToDo(factor=2), attnedit.CLEAR(radius=2)):
        assert (stock - _dev_latents(pipe, [control])).abs().max().item() > 1e-4, control
    pipe.save_pretrained(tmp_path / "dev")
    loaded = attnedit.load(tmp_path / "dev")
    assert type(loaded.pipe).__name__ == "Flux2Pipeline" and loaded.family.name == "flux2"


def test_flux2_dev_refuses_caption_upsampling(pipes):
    """The text encoder would rewrite the prompt the controls index: refused before any model call."""
    with attnedit.controlled(pipes["flux2-dev"], attnedit.AttentionStore(words=["cube"])):
        with pytest.raises(ValueError, match="caption_upsample_temperature"):
            pipes["flux2-dev"](prompt=PROMPT, caption_upsample_temperature=0.7, num_inference_steps=1, height=64,
                               width=64, **tiny_call_kwargs("flux2"))


@pytest.mark.parametrize("name", ["flux2", "flux2-dev"])
def test_flux2_left_padding_moves_the_words_with_it(pipes, name):
    """A tokenizer that pads on the left (padding to max_length, no text mask) puts the prompt at the end."""
    pipe = pipes[name]
    pipe.tokenizer.padding_side = "left"
    try:
        ids = _pipeline_ids(pipe, name, PROMPT)
        length = tiny_call_kwargs("flux2")["max_sequence_length"]
        padded = [pipe.tokenizer.pad_token_id] * (length - len(ids)) + ids
        index = index_prompt(PROMPT, family_of(pipe).text_segments(length))
        for word in ("red", "cube", "ball"):
            assert pipe.tokenizer.decode([padded[p] for p in index.find(word)]).strip() == word
        assert min(index.find("red")) > length // 2
    finally:
        pipe.tokenizer.padding_side = "right"


@pytest.mark.parametrize("name", ["flux2", "qwenimage"])
def test_separate_uncond_pass_stays_uncond_with_a_given_layout(name):
    """A layout handed to the run (consistent, MasaCtrl, batch groups) keeps the CFG pass labelled uncond."""
    from attnedit.layout import BatchLayout

    ep = attnedit.load(f"tiny-{name}")
    plain, given = attnedit.AttentionStore(words=["cube"]), attnedit.AttentionStore(words=["cube"])
    ep.generate(PROMPT, controls=[plain], guidance=4.0, steps=2, seed=0)
    ep.generate(PROMPT, controls=[given], layout=BatchLayout.standard(1, False), guidance=4.0, steps=2, seed=0)
    assert torch.equal(plain.word_map("cube"), given.word_map("cube"))


def test_dev_refuses_img_markers(pipes):
    with attnedit.controlled(pipes["flux2-dev"], attnedit.AttentionStore(words=["cube"])):
        with pytest.raises(ValueError, match=r"\[IMG\]"):
            pipes["flux2-dev"](prompt="a red cube [IMG]", num_inference_steps=1, height=64, width=64,
                               **tiny_call_kwargs("flux2"))


@pytest.mark.parametrize("control", ["agent", "clear:radius=2", "clear:radius=2,backend=dense",
                                     "clear:radius=2,down_factor=2"])
def test_qwenimage_masked_batches_with_agent_and_clear(pipes, control):
    """Prompts of different lengths (a padded-text key mask): the control acts, and a padded prompt in a batch
    gives what it gives alone."""
    prompts = QWEN_PROMPTS

    def latents(batch, seeds, controls):
        return _qwen_latents(pipes["qwenimage"], batch, seeds, controls)

    both = latents(prompts, [0, 1], [control])
    assert (both - latents(prompts, [0, 1], [])).abs().max().item() > 1e-4
    assert (both[0] - latents(prompts[:1], [0], [control])[0]).abs().max().item() <= 1e-5
