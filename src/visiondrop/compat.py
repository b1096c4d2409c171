"""Every transformers-version branch in one place, each with the version that forced it.

Tested range: transformers 5.23 (pinned ``>=5.23,<6`` in pyproject.toml).
"""

from __future__ import annotations

from torch import nn

__all__ = ["qwen_window_index", "uses_sliding_window", "vision_encoder_layers"]


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


def qwen_window_index(visual, grid_thw):
    """Qwen2.5-VL's window permutation of merged units: position ``j`` of the window order holds raster unit
    ``index[j]``.

    transformers 5.23 computes it with ``transformers.vision_utils.get_vision_window_index``; earlier releases had a
    ``get_window_index`` method on the vision model.
    """
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # transformers < 5.23
        return visual.get_window_index(grid_thw)[0]
    index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    return index
