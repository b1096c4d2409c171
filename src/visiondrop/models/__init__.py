"""One adapter per model family: where the vision tower, feature layer, decoder layers and placeholders are."""

from .base import ADAPTERS, ImageInfo, LLMTokens, ModelAdapter, TextStack, VisionTokens, get_adapter
from .family import load_adapters

load_adapters()  # every module of family.ADAPTER_MODULES: registers its adapter and its Family

__all__ = ["ADAPTERS", "ImageInfo", "LLMTokens", "ModelAdapter", "TextStack", "VisionTokens", "get_adapter"]


def supported_models() -> list[str]:
    """Class names of the supported HF models."""
    return sorted(name for cls in ADAPTERS for name in cls.model_classes)
