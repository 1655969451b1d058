"""FLUX.2 (`Flux2Pipeline`, [dev]: a Mistral-3 text encoder and guidance distilled into an embedding;
`Flux2KleinPipeline`, [klein]: a Qwen3 text encoder and CFG as a separate pass). Both run the same
`Flux2Transformer2DModel`: joint [text, image] attention in double-stream blocks and parallel
single-stream blocks, patchified latents, a prompt read inside the text encoder's chat template.

What differs from FLUX.1 (`flux.py`), and why each method here exists:
- the single-stream blocks are `Flux2ParallelSelfAttention`: one projection makes q, k, v and the
  MLP input, one output projection takes the attention and the MLP outputs together; their forward
  passes `(hidden_states, attention_mask, image_rotary_emb)` positionally (`SelfOnlyAttnEditProcessor`);
- image ids have four axes (t, h, w, layer); t > 0 marks reference-image tokens, which attnedit's
  controls do not place, so a call with `image=` is refused up front;
- the latents a call takes (`latents=`) are the patchified 4-D tensor (B, 4C, H/2, W/2), packed by
  the pipeline itself;
- the prompt is read inside the tokenizer's chat template, so word positions come from the templated
  text (`TextSegment.render`; [dev] puts its system message first); CFG (non-distilled [klein]) is a
  separate pass against "", [dev] has none (guidance is an input of the transformer);
- [dev]'s caption upsampling (`caption_upsample_temperature`) rewrites the prompt with the text
  encoder before encoding it, so the words attnedit indexed would not be the ones encoded: refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Family, ForwardInfo
from .flux import Flux

_SENTINEL = "\x00attnedit-prompt\x00"


class Flux2(Flux):
    name = "flux2"
    order = 60
    label = "FLUX.2"
    pipeline_classes = ("Flux2Pipeline", "Flux2KleinPipeline")
    capabilities = frozenset({"dit", "step_callback", "text_maps"})
    default_steps = 50
    default_guidance = 4.0
    text_options = ("text_encoder_out_layers",)
    tiny_call_kwargs: ClassVar[dict[str, Any]] = {"max_sequence_length": 256}  # [dev]: its system message too
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {"todo": {"native_latent": 128}}

    @property
    def true_cfg(self) -> bool:
        return False  # the pipeline runs CFG itself from guidance_scale (non-distilled checkpoints)

    def guidance_arguments(self, guidance, negative_prompt=None):
        if negative_prompt is not None:
            from ..validate import InputError

            raise InputError("negative_prompt", negative_prompt, "", message=(
                f"{type(self.pipe).__name__} takes no negative prompt (its CFG runs against an empty prompt); "
                "leave negative_prompt unset"))
        return {"guidance_scale": guidance}, None

    def native_size(self):
        side = int(getattr(self.pipe, "default_sample_size", 128) or 128)
        return (side * self.vae_scale_factor, side * self.vae_scale_factor)

    def processor_class(self, module):
        from ..processor import AttnEditProcessor, SelfOnlyAttnEditProcessor

        return SelfOnlyAttnEditProcessor if hasattr(module, "to_qkv_mlp_proj") else AttnEditProcessor

    @property
    def system_message(self) -> str | None:
        """[dev]'s system message, read before the prompt ([klein] has none)."""
        return getattr(self.pipe, "system_message", None)

    def check_call(self, params):
        if params.get("caption_upsample_temperature") is not None:
            raise ValueError(
                "caption_upsample_temperature makes the text encoder rewrite the prompt before it is encoded, so "
                "attnedit's word positions (and the prompt its controls were given) would not be the ones the model "
                "reads; upsample the caption first (pipe.upsample_prompt(...)) and pass the result as the prompt"
            )
        prompts = params.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        if self.system_message is not None and any("[IMG]" in p for p in prompts):
            raise ValueError("Flux2Pipeline removes '[IMG]' from prompts before encoding them, so attnedit's word "
                             "positions would not match: leave '[IMG]' out of the prompt")
        if params.get("image") is not None:
            raise ValueError(
                f"attnedit's controls place the generated image's tokens; the reference images of a "
                f"{type(self.pipe).__name__} call (image=) add tokens they do not place, so the controls would act "
                "on the wrong positions. Run text-to-image calls (no image=) with controls"
            )

    def read_forward(self, sample, kwargs, ehs, previous):
        grid = previous.image_grid if previous is not None else None
        img_ids = kwargs.get("img_ids")
        if img_ids is not None:
            ids = img_ids[0] if img_ids.dim() == 3 else img_ids
            own = ids[ids[:, 0] == 0]  # t > 0: reference-image tokens
            grid = (int(own[:, 1].max()) + 1, int(own[:, 2].max()) + 1)
        hw = (grid[0] * 2, grid[1] * 2) if grid else None
        return ForwardInfo(hw, grid, int(ehs.shape[1]) if ehs is not None else 0)

    # --- attention ---------------------------------------------------------------------------
    def attention(self, proc, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                  image_rotary_emb=None, **_: Any):
        """`Flux2AttnProcessor` (double stream, as FLUX.1's) or `Flux2ParallelSelfAttnProcessor` step by step."""
        if not hasattr(attn, "to_qkv_mlp_proj"):
            return super().attention(proc, attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                     attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
        fused = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = fused.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(fused, [local_qkv, fused.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        q = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        k = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        v = value.unflatten(-1, (-1, attn.head_dim))
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        n_txt = proc.text_len()
        out = proc.attend(attn, hidden_states, None, q, k, v, attention_mask, slice(n_txt, q.shape[1]),
                          slice(0, n_txt))
        out = out.flatten(2, 3).to(q.dtype)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))

    # --- text --------------------------------------------------------------------------------
    def render_prompt(self, prompt: str) -> tuple[str, int]:
        """The text the tokenizer encodes for `prompt` (the chat template) and where the prompt starts in it."""
        tok = self.pipe.tokenizer
        system = self.system_message

        def render(content: str) -> str:
            if system is None:  # [klein]: Qwen3's template, as Flux2KleinPipeline calls it
                return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                        {"role": "user", "content": [{"type": "text", "text": content}]}]
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

        marked = render(_SENTINEL)
        start = marked.index(_SENTINEL)
        return marked.replace(_SENTINEL, prompt), start

    def text_segments(self, max_sequence_length=None):
        from ..tokens import TextSegment

        tok = getattr(self.pipe.tokenizer, "tokenizer", self.pipe.tokenizer)  # [dev] checkpoints: a processor
        return [TextSegment(tok, 0, max_sequence_length or 512, False, render=self.render_prompt,
                            pad_left=getattr(tok, "padding_side", "right") == "left")]

    def encode_condition(self, prompts, n_per, *, height, width, image_grid, max_sequence_length,
                         guidance_scale=None, options=None):
        device = self.denoiser.device
        with torch.no_grad():
            emb, text_ids = type(self.pipe).encode_prompt(
                self.pipe, prompt=prompts, device=device, num_images_per_prompt=n_per,
                max_sequence_length=max_sequence_length or 512, **(options or {}))
        gh, gw = self.packed_grid(height, width) if height and width else image_grid
        img_ids = type(self.pipe)._prepare_latent_ids(torch.empty(emb.shape[0], 1, gh, gw)).to(device)
        return {"encoder_hidden_states": emb, "txt_ids": text_ids, "img_ids": img_ids,
                "guidance": self.guidance_embedding(emb.shape[0], guidance_scale)}

    # --- latents ---------------------------------------------------------------------------------
    def latent_shape(self, n, height, width):
        gh, gw = self.packed_grid(height, width)
        return (n, self.denoiser.config.in_channels, gh, gw)

    def initial_latents(self, n, height, width, generators):
        shape = self.latent_shape(1, height, width)[1:]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        return noise.to(self.denoiser.device, self.denoiser.dtype)  # the pipeline packs them

    # inversion is not offered (no "inversion" capability): FLUX.1's VAE packing and schedule do not apply
    inversion_condition = Family.inversion_condition
    flow_schedule = Family.flow_schedule

    # --- tiny pipeline ---------------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, seed: int = 0, variant: str = "klein", **kw: Any):
        """[klein] (the family's tiny pipeline) or, with `variant="dev"`, a tiny `Flux2Pipeline`."""
        import diffusers as d

        from ..tiny import qwen_tokenizer

        if variant not in ("klein", "dev"):
            raise ValueError(f"variant must be 'klein' or 'dev', got {variant!r}")
        torch.manual_seed(seed)
        tr = d.Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=variant == "dev",
        )
        vae = d.AutoencoderKLFlux2(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8,) * 4, layers_per_block=1,
            latent_channels=4, norm_num_groups=2, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        )
        if variant == "dev":
            text, tok = _tiny_mistral3()
            return d.Flux2Pipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text,
                                   tokenizer=tok, transformer=tr)
        from transformers import Qwen3Config, Qwen3ForCausalLM

        # 27 layers: the pipeline stacks hidden states 9, 18 and 27 (its default text_encoder_out_layers)
        text = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=260, hidden_size=16, intermediate_size=24, num_hidden_layers=27, num_attention_heads=2,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
        ))
        return d.Flux2KleinPipeline(scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text,
                                    tokenizer=qwen_tokenizer(), transformer=tr)


