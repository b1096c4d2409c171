"""Tiny random LVLMs built from configs: for tests, demos and quick benchmarks (nothing is downloaded).

They are real ``transformers`` classes with random weights, shaped like the families visiondrop supports, so the code
paths are the ones a checkpoint loaded with ``from_pretrained`` takes.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

__all__ = ["IMAGE_TOKEN", "tiny_llava", "tiny_llava_config"]

#: Placeholder id of the tiny models (vocabulary of 100).
IMAGE_TOKEN = 99
PAD, BOS, EOS = 0, 1, 2


def tiny_llava_config(
    *,
    image_size: int = 112,
    layers: int = 8,
    kv_heads: int = 2,
    attn: str = "sdpa",
    init: float = 0.3,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config: CLIP ViT with [CLS] (patch 14), a Llama LLM with GQA.

    ``init`` is the weight initialisation range; a large one makes greedy outputs vary token to token, which is what
    tests comparing generations need.
    """
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        initializer_range=init,
    )
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=init,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    config._attn_implementation = attn
    return config


def tiny_llava(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs
) -> LlavaForConditionalGeneration:
    """A random :class:`~transformers.LlavaForConditionalGeneration` from :func:`tiny_llava_config`, in eval mode."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs)).eval().to(dtype)
    model.generation_config.pad_token_id = PAD
    return model


def tiny_llava_next_config(
    *, layers: int = 8, kv_heads: int = 2, attn: str = "sdpa", init: float = 0.3, text: str = "llama"
):
    """A LLaVA-NeXT-shaped config: 56 px crops of 4 x 4 patches, AnyRes pinpoints up to 2 x 2 crops."""
    from transformers import LlavaNextConfig, MistralConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
        initializer_range=init,
    )
    text_kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=100,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=init,
    )
    text_config = (
        MistralConfig(**text_kwargs, sliding_window=4096) if text == "mistral" else LlamaConfig(**text_kwargs)
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [56, 168]],
    )
    config._attn_implementation = attn
    return config


def tiny_llava_next(*, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random :class:`~transformers.LlavaNextForConditionalGeneration` from :func:`tiny_llava_next_config`."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(tiny_llava_next_config(**config_kwargs)).eval().to(dtype)
    with torch.no_grad():  # a visible newline embedding (it is zeros-initialised in some versions)
        model.model.image_newline.normal_(0, 0.3)
    model.generation_config.pad_token_id = PAD
    return model


def llava_next_placeholders(model, image_size: tuple[int, int]) -> int:
    """Placeholder tokens LLaVA-NeXT gives an image of ``image_size`` (h, w), as its processor counts them."""
    from .models.llava_next import LlavaNextAdapter

    return (
        LlavaNextAdapter(model)
        .image_infos({"pixel_values": True, "image_sizes": torch.tensor([image_size])})[0]
        .tokens
    )
