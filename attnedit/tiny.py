"""Tiny random-weight pipelines of every supported family, built offline from configs.

They exercise every code path in well under a second on a CPU (tests, the no-download default
model). Their images are noise-like: random weights prove the code runs, nothing more. Each
family's adapter (`attnedit/families/`) builds its own from the parts here.
"""

from __future__ import annotations

import os
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

def clip_tokenizer(max_length: int = 77):
    """A byte-level CLIP tokenizer in memory: every character is a token, no merges, no <unk>."""
    from transformers import CLIPTokenizer

    chars = byte_level_chars()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in chars:
        vocab[ch] = len(vocab)
    for ch in chars:
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="<|endoftext|>")


def byte_level_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def t5_tokenizer(max_length: int = 512):
    """A character-level T5 (Unigram) tokenizer in memory."""
    from transformers import T5Tokenizer

    printable = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    vocab += [(c, -2.0) for c in printable] + [("▁" + c, -1.5) for c in printable]
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=max_length)


def clip_text(projection: bool = False, hidden: int = 32, vocab: int = 1000):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab,
        projection_dim=32,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def t5_text():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=320, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    return T5EncoderModel(cfg)


def tiny_vae(dit: bool = False):
    from diffusers import AutoencoderKL

    kw = dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=64,
    )
    if dit:
        kw.update(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return AutoencoderKL(**kw)


def build_tiny(family: str, seed: int = 0, levels: int = 2, **options: Any):
    """A tiny pipeline of `family` (a family name: "sd", "sdxl", "sd3", "flux", "pixart", ...) with random
    weights, built by the family's adapter. `levels=3` gives the SD UNet a third resolution level; other
    `options` go to the adapter (`variant="dev"`: FLUX.2's Flux2Pipeline)."""
    from .families import FAMILIES

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(FAMILIES)}")
    pipe = FAMILIES[family].build_tiny(seed=seed, levels=levels, **options)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_call_kwargs(family: str) -> dict:
    """Extra pipeline arguments the tiny pipelines need (short text sequences)."""
    from .families import FAMILIES

    return dict(FAMILIES[family].tiny_call_kwargs)


#: a ChatML template in the form Qwen3's takes (`enable_thinking=False` closes an empty think block)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def byte_level_tokenizer(specials: list[str], cls: Any = None, max_length: int = 4096, **tokens: str) -> Any:
    """A fast tokenizer in memory where every byte is a token (no merges) plus `specials`, of class `cls`
    (default `PreTrainedTokenizerFast`); `tokens` name its bos/eos/pad/unk tokens among the specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(byte_level_chars())}
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return (cls or PreTrainedTokenizerFast)(tokenizer_object=tok, model_max_length=max_length, **tokens)


def qwen_tokenizer(max_length: int = 4096):
    """A byte-level Qwen2 tokenizer in memory: every byte is a token, no merges, ChatML special tokens."""
    from transformers import Qwen2TokenizerFast

    fast = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], Qwen2TokenizerFast, max_length,
                                eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast
