"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT with [CLS], features from one layer, MLP projector."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import torch
from torch import nn

from .. import ops
from ..compat import selected_hidden_states, vision_encoder_layers
from .base import ImageInfo, ModelAdapter, TextStack, VisionTokens, register_adapter

__all__ = ["ClipVisionTokens", "LlavaAdapter"]


class ClipVisionTokens(VisionTokens):
    """Tokens of a CLIP-style ViT layer; scores come from that layer's own q/k of its layer-normed input (SPEC §3.1)."""

    def __init__(
        self,
        hidden: torch.Tensor,
        layer_input: torch.Tensor,
        layer: nn.Module,
        *,
        has_cls: bool,
        grids: tuple[tuple[int, int], ...],
        project: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__(hidden, has_cls=has_cls, grids=grids)
        self._input = layer_input
        self._layer = layer
        self._project = project

    @cached_property
    def _qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self._layer.self_attn
        normed = self._layer.layer_norm1(self._input)
        shape = (*normed.shape[:-1], attn.num_heads, attn.head_dim)
        q = attn.q_proj(normed).view(shape).transpose(1, 2)
        k = attn.k_proj(normed).view(shape).transpose(1, 2)
        return q, k  # (I, H, n, d) each

    def cls_attention(self) -> torch.Tensor:
        if not self.has_cls:
            return super().cls_attention()
        q, k = self._qk
        scores = ops.cls_attention(q[:, :, :1], k, scale=self._layer.self_attn.scale)
        return torch.cat([scores.new_zeros(scores.shape[0], 1), scores], dim=1)

    def visual_attention(self) -> torch.Tensor:
        q, k = self._qk
        offset = 1 if self.has_cls else 0
        n = self.num_tokens
        patches = torch.arange(offset, n, device=q.device).expand(self.num_images, -1)
        # Non-causal: every patch query sees every key, [CLS] included in the softmax.
        scores = ops.visual_attention(
            q[:, :, offset:], k, None, patches, causal=False, scale=self._layer.self_attn.scale
        )
        return torch.cat([scores.new_zeros(scores.shape[0], offset), scores], dim=1)

    def keys(self) -> torch.Tensor:
        _, k = self._qk
        return k.mean(1)

    def projected(self) -> torch.Tensor:
        return self._project(self.hidden)


@register_adapter
class LlavaAdapter(ModelAdapter):
    """``LlavaForConditionalGeneration`` (llava-hf/llava-1.5-7b-hf and -13b-hf)."""

    model_classes = ("LlavaForConditionalGeneration",)
    family = "LLaVA-1.5"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(
                f"vision_feature_layer={layer!r}: visiondrop supports one feature layer (an int), as LLaVA-1.5 uses"
            )
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: visiondrop supports "
                "'default' (patch tokens only, as LLaVA-1.5)"
            )
        vision = cfg.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.num_patches = side * side
        tower = model.model.vision_tower
        encoder_layers = vision_encoder_layers(tower)
        num_layers = len(encoder_layers)
        index = layer % (
            num_layers + 1
        )  # hidden_states[0] is the embedding output, [i] the output of layer i-1
        if index == 0:
            raise ValueError(
                f"vision_feature_layer={layer} selects the embeddings: there is no layer to score with"
            )
        self.feature_index = index
        self.scoring_layer = encoder_layers[index - 1]

    @cached_property
    def text(self) -> TextStack:
        return TextStack(self.model.model.language_model)

    def default_image_tokens(self) -> int:
        return self.num_patches

    def default_grids(self) -> tuple[tuple[int, int], ...]:
        return (self.grid,)

    def image_infos(self, kwargs: dict) -> list[ImageInfo]:
        pixel_values = kwargs.get("pixel_values")
        count = 0 if pixel_values is None else pixel_values.shape[0]
        return [ImageInfo(self.num_patches, (self.grid,), (self.num_patches + 1,))] * count

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(hidden)

    def encode(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        pixel_values = kwargs["pixel_values"]
        tower = self.model.model.vision_tower
        # The same call LlavaModel.get_image_features makes, capturing the scoring layer's input as well.
        layer_input, hidden = selected_hidden_states(
            tower, pixel_values, [self.feature_index - 1, self.feature_index]
        )
        tokens = ClipVisionTokens(
            hidden,
            layer_input,
            self.scoring_layer,
            has_cls=True,
            grids=(self.grid,),
            project=self._project,
        )
        return [(list(range(hidden.shape[0])), tokens)]

    def features(self, tokens: VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        if selection is None:
            return self._project(tokens.hidden[:, 1:])  # exactly what get_image_features computes
        if selection.space == "projected":
            return selection.apply(self._project(tokens.hidden))
        return self._project(selection.apply(tokens.hidden))
