"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT with [CLS], features from one layer, MLP projector."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .. import flops, ops
from ..compat import selected_hidden_states, vision_encoder_layers
from .base import ImageInfo, ModelAdapter, TextStack, VisionTokens, register_adapter
from .family import BenchImage, Family, register_family

__all__ = [
    "FAMILY",
    "ClipVisionTokens",
    "LlavaAdapter",
    "checked_feature_layer",
    "clip_arch_fields",
    "clip_bench_image",
    "clip_vision_parts",
    "feature_index",
]


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


def checked_feature_layer(
    config: Any, strategy: str, *, layer_note: str = "", strategy_note: str = ""
) -> int:
    """The one vision feature layer (an int) of a LLaVA-style config whose select strategy is ``strategy``.

    One-line ValueError otherwise (the notes end each message with the family's reason).
    """
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(
            f"vision_feature_layer={layer!r}: visiondrop supports one feature layer (an int){layer_note}"
        )
    if config.vision_feature_select_strategy != strategy:
        raise ValueError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: visiondrop supports "
            f"{strategy!r}{strategy_note}"
        )
    return layer


def feature_index(layer: int, num_layers: int) -> int:
    """Index in ``hidden_states`` of feature layer ``layer`` (negative counts from the end) of a tower of ``num_layers``
    layers: ``hidden_states[0]`` is the embedding output, ``[i]`` the output of layer ``i - 1``; ValueError for 0."""
    index = layer % (num_layers + 1)
    if index == 0:
        raise ValueError(
            f"vision_feature_layer={layer} selects the embeddings: there is no layer to score with"
        )
    return index


@register_adapter
class LlavaAdapter(ModelAdapter):
    """``LlavaForConditionalGeneration`` (llava-hf/llava-1.5-7b-hf and -13b-hf)."""

    model_classes = ("LlavaForConditionalGeneration",)
    family = "LLaVA-1.5"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        layer = checked_feature_layer(
            cfg,
            "default",
            layer_note=", as LLaVA-1.5 uses",
            strategy_note=" (patch tokens only, as LLaVA-1.5)",
        )
        vision = cfg.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.num_patches = side * side
        tower = model.model.vision_tower
        encoder_layers = vision_encoder_layers(tower)
        index = feature_index(layer, len(encoder_layers))
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
            has_cls=LlavaAdapter.has_cls,
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


# ---------------------------------------------------------------------------------------------------------------
# the family, for the tools that cost or build a model without hooking it (flops, `visiondrop flops`, bench)
# ---------------------------------------------------------------------------------------------------------------


def clip_arch_fields(
    data: Mapping[str, Any], vision: Mapping[str, Any], llm: Mapping[str, int]
) -> dict[str, Any]:
    """FLOPs description of a CLIP tower + MLP projector config (LLaVA-1.5; LLaVA-NeXT adds its crops to it).

    The tower runs every layer over 577 tokens per 336 px crop ([CLS] included); transformers' ``"default"`` feature
    strategy drops the first output, ``"full"`` keeps all; the projector's input is one ViT width per feature layer.
    """
    vit_hidden = int(vision["hidden_size"])
    image_size = int(vision["image_size"])
    patch = int(vision["patch_size"])
    cls_tokens = 1 if "clip" in str(vision.get("model_type", "clip_vision_model")) else 0
    vit_tokens = (image_size // patch) ** 2 + cls_tokens
    strategy = data.get("vision_feature_select_strategy", "default")
    layers = data.get("vision_feature_layer", -2)
    n_feature_layers = 1 if isinstance(layers, int) else len(layers)
    return {
        "vit_layers": int(vision["num_hidden_layers"]),
        "vit_hidden": vit_hidden,
        "vit_mlp": int(vision["intermediate_size"]),
        "vit_mlp_matrices": 2,
        "vit_tokens_per_crop": vit_tokens,
        "vit_cls_tokens": cls_tokens,
        "image_features_per_crop": vit_tokens - 1 if strategy == "default" else vit_tokens,
        "patch_size": patch,
        "image_size": image_size,
        "spatial_merge_size": 1,
        "projector_in": vit_hidden * n_feature_layers,
        "projector_hidden": llm["hidden_size"],
        "projector_out": llm["hidden_size"],
        "max_crops": 1,
        "image_grid_pinpoints": (),
    }


def _image_shape(arch: flops.ArchSpec, size: tuple[int, int] | None = None) -> flops.ImageShape:
    """Every image is resized to one crop: ``size`` changes nothing."""
    if arch.image_size is None or arch.vit_tokens_per_crop is None or arch.image_features_per_crop is None:
        raise ValueError(f"{arch.name or 'this config'}: the vision config lacks an image size")
    side = arch.image_size // arch.patch_size
    return flops.ImageShape(
        tokens=arch.image_features_per_crop,
        vit_tokens=(arch.vit_tokens_per_crop,),
        grids=((side, side),),
        size=None,
        description=(
            f"{arch.image_features_per_crop} visual tokens (every image is resized to one "
            f"{arch.image_size} px crop: 1 ViT pass of {arch.vit_tokens_per_crop} tokens)"
        ),
    )


def clip_bench_image(config: Any, batch: int, generator: torch.Generator) -> BenchImage:
    """One image of the config's size per row (LLaVA-1.5: 336 px, 576 placeholders; Video-LLaVA's image tower: 224 px,
    256), ``pixel_values`` (B, 3, S, S); the tower sees its [CLS] too."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator)
    return BenchImage(
        inputs={"pixel_values": pixels},
        placeholders=[int(config.image_token_id)] * (side * side),
        image_flags=[True] * (side * side),
        tokens=side * side,
        grids=((side, side),),
        vit_tokens=side * side + 1,
    )


def clip_vision_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """The CLIP encoder layers and the multimodal projector of a LLaVA-style model."""
    inner = model.model
    return vision_encoder_layers(inner.vision_tower), inner.multi_modal_projector


FAMILY = register_family(
    Family(
        name=LlavaAdapter.family,
        model_types=("llava",),
        model_classes=LlavaAdapter.model_classes,
        has_cls=LlavaAdapter.has_cls,
        arch_fields=clip_arch_fields,
        image_shape=_image_shape,
        bench_image=clip_bench_image,
        vision_parts=clip_vision_parts,
    )
)
