"""LLaVA-NeXT in vLLM with visiondrop's vision stage: AnyRes crops scored per crop, one pool per image.

The policy is the HF adapter's (:mod:`visiondrop.models.llava_next`): each patch is scored by its own crop's [CLS]
(or its crop's patches), the kept tokens are chosen over the base view and the unpadded high-resolution cells
together, the rest merge into contextual tokens, and a pruned image drops its ``image_newline`` tokens. vLLM fixes each
image's placeholder count from its size when it processes the prompt, so the processing info returns the method's
kept count for the image as the HF path counts it (:func:`visiondrop.models.llava_next.next_image_info`), and the
image-feature step returns exactly that many embeddings. An image the method keeps whole goes through vLLM's own
packing (newlines included). Positions are compact, as for LLaVA-1.5.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...methods.base import PruningMethod
from ...models.llava_next import NextVisionTokens, anyres_layout, next_image_info, token_sources
from ...vllm import method_from_config
from ._clip import check_llava_config, clip_names, fused_qk, run_clip_tower, vision_stage

__all__ = ["VisionDropLlavaNextForConditionalGeneration", "VisionDropLlavaNextProcessingInfo"]


class VisionDropLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """LLaVA-NeXT's processing info with one placeholder per token the vision stage keeps of each image."""

    @cached_property
    def _method(self) -> PruningMethod:
        return method_from_config(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        info = next_image_info(config, (image_height, image_width))
        placeholders = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if placeholders != info.tokens:  # vLLM's unpadding arithmetic and transformers' must agree
            raise ValueError(
                f"image of {image_width}x{image_height}: vLLM counts {placeholders} placeholders, visiondrop "
                f"{info.tokens}"
            )
        return vision_stage(self._method, config, info).tokens


class _FusedQkvNextTokens(NextVisionTokens):
    """LLaVA-NeXT tokens scored with vLLM's fused ``qkv_proj``."""

    @cached_property
    def _qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_qk(self._layer, self._crops_input)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=VisionDropLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class VisionDropLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with the vision stage of the method in ``config.visiondrop`` (see
    :func:`visiondrop.vllm.hf_overrides`); CLIP weights saved by transformers 5 are mapped on load."""

    hf_to_vllm_mapper = clip_names(LlavaNextForConditionalGeneration.hf_to_vllm_mapper)

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        method = method_from_config(config)  # fail before any weight is allocated
        check_llava_config(config)
        vision = config.vision_config
        # The method must fit every image this model can see: the smallest has the fewest placeholders.
        for height, width in [(vision.image_size, vision.image_size), *config.image_grid_pinpoints]:
            vision_stage(method, config, next_image_info(config, (height, width)))
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.method = method
        self.side = vision.image_size // vision.patch_size

    def _process_image_input(self, image_input: Any) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return super()._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        sizes = [tuple(size) for size in image_input["image_sizes"].tolist()]
        infos = [next_image_info(self.config, size) for size in sizes]
        stages = [vision_stage(self.method, self.config, info) for info in infos]
        if all(stage.tokens == info.tokens for stage, info in zip(stages, infos, strict=True)):
            return super()._process_image_input(image_input)  # what stock LLaVA-NeXT computes
        layouts = [anyres_layout(self.config, size) for size in sizes]
        counts = [1 + nh * nw for nh, nw, _ in layouts]
        # a tensor (images, crops, C, H, W) pads with crops past an image's count; a list holds each image's own
        crops = torch.cat([pv[:count] for pv, count in zip(pixel_values, counts, strict=True)])
        tower = self.vision_tower.vision_model
        layer_input, features = run_clip_tower(tower, crops)
        scoring = tower.encoder.layers[-1]
        project = self.multi_modal_projector
        out = []
        for size, info, stage, (_, nw, window), x, h in zip(
            sizes, infos, stages, layouts, layer_input.split(counts), features.split(counts), strict=True
        ):
            if stage.tokens == info.tokens:  # kept whole: vLLM's packing, newlines included
                out.append(
                    self._merge_image_patch_embeddings(
                        torch.tensor(size), project(h[:, 1:]), strategy="spatial_unpad"
                    )
                )
                continue
            # One image at a time, as the HF path selects: a method's picks never depend on batch neighbours.
            source, placeholder = token_sources(self.side, nw, window)
            tokens = _FusedQkvNextTokens(
                h, x, scoring, source.to(h.device), placeholder.to(h.device), info.grids, project, size
            )
            selection = self.method.select_vision(tokens, stage)
            if selection.num_out != stage.tokens:
                raise RuntimeError(
                    f"{self.method.name} selected {selection.num_out} tokens at the vision stage, its schedule "
                    f"says {stage.tokens}"
                )
            if selection.space == "projected":
                out.append(selection.apply(tokens.projected())[0])
            else:
                out.append(project(selection.apply(tokens.hidden))[0])
        return out
