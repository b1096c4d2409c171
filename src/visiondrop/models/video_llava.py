"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): LLaVA-1.5's recipe with two CLIP towers, images and videos.

What the model does (transformers 5.24, ``models/video_llava/modeling_video_llava.py``):

- Images go through ``image_tower``; features are ``hidden_states[vision_feature_layer]`` without [CLS] (``"default"``
  strategy): 256 tokens for a 224 px image, as LLaVA-1.5 does with its one tower.
- Videos (``pixel_values_videos``, (V, T, 3, H, W), 8 frames for the released model) go through ``video_tower``
  frame by frame, and every frame keeps its [CLS] whatever the strategy: 257 tokens per frame, ``T x 257`` video
  placeholders per video (2,056 for 8 frames, the config's ``video_seq_length``).
- Both go through the one ``multi_modal_projector``; the model takes precomputed features as
  ``mm_encoder_outputs={"image": ..., "video": ...}`` whose ``pooler_output`` it scatters into the placeholders in
  order (a (1, K, D) tensor per kind is what it flattens). That is the attach point: nothing is copied.

Pruning: the scoring layer is the feature layer of the tower that ran (its own q/k, SPEC §3.1), so ``score="cls"``
ranks a frame's patches by that frame's [CLS] attention. A video frame is one pruning unit (``pool="frame"``: its
[CLS] and 256 patches, an int budget = tokens per frame) or the whole video is (``pool="video"``: the frames'
tokens laid end to end, each frame scored by its own [CLS] / patches, since CLIP attends within a frame). A frame's
[CLS] is a visual token of the LLM: it stays when a method keeps it (VisionDrop's ``keep_cls``: the first frame's
[CLS] with ``pool="video"``), otherwise it is dropped like any patch. Positions are 1-D RoPE (``compact`` and
``preserve`` both mean what they do on LLaVA-1.5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import torch
import transformers
from torch import nn

from .. import flops, ops
from ..compat import VIDEO_LLAVA_TAKES_PIXEL_VALUES, selected_hidden_states, vision_encoder_layers
from .base import ImageInfo, ModelAdapter, TextStack, VisionTokens, register_adapter
from .family import Family, register_family
from .llava import ClipVisionTokens, checked_feature_layer, clip_arch_fields, clip_bench_image, feature_index

__all__ = ["FAMILY", "ClipVideoTokens", "VideoLlavaAdapter"]


class ClipVideoTokens(ClipVisionTokens):
    """``T`` frames of a CLIP tower laid end to end, each ``[CLS] + P`` patches, all of them LLM tokens.

    Token ``f * (P + 1)`` is frame ``f``'s [CLS] (patch -1); token ``f * (P + 1) + 1 + p`` is patch ``p`` of frame
    ``f``'s grid, i.e. patch ``f * P + p`` of the unit's grids laid end to end. Every token has its own placeholder.
    Scores are computed frame by frame (CLIP attends within a frame): ``cls_attention`` is each frame's [CLS]
    attention to its own patches.
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        layer_input: torch.Tensor,
        layer: nn.Module,
        *,
        frames: int,
        grids: tuple[tuple[int, int], ...],
        project: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """
        Parameters
        ----------
        hidden, layer_input : Tensor, shape (I, T * (P + 1), Dv)
            The feature layer's output and input for ``I`` units of ``T`` frames.
        frames : int
            ``T``: frames per unit (1 with ``pool="frame"``).
        """
        super().__init__(hidden, layer_input, layer, has_cls=True, grids=grids, project=project)
        self.frames = frames
        self.per_frame = hidden.shape[1] // frames

    def _by_frame(self, tensor: torch.Tensor) -> torch.Tensor:
        """(I, T * n, ...) -> (I * T, n, ...)"""
        return tensor.reshape(self.num_images * self.frames, self.per_frame, *tensor.shape[2:])

    @cached_property
    def _frames(self) -> ClipVisionTokens:
        """The same tokens as ``I * T`` single frames."""
        return ClipVisionTokens(
            self._by_frame(self.hidden),
            self._by_frame(self._input),
            self._layer,
            has_cls=True,
            grids=self.grids[:1],
            project=self._project,
        )

    def _unframe(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.reshape(self.num_images, self.frames * self.per_frame, *scores.shape[2:])

    def cls_attention(self) -> torch.Tensor:
        return self._unframe(self._frames.cls_attention())

    def visual_attention(self) -> torch.Tensor:
        return self._unframe(self._frames.visual_attention())

    def keys(self) -> torch.Tensor:
        return self._unframe(self._frames.keys())

    @cached_property
    def patch_index(self) -> torch.Tensor:
        j = torch.arange(self.num_tokens, device=self.hidden.device)
        frame, within = j // self.per_frame, j % self.per_frame
        return torch.where(within == 0, -1, frame * (self.per_frame - 1) + within - 1)

    @cached_property
    def placeholder_offset(self) -> torch.Tensor:
        return torch.arange(self.num_tokens, device=self.hidden.device)


@register_adapter
class VideoLlavaAdapter(ModelAdapter):
    """``VideoLlavaForConditionalGeneration`` (LanguageBind/Video-LLaVA-7B-hf): images and videos."""

    model_classes = ("VideoLlavaForConditionalGeneration",)
    family = "Video-LLaVA"

    def __init__(self, model: nn.Module) -> None:
        if not VIDEO_LLAVA_TAKES_PIXEL_VALUES:
            raise ValueError(
                f"VideoLlavaForConditionalGeneration on transformers {transformers.__version__}: visiondrop supports "
                "Video-LLaVA from transformers 5.23 (where its images are pixel_values, not pixel_values_images)"
            )
        super().__init__(model)
        cfg = self.config
        layer = checked_feature_layer(
            cfg,
            "default",
            layer_note=", as Video-LLaVA uses",
            strategy_note=" (images without [CLS], as Video-LLaVA)",
        )
        vision = cfg.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.num_patches = side * side
        inner = model.model
        self.towers = {"image": inner.image_tower, "video": inner.video_tower}
        self.feature_index = feature_index(layer, len(vision_encoder_layers(inner.image_tower)))

    @cached_property
    def text(self) -> TextStack:
        return TextStack(self.model.model.language_model)

    def default_image_tokens(self) -> int:
        return self.num_patches

    def default_grids(self) -> tuple[tuple[int, int], ...]:
        return (self.grid,)

    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)

    def placeholder_ids(self, infos: list[ImageInfo]) -> tuple[int, ...]:
        if any(info.video is not None for info in infos):
            return (self.image_token_id, self.video_token_id)
        return (self.image_token_id,)

    def has_visual(self, kwargs: dict) -> bool:
        return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    def vision_kwargs(self) -> tuple[str, ...]:
        return ("pixel_values", "pixel_values_videos")

    def _units(self, kwargs: dict) -> list[tuple[str, int, tuple[int, ...]]]:
        """The call's pruning units in placeholder order: ``(kind, item, frames)``."""
        flat = kwargs["input_ids"].flatten()
        starts: list[tuple[int, tuple[str, int, tuple[int, ...]]]] = []
        images, videos = kwargs.get("pixel_values"), kwargs.get("pixel_values_videos")
        for kind, token, pixels in (
            ("image", self.image_token_id, images),
            ("video", self.video_token_id, videos),
        ):
            if pixels is None:
                continue
            if kind == "video" and pixels.dim() != 5:
                raise ValueError(
                    f"pixel_values_videos of shape {tuple(pixels.shape)}: Video-LLaVA takes (videos, frames, 3, H, W)"
                )
            count, frames = pixels.shape[0], (pixels.shape[1] if kind == "video" else 1)
            per_frame = self.num_patches + (1 if kind == "video" else 0)
            columns = torch.nonzero(flat == token).flatten().tolist()
            if len(columns) != count * frames * per_frame:
                raise ValueError(
                    f"{count} {kind}(s) need {count * frames * per_frame} <{kind}> placeholder tokens in input_ids, "
                    f"found {len(columns)}"
                )
            for item in range(count):
                if kind == "image":
                    parts = [()]
                elif self.pool == "frame":
                    parts = [(f,) for f in range(frames)]
                else:
                    parts = [tuple(range(frames))]
                for part in parts:
                    first = (item * frames + (part[0] if part else 0)) * per_frame
                    starts.append((columns[first], (kind, item, part)))
        return [unit for _, unit in sorted(starts, key=lambda pair: pair[0])]

    def image_infos(self, kwargs: dict) -> list[ImageInfo]:
        if not self.has_visual(kwargs):
            return []
        units = self._units(kwargs)
        self._kinds = [kind for kind, _, _ in units]  # for mm_encoder_outputs, later in the same vision stage
        infos = []
        for kind, item, frames in units:
            if kind == "image":
                infos.append(ImageInfo(self.num_patches, (self.grid,), (self.num_patches + 1,)))
            else:
                count = len(frames)
                infos.append(
                    ImageInfo(
                        count * (self.num_patches + 1),
                        (self.grid,) * count,
                        (self.num_patches + 1,) * count,
                        video=item,
                        frames=frames,
                        cls=True,
                    )
                )
        return infos

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(hidden)

    def encode(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        units = self._units(kwargs)
        groups = []
        for kind in ("image", "video"):
            pixels = kwargs.get("pixel_values" if kind == "image" else "pixel_values_videos")
            indices = [i for i, unit in enumerate(units) if unit[0] == kind]
            if pixels is None or not indices:
                continue
            tower = self.towers[kind]
            frames = pixels.shape[1] if kind == "video" else 1
            flat = pixels.reshape(-1, *pixels.shape[-3:]) if kind == "video" else pixels
            # The call get_image_features / get_video_features makes, capturing the scoring layer's input as well.
            layer_input, hidden = selected_hidden_states(
                tower, flat, [self.feature_index - 1, self.feature_index]
            )
            layer = vision_encoder_layers(tower)[self.feature_index - 1]
            if kind == "image":
                tokens = ClipVisionTokens(
                    hidden, layer_input, layer, has_cls=True, grids=(self.grid,), project=self._project
                )
                groups.append((indices, tokens))
                continue
            per_unit = 1 if self.pool == "frame" else frames  # frames t-major: (V * T, n, D) -> units
            shape = (-1, per_unit * hidden.shape[1], hidden.shape[2])
            tokens = ClipVideoTokens(
                hidden.reshape(shape),
                layer_input.reshape(shape),
                layer,
                frames=per_unit,
                grids=(self.grid,) * per_unit,
                project=self._project,
            )
            groups.append((indices, tokens))
        return groups

    def features(self, tokens: VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        if selection is None:  # exactly what get_image_features (no [CLS]) / get_video_features compute
            return self._project(
                tokens.hidden if isinstance(tokens, ClipVideoTokens) else tokens.hidden[:, 1:]
            )
        if selection.space == "projected":
            return selection.apply(self._project(tokens.hidden))
        return self._project(selection.apply(tokens.hidden))

    def mm_encoder_outputs(self, features: list[torch.Tensor]) -> dict:
        """Per-unit (k_i, D) features as ``{"image": ..., "video": ...}``, each kind one (1, K, D) tensor in order."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = {}
        for kind in ("image", "video"):
            chosen = [f for f, k in zip(features, self._kinds, strict=True) if k == kind]
            if chosen:
                out[kind] = BaseModelOutputWithPooling(pooler_output=torch.cat(chosen)[None])
        return out


# ---------------------------------------------------------------------------------------------------------------
# the family, for the tools that cost or build a model without hooking it (flops, `visiondrop flops`, bench)
# ---------------------------------------------------------------------------------------------------------------


def _arch_fields(
    data: Mapping[str, Any], vision: Mapping[str, Any], llm: Mapping[str, int]
) -> dict[str, Any]:
    """LLaVA-1.5's CLIP + MLP fields (one tower runs per input) and the frames of a video.

    The frame count is what ``video_seq_length`` holds (2,056 = 8 frames x 257 tokens for the released model).
    """
    fields = clip_arch_fields(data, vision, llm)
    per_frame = fields["vit_tokens_per_crop"]
    fields["video_frames"] = int(data.get("video_seq_length", 8 * per_frame)) // per_frame
    return fields


def _image_shape(arch: flops.ArchSpec, size: tuple[int, int] | None = None) -> flops.ImageShape:
    """One video of ``arch.video_frames`` frames (each resized to one crop: ``size`` changes nothing): every frame
    gives the LLM its [CLS] and its patches."""
    if arch.image_size is None or arch.vit_tokens_per_crop is None:
        raise ValueError(f"{arch.name or 'this config'}: the vision config lacks an image size")
    side = arch.image_size // arch.patch_size
    frames = arch.video_frames
    per_frame = arch.vit_tokens_per_crop
    return flops.ImageShape(
        tokens=frames * per_frame,
        vit_tokens=(per_frame,) * frames,
        grids=((side, side),) * frames,
        size=None,
        description=(
            f"{frames * per_frame} visual tokens for a {frames}-frame video ({frames} ViT passes of {per_frame} "
            f"tokens at {arch.image_size} px; every frame keeps its [CLS])"
        ),
        frames=frames,
    )


def _vision_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """The image tower's encoder layers and the projector (what the bench's images run through)."""
    inner = model.model
    return vision_encoder_layers(inner.image_tower), inner.multi_modal_projector


FAMILY = register_family(
    Family(
        name=VideoLlavaAdapter.family,
        model_types=("video_llava",),
        model_classes=VideoLlavaAdapter.model_classes,
        has_cls=VideoLlavaAdapter.has_cls,
        arch_fields=_arch_fields,
        image_shape=_image_shape,
        bench_image=clip_bench_image,
        vision_parts=_vision_parts,
    )
)