#: a Mistral-style template over content lists, in the form Flux2Pipeline's messages take
_MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{%- if m['content'] is string %}{%- set t = m['content'] %}"
    "{%- else %}{%- set t = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{%- endif %}{%- if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ t }}[/SYSTEM_PROMPT]"
    "{%- elif m['role'] == 'user' %}[INST]{{ t }}[/INST]{%- else %}{{ t }}{{ eos_token }}{%- endif %}{%- endfor %}"
)


def _tiny_mistral3() -> tuple[Any, Any]:
    """A tiny Mistral-3 (30 text layers: the pipeline stacks hidden states 10, 20, 30) and a byte-level
    tokenizer with Mistral's control tokens; real checkpoints use a Pixtral processor, whose tokenizer
    the adapter reads (a processor needs torchvision, which the CPU machines lack)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    from ..tiny import byte_level_tokenizer

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
    tok = byte_level_tokenizer(specials, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    vocab = tok.get_vocab()
    tok.chat_template = _MISTRAL_TEMPLATE
    config = Mistral3Config(
        text_config=MistralConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=30,
                                  num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=1024),
        vision_config=PixtralVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=4, head_dim=8),
        image_token_index=vocab["[IMG]"], spatial_merge_size=1, vision_feature_layer=-1,
    )
    return Mistral3ForConditionalGeneration(config), tok
