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
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...methods.base import PruningMethod
from ...models.llava import ClipVisionTokens
from ...tokens import ImageInfo
from ...vllm import method_from_config
from ._clip import clip_names, fused_qk, run_clip_tower, vision_stage

__all__ = ["VisionDropLlavaForConditionalGeneration", "VisionDropLlavaProcessingInfo", "image_info"]


def image_info(config: Any) -> ImageInfo:
    """Every LLaVA-1.5 image as the HF adapter describes it: one square grid of patches behind one [CLS]."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return ImageInfo(side * side, ((side, side),), (side * side + 1,))


class VisionDropLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with one placeholder per token the vision stage keeps."""

    @cached_property
    def _method(self) -> PruningMethod:
        return method_from_config(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        info = image_info(config)
        patches = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if patches != info.tokens:
            raise ValueError(
                f"vLLM counts {patches} image tokens, visiondrop {info.tokens}: unsupported config"
            )
        return vision_stage(self._method, config, info).tokens


class _FusedQkvClipTokens(ClipVisionTokens):
    """CLIP tokens scored with vLLM's fused ``qkv_proj`` (the HF path uses separate q/k projections)."""

    @cached_property
    def _qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_qk(self._layer, self._input)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=VisionDropLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VisionDropLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with the vision stage of the method in ``config.visiondrop`` (see :func:`visiondrop.vllm.hf_overrides`).

    transformers 5 saves the CLIP tower without its ``vision_model`` level (``vision_tower.encoder.*``,
    ``vision_tower.embeddings.*``); vLLM's CLIP module keeps it, so those names are mapped on load.
    """

    hf_to_vllm_mapper = clip_names(LlavaForConditionalGeneration.hf_to_vllm_mapper)

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        method = method_from_config(config)  # fail before any weight is allocated
        info = image_info(config)
        stage = vision_stage(method, config, info)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.method = method
        self.stage = stage
        self.num_patches = info.tokens
        self.grid = info.grids[0]

    def _process_image_input(self, image_input: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))
        hidden, features = run_clip_tower(self.vision_tower.vision_model, pixel_values)
        scoring = self.vision_tower.vision_model.encoder.layers[-1]
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
