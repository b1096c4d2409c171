"""Every transformers-version branch in one place, each with the version that forced it.

Tested range: transformers 5.23 (pinned ``>=5.23,<6`` in pyproject.toml).
"""

from __future__ import annotations

from torch import nn

__all__ = ["vision_encoder_layers"]


def vision_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP/SigLIP-style vision tower.

    transformers 5.23 flattened ``CLIPVisionModel`` (``tower.encoder``); earlier 5.x releases kept a
    ``tower.vision_model.encoder`` level.
    """
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers
