"""LLaVA-1.5 in vLLM with visiondrop's vision stage: the image-feature step prunes, the prompt gets the kept count.

vLLM fixes each image's placeholder count when it processes the prompt and slices the encoder output by that count,
so both sides use the method's schedule for the image (the function the Hugging Face path uses): the processing
info's ``get_num_image_tokens`` returns ``schedule.vision.tokens`` and the image-feature step returns exactly that many
embeddings. vLLM numbers the prompt contiguously, so the kept tokens get compact positions whatever the method's
``positions`` says.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...methods.base import PruningMethod
from ...models.llava import ClipVisionTokens
from ...schedule import Stage
from ...vllm import check_vision_only, method_from_config

__all__ = ["VisionDropLlavaForConditionalGeneration", "VisionDropLlavaProcessingInfo", "vision_stage"]


def vision_stage(method: PruningMethod, config: Any, image_tokens: int) -> Stage:
    """The vision stage ``method`` runs on an image of ``image_tokens`` patch tokens in this LLaVA model.

    Raises ValueError (one line naming the value) for settings vLLM cannot honour: in-LLM stages, an out-of-range
    budget, a feature layer list or a select strategy other than ``"default"``.
    """
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer={layer!r}: the plugin supports one feature layer (an int)")
    if config.vision_feature_select_strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: the plugin supports 'default'"
        )
    num_layers = config.text_config.num_hidden_layers
    check_vision_only(method, num_layers)
    schedule = method.schedule(image_tokens, num_layers)
    if schedule.boundaries:
        raise ValueError(
            f"{method.name}: schedule {schedule.describe()} prunes inside the LLM, which vLLM cannot run"
        )
    return schedule.vision


class VisionDropLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with one placeholder per token the vision stage keeps."""

    @cached_property
    def _method(self) -> PruningMethod:
        return method_from_config(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        patches = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return vision_stage(self._method, self.get_hf_config(), patches).tokens


class _FusedQkvClipTokens(ClipVisionTokens):
    """CLIP tokens scored with vLLM's fused ``qkv_proj`` (the HF path uses separate q/k projections)."""

    @cached_property
    def _qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self._layer.self_attn
        normed = self._layer.layer_norm1(self._input)
        qkv, _ = attn.qkv_proj(normed)
        q, k, _ = qkv.chunk(3, dim=-1)
        shape = (*normed.shape[:-1], attn.num_heads_per_partition, attn.head_dim)
        return q.reshape(shape).transpose(1, 2), k.reshape(shape).transpose(1, 2)  # (I, H, n, d) each


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=VisionDropLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VisionDropLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with the vision stage of the method in ``config.visiondrop`` (see :func:`visiondrop.vllm.hf_overrides`).

    transformers 5 saves the CLIP tower without its ``vision_model`` level (``vision_tower.encoder.*``,
    ``vision_tower.embeddings.*``); vLLM's CLIP module keeps it, so those names are mapped on load.
    """

    hf_to_vllm_mapper = LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
        orig_to_new_prefix={
            f"vision_tower.{part}.": f"vision_tower.vision_model.{part}."
            for part in ("embeddings", "encoder", "pre_layrnorm", "post_layernorm")
        }
    )

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        method = method_from_config(config)  # fail before any weight is allocated
        vision = config.vision_config
        self.num_patches = (vision.image_size // vision.patch_size) ** 2
        stage = vision_stage(method, config, self.num_patches)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.method = method
        self.stage = stage
        self.grid = (vision.image_size // vision.patch_size,) * 2

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        tower = self.vision_tower.vision_model
        # vLLM builds the tower only up to the feature layer, so the last layer built is the scoring layer and its
        # output the features (no post-norm, as in the HF path's hidden_states[feature layer]).
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
        *before, scoring = tower.encoder.layers
        for layer in before:
            hidden = layer(hidden)
        features = scoring(hidden)
        project = self.multi_modal_projector
        if self.stage.tokens == self.num_patches:
            return project(features[:, 1:])  # what stock LLaVA computes
        # One image at a time: vLLM batches whichever images its scheduler picked, and a method's picks for an image
        # must not depend on its batch neighbours (``random`` draws one permutation per image of a call, in order),
        # so each image gets what the HF path gives it alone.
        return torch.cat(
            [
                self._select_one(features[i : i + 1], hidden[i : i + 1], scoring)
                for i in range(features.shape[0])
            ]
        )

    def _select_one(
        self, features: torch.Tensor, hidden: torch.Tensor, scoring: torch.nn.Module
    ) -> torch.Tensor:
        """The vision stage on one image: ``features`` / ``hidden`` ``(1, 1 + P, Dv)`` → ``(1, kept, D)``."""
        project = self.multi_modal_projector
        tokens = _FusedQkvClipTokens(
            features, hidden, scoring, has_cls=True, grids=(self.grid,), project=project
        )
        selection = self.method.select_vision(tokens, self.stage)
        if selection.num_out != self.stage.tokens:
            raise RuntimeError(
                f"{self.method.name} selected {selection.num_out} tokens at the vision stage, its schedule says "
                f"{self.stage.tokens}"
            )
        if selection.space == "projected":
            return selection.apply(project(features))
        return project(selection.apply(features))
