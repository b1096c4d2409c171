"""Every transformers-version branch in one place, each with the version that forced it.

Tested range: transformers 5.23 (pinned ``>=5.23,<6`` in pyproject.toml).
"""

from __future__ import annotations

from torch import nn

__all__ = ["uses_sliding_window", "vision_encoder_layers"]


def vision_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP/SigLIP-style vision tower.

    transformers 5.23 flattened ``CLIPVisionModel`` (``tower.encoder``); earlier 5.x releases kept a
    ``tower.vision_model.encoder`` level.
    """
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers


def uses_sliding_window(config) -> bool:
    """Whether a text model without ``layer_types`` masks every layer with a sliding window.

    transformers 5.23's ``MistralModel`` picks ``create_sliding_window_causal_mask`` for all layers when
    ``config.sliding_window`` is set; models with ``layer_types`` (Qwen2, Qwen2-VL) say so per layer instead.
    """
    return (
        getattr(config, "model_type", "") in ("mistral", "mixtral")
        and getattr(config, "sliding_window", None) is not None
    )
