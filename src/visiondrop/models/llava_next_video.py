"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT images, and videos pooled before the LLM.

What the model does with a video (transformers 5.24, ``models/llava_next_video/modeling_llava_next_video.py``,
``get_video_features``): every frame goes through the CLIP tower (no AnyRes crops), the feature layer's patches
([CLS] dropped, ``"default"`` strategy) are pooled by ``vision_resampler`` (``spatial_pool_mode`` over
``spatial_pool_stride`` x ``spatial_pool_stride`` windows: 24 x 24 -> 12 x 12 = 144 tokens per frame for the 7B),
then projected; no newline tokens. Images follow LLaVA-NeXT's AnyRes path unchanged (:class:`LlavaNextAdapter`).

Pruning works at the granularity the LLM sees: a *unit* is one pooled window. Its score is the sum of its patches'
scores (the frame's [CLS] attention with ``score="cls"``, or the visual attention each patch receives from its
frame's patches), its merge key the mean of its patches' keys; contextual merging happens on the pooled vectors,
before the projector (as LLaVA merges before its projector). ``pool="frame"`` makes each frame a unit of 144 pooled
tokens, ``pool="video"`` the video's frames laid end to end. The pooled units carry no [CLS] token of their own, so
methods that keep or rank by a [CLS] *token* (VisionZip, VisPruner) refuse videos in one line; ``score="cls"`` uses
the frame's [CLS] attention summed over each window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..compat import selected_hidden_states
from .base import ImageInfo, VisionTokens, register_adapter
from .family import Family, register_family
from .llava import clip_vision_parts
from .llava_next import FAMILY as NEXT_FAMILY
from .llava_next import LlavaNextAdapter

__all__ = ["FAMILY", "LlavaNextVideoAdapter", "PooledVideoTokens"]


class PooledVideoTokens(VisionTokens):
    """``I`` units of ``T`` frames each, every frame ``g x g`` pooled windows in raster order (no [CLS] token).

    Attributes
    ----------
    hidden : Tensor, shape (I, T * g * g, Dv)
        The resampler's output (the projector's input).
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        cls_scores: torch.Tensor,
        visual_scores: torch.Tensor,
        keys: torch.Tensor,
        grids: tuple[tuple[int, int], ...],
        project: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        """
        Parameters
        ----------
        cls_scores, visual_scores : Tensor, shape (I, n)
            Per window: the sum of its patches' [CLS] attention / received visual attention (each within its frame).
        keys : Tensor, shape (I, n, d)
            Per window: the mean of its patches' keys (averaged over heads).
        """
        super().__init__(hidden, has_cls=False, grids=grids)
        self._cls, self._visual, self._keys = cls_scores, visual_scores, keys
        self._project = project

    def cls_attention(self) -> torch.Tensor:
        return self._cls

    def visual_attention(self) -> torch.Tensor:
        return self._visual

    def keys(self) -> torch.Tensor:
        return self._keys

    def projected(self) -> torch.Tensor:
        return self._project(self.hidden)


@register_adapter
class LlavaNextVideoAdapter(LlavaNextAdapter):
    """``LlavaNextVideoForConditionalGeneration`` (llava-hf/LLaVA-NeXT-Video-7B-hf): images and videos."""

    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    family = "LLaVA-NeXT-Video"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.stride = int(self.config.spatial_pool_stride)
        self.pooled = self.side // self.stride  # pooled windows per side of a frame

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
        return ("pixel_values", "image_sizes", "pixel_values_videos")

    def _units(self, kwargs: dict) -> tuple[list[tuple[str, int, tuple[int, ...]]], list[ImageInfo]]:
        """The call's units in placeholder order ``(kind, item, frames)`` and the images' infos."""
        flat = kwargs["input_ids"].flatten()
        images = super().image_infos(kwargs) if kwargs.get("pixel_values") is not None else []
        starts: list[tuple[int, tuple[str, int, tuple[int, ...]]]] = []
        columns = torch.nonzero(flat == self.image_token_id).flatten().tolist()
        need = sum(i.tokens for i in images)
        if images and len(columns) != need:
            raise ValueError(
                f"{len(images)} image(s) need {need} <image> placeholder tokens in input_ids, found {len(columns)}"
            )
        cursor = 0
        for item, info in enumerate(images):
            starts.append((columns[cursor], ("image", item, ())))
            cursor += info.tokens
        videos = kwargs.get("pixel_values_videos")
        if videos is not None:
            if videos.dim() != 5:
                raise ValueError(
                    f"pixel_values_videos of shape {tuple(videos.shape)}: LLaVA-NeXT-Video takes "
                    "(videos, frames, 3, H, W)"
                )
            count, frames = videos.shape[:2]
            per_frame = self.pooled * self.pooled
            columns = torch.nonzero(flat == self.video_token_id).flatten().tolist()
            if len(columns) != count * frames * per_frame:
                raise ValueError(
                    f"{count} video(s) need {count * frames * per_frame} <video> placeholder tokens in input_ids, "
                    f"found {len(columns)}"
                )
            for item in range(count):
                parts = [(f,) for f in range(frames)] if self.pool == "frame" else [tuple(range(frames))]
                for part in parts:
                    starts.append((columns[(item * frames + part[0]) * per_frame], ("video", item, part)))
        return [unit for _, unit in sorted(starts, key=lambda pair: pair[0])], images

    def image_infos(self, kwargs: dict) -> list[ImageInfo]:
        if not self.has_visual(kwargs):
            return []
        units, images = self._units(kwargs)
        self._kinds = [kind for kind, _, _ in units]  # for mm_encoder_outputs, later in the same vision stage
        grid = (self.pooled, self.pooled)
        infos = []
        for kind, item, frames in units:
            if kind == "image":
                infos.append(images[item])
            else:
                count = len(frames)
                infos.append(
                    ImageInfo(
                        count * self.pooled * self.pooled,
                        (grid,) * count,
                        (self.side * self.side + 1,) * count,
                        video=item,
                        frames=frames,
                    )
                )
        return infos

    def encode(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        units, _ = self._units(kwargs)
        groups = []
        if kwargs.get("pixel_values") is not None:
            image_units = [i for i, unit in enumerate(units) if unit[0] == "image"]
            for images, tokens in super().encode(kwargs):
                groups.append(([image_units[i] for i in images], tokens))
        videos = kwargs.get("pixel_values_videos")
        if videos is not None:
            indices = [i for i, unit in enumerate(units) if unit[0] == "video"]
            groups.append((indices, self._encode_videos(videos)))
        return groups

    def _encode_videos(self, videos: torch.Tensor) -> PooledVideoTokens:
        count, frames = videos.shape[:2]
        tower = self.model.model.vision_tower
        # The call get_video_features makes (frames as a batch), capturing the scoring layer's input as well.
        layer_input, hidden = selected_hidden_states(
            tower, videos.reshape(-1, *videos.shape[2:]), [self.feature_index - 1, self.feature_index]
        )
        pooled = self.model.model.vision_resampler(hidden[:, 1:])  # (V*T, g*g, Dv), exactly the model's
        layer = self.scoring_layer
        attn = layer.self_attn
        normed = layer.layer_norm1(layer_input)
        shape = (*normed.shape[:-1], attn.num_heads, attn.head_dim)
        q = attn.q_proj(normed).view(shape).transpose(1, 2)
        k = attn.k_proj(normed).view(shape).transpose(1, 2)  # (V*T, H, 1 + P, d)
        cls = ops.cls_attention(q[:, :, :1], k, scale=attn.scale)  # (V*T, P)
        patches = torch.arange(1, k.shape[2], device=k.device).expand(k.shape[0], -1)
        visual = ops.visual_attention(
            q[:, :, 1:], k, None, patches, causal=False, scale=attn.scale
        )  # (V*T, P)
        keys = k[:, :, 1:].mean(1)  # (V*T, P, d)
        per_unit = 1 if self.pool == "frame" else frames
        units = count * frames // per_unit
        n = per_unit * self.pooled * self.pooled

        def window_sum(
            x: torch.Tensor,
        ) -> torch.Tensor:  # (N, P) -> (N, g*g): summed over each pooling window
            grid = x.float().view(-1, 1, self.side, self.side)
            return (F.avg_pool2d(grid, self.stride) * self.stride**2).flatten(1)

        window_keys = (
            F.avg_pool2d(
                keys.float().transpose(1, 2).reshape(keys.shape[0], -1, self.side, self.side), self.stride
            )
            .flatten(2)
            .transpose(1, 2)
        )  # (N, g*g, d)
        return PooledVideoTokens(
            pooled.reshape(units, n, -1),
            window_sum(cls).reshape(units, n),
            window_sum(visual).reshape(units, n),
            window_keys.reshape(units, n, -1),
            ((self.pooled, self.pooled),) * per_unit,
            self._project,
        )

    def features(self, tokens: VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        if not isinstance(tokens, PooledVideoTokens):
            return super().features(tokens, selection)
        if selection is None:  # exactly what get_video_features computes: resampled, then projected
            return self._project(tokens.hidden)
        if selection.space == "projected":
            return selection.apply(tokens.projected())
        return self._project(selection.apply(tokens.hidden))

    def mm_encoder_outputs(self, features: list[torch.Tensor]) -> dict:
        """Per-unit (k_i, D) features under ``"image"`` and ``"video"``, each kind in placeholder order."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = {}
        for kind in ("image", "video"):
            chosen = [f for f, k in zip(features, self._kinds, strict=True) if k == kind]
            if chosen:
                out[kind] = BaseModelOutputWithPooling(pooler_output=chosen)
        return out


FAMILY = register_family(
    Family(
        name=LlavaNextVideoAdapter.family,
        model_types=("llava_next_video",),
        model_classes=LlavaNextVideoAdapter.model_classes,
        has_cls=LlavaNextVideoAdapter.has_cls,
        arch_fields=NEXT_FAMILY.arch_fields,
        image_shape=NEXT_FAMILY.image_shape,
        bench_image=NEXT_FAMILY.bench_image,
        vision_parts=clip_vision_parts,
    )
)
