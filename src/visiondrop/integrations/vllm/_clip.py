"""What the LLaVA-style plugin models share: the config checks, the vision stage of an image, CLIP scoring with vLLM's
fused ``qkv_proj``, and the weight names transformers 5 saves a CLIP tower under."""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.models.utils import WeightsMapper

from ...methods.base import PruningMethod
from ...schedule import Stage
from ...tokens import ImageInfo
from ...vllm import check_vision_only

__all__ = ["check_llava_config", "clip_names", "fused_qk", "run_clip_tower", "vision_stage"]


def check_llava_config(config: Any) -> None:
    """ValueError (one line naming the value) for a feature layer or select strategy the plugin cannot run."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: the plugin supports one feature layer (an int)")
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: the plugin supports 'default'"
        )


def vision_stage(method: PruningMethod, config: Any, info: ImageInfo) -> Stage:
    """The vision stage ``method`` runs on an image of this model described by ``info`` (the HF adapter's
    description of the same image), computed as the HF path computes it.

    Raises ValueError (one line naming the value) for settings vLLM cannot honour: in-LLM stages, a budget that does
    not fit the image, a feature layer list or a select strategy other than ``"default"``.
    """
    check_llava_config(config)
    num_layers = config.text_config.num_hidden_layers
    check_vision_only(method, num_layers)
    unit = method.for_unit(info)  # raises when the budget does not fit the image
    schedule = unit.schedule(info.tokens, num_layers, info.grids or None)
    if schedule.boundaries:
        raise ValueError(
            f"{method.name}: schedule {schedule.describe()} prunes inside the LLM, which vLLM cannot run"
        )
    return schedule.vision


def fused_qk(layer: torch.nn.Module, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of a vLLM CLIP encoder layer for ``layer_input`` ``(I, n, Dv)``: ``(I, H, n, d)`` each.

    vLLM fuses q, k and v into one ``qkv_proj`` (the HF path uses separate ``q_proj`` / ``k_proj``).
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(layer_input)
    qkv, _ = attn.qkv_proj(normed)
    q, k, _ = qkv.chunk(3, dim=-1)
    shape = (*normed.shape[:-1], attn.num_heads_per_partition, attn.head_dim)
    return q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2)


def clip_names(mapper: WeightsMapper) -> WeightsMapper:
    """``mapper`` followed by the CLIP tower's transformers-5 names: ``vision_tower.encoder.*`` (no
    ``vision_model`` level) becomes the ``vision_tower.vision_model.encoder.*`` vLLM's CLIP module has."""
    return mapper | WeightsMapper(
        orig_to_new_prefix={
            f"vision_tower.{part}.": f"vision_tower.vision_model.{part}."
            for part in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm")
        }
    )


def run_clip_tower(tower: torch.nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scoring-layer input, feature-layer output) of vLLM's CLIP ``vision_model`` for ``pixel_values``.

    vLLM builds the tower only up to the feature layer, so the last layer built is the scoring layer and its output
    the features (no post-norm, as in the HF path's ``hidden_states[feature layer]``).
    """
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
    *before, scoring = tower.encoder.layers
    for layer in before:
        hidden = layer(hidden)
    return hidden, scoring(hidden)
