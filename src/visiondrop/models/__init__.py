"""One adapter per model family: where the vision tower, feature layer, decoder layers and placeholders are."""

from . import (  # noqa: F401  (registers the adapters)
    internvl,
    llava,
    llava_next,
    llava_next_video,
    llava_onevision,
    qwen2_vl,
    qwen3_vl,
    video_llava,
)
from .base import ADAPTERS, ImageInfo, LLMTokens, ModelAdapter, TextStack, VisionTokens, get_adapter

__all__ = ["ADAPTERS", "ImageInfo", "LLMTokens", "ModelAdapter", "TextStack", "VisionTokens", "get_adapter"]


def supported_models() -> list[str]:
    """Class names of the supported HF models."""
    return sorted(name for cls in ADAPTERS for name in cls.model_classes)
