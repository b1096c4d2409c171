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
