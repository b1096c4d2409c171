"""LLaVA-OneVision images and videos (``LlavaOnevisionForConditionalGeneration``): SigLIP crops, AnyRes-Max, Qwen2 LLM.

How an image reaches the LLM unpruned (transformers 5.24 ``LlavaOnevisionModel.pack_image_features``): every crop
(the base view of the whole image, then the ``nh x nw`` tiles of its AnyRes grid) goes through SigLIP, which has no
[CLS] (``vision_feature_select_strategy="full"``: all 27 x 27 = 729 patches of a 384 px crop) and through the
projector; the tiles are stitched into one ``nh*27 x nw*27`` grid, unpadded to the image's aspect ratio, and — the
AnyRes-Max step — when that grid holds more than ``1.1**2 * max_num_patches`` base views (``vision_aspect_ratio``
``"anyres_max_9"``: 9), it is bilinearly downscaled to ``int(h / ratio) x int(w / ratio)`` cells. One
``image_newline`` token closes every row of that grid; the base view comes first, without newlines:
``729 + H' * (W' + 1)`` placeholders.

The policy visiondrop applies (documented in the README), LLaVA-NeXT's with these differences:

- **granularity**: methods choose among the tokens the LLM receives — the base view's patches and the cells of the
  high-resolution grid *after* unpadding and downscaling. A downscaled cell is a bilinear mix of projected patches;
  its score, merge key and pre-projector vector are the same bilinear mix of its patches' (transformers' own
  ``pack_image_features`` applied to them), so a cell is ranked by what it is made of.
- **scoring**: no [CLS]: visual attention (the attention each patch receives from its own crop's patches) at the
  feature layer, from that layer's own q/k; ``score="cls"``, VisionZip and VisPruner are refused with one line.
- **kept tokens** carry exactly the feature the unpruned model gives them (a downscaled cell: the downscaled
  projected features, not a projection of downscaled ViT features). Contextual tokens merge pre-projector vectors
  (``space="vision"``) or projected features (``space="projected"``), as on LLaVA-NeXT.
- **newlines** are dropped by a pruned vision stage and kept by one that keeps everything, as on LLaVA-NeXT.
- **cost report**: for a downscaled image a pruned vision stage still projects every crop (its kept cells need their
  exact downscaled features), while ``run.report.flops`` counts the projector over the tokens the stage outputs, as on
  LLaVA-NeXT: it undercounts the projector there (for the 7B at 672 x 672 the whole projector is 0.2 % of the prefill).
- Several images per prompt (``batch_num_images`` above 1): transformers gives each such image its base view only
  (no AnyRes crops) and one closing ``image_newline``; its tokens are the base view's patches, the newline is its
  ``tail`` (kept when the image keeps everything, dropped when it is pruned, as a video's closing newline).

Videos (``pixel_values_videos``, transformers 5.24 ``get_video_features``): every frame goes through SigLIP whole
(no AnyRes), all its patches are projected and then bilinearly pooled (``apply_pooling``: ``side -> ceil(side / 2)``,
27 x 27 -> 14 x 14 = 196 tokens per frame on the 7B), the frames are laid end to end and **one** ``image_newline``
closes each video (after its last frame). Pruning follows LLaVA-NeXT-Video's convention at the granularity the LLM
sees: a video token is one pooled window; its score, merge key and pre-projector vector are the same bilinear mix
of its patches' visual attention (within its frame), keys and feature-layer outputs (``apply_pooling`` itself acts
channel-wise on them). Kept windows carry their exact (projected, then pooled) features; contextual tokens merge
the pooled pre-projector vectors before the projector (``space="vision"``) or the exact features
(``space="projected"``). ``pool="frame"`` makes each frame a unit, ``pool="video"`` the whole video. The video's
newline belongs to the unit that ends the video (its last frame, or the whole video): kept when that unit keeps
everything, dropped when it is pruned, as image newlines are; it counts among that unit's tokens (``ImageInfo.tail``)
like the image newlines do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .. import flops, ops
from ..compat import selected_hidden_states, vision_encoder_layers
from .base import ImageInfo, ModelAdapter, TextStack, VisionTokens, register_adapter
from .family import BenchImage, Family, register_family
from .llava import checked_feature_layer, clip_arch_fields, clip_vision_parts, feature_index
from .llava_next import _best_grid
from .llava_onevision_tokens import (
    OnevisionVideoTokens,
    OnevisionVisionTokens,
    anyres_max_count,
    onevision_grid,
)

__all__ = [
    "DEFAULT_PINPOINTS",
    "FAMILY",
    "LlavaOnevisionAdapter",
    "OnevisionVideoTokens",
    "OnevisionVisionTokens",
    "onevision_grid",
]


@register_adapter
class LlavaOnevisionAdapter(ModelAdapter):
    """``LlavaOnevisionForConditionalGeneration`` (llava-hf/llava-onevision-qwen2-7b-ov-hf, ...): images and videos."""

    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    family = "LLaVA-OneVision"
    has_cls = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        layer = checked_feature_layer(
            cfg, "full", strategy_note=" on LLaVA-OneVision (SigLIP has no [CLS] to drop)"
        )
        self.max_patches = anyres_max_count(cfg.vision_aspect_ratio)
        vision = cfg.vision_config
        self.side = vision.image_size // vision.patch_size
        self.crop_pixels = vision.image_size
        layers = vision_encoder_layers(model.model.vision_tower)
        index = feature_index(layer, len(layers))
        self.feature_index = index
        self.scoring_layer = layers[index - 1]

    @cached_property
    def text(self) -> TextStack:
        return TextStack(self.model.model.language_model)

    def vision_kwargs(self) -> tuple[str, ...]:
        return (
            "pixel_values",
            "image_sizes",
            "batch_num_images",
            "pixel_values_videos",
            "image_sizes_videos",
        )

    @property
    def video_token_id(self) -> int:
        return int(self.config.video_token_id)

    @cached_property
    def pooled(self) -> int:
        """Pooled windows per side of a video frame (``apply_pooling``: ceil(side / 2); 14 for SigLIP's 27)."""
        return math.ceil(self.side / 2)

    def placeholder_ids(self, infos: list[ImageInfo]) -> tuple[int, ...]:
        if any(info.video is not None for info in infos):
            return (self.image_token_id, self.video_token_id)
        return (self.image_token_id,)

    def has_visual(self, kwargs: dict) -> bool:
        return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    def check_call(self, kwargs: dict) -> None:
        videos = kwargs.get("pixel_values_videos")
        if videos is not None and (not isinstance(videos, torch.Tensor) or videos.dim() != 5):
            raise ValueError(
                f"pixel_values_videos of shape {tuple(getattr(videos, 'shape', ()))}: LLaVA-OneVision takes "
                "(videos, frames, 3, H, W)"
            )
        for name in ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio"):
            value = kwargs.get(name)
            if value is not None and value != getattr(self.config, name):
                raise ValueError(
                    f"{name}={value!r} differs from the model config's {getattr(self.config, name)!r}: "
                    "visiondrop prunes with the config's value; set it on the config instead"
                )

    def _layout(
        self, image_size: tuple[int, int]
    ) -> tuple[tuple[int, int], tuple[int, int, int, int, tuple[int, int]]]:
        """The image's tiles (nh, nw) and :func:`onevision_grid` of it."""
        from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

        tiles = get_anyres_image_grid_shape(
            list(image_size), self.config.image_grid_pinpoints, self.crop_pixels
        )
        return tiles, onevision_grid(image_size, tiles, self.side, self.max_patches)

    def image_infos(self, kwargs: dict) -> list[ImageInfo]:
        if kwargs.get("pixel_values_videos") is None:
            self._kinds = None  # an image-only call: plain mm_encoder_outputs, whatever an earlier call held
            return self._image_infos(kwargs)
        units, images = self._units(kwargs)
        self._kinds = [kind for kind, _, _ in units]  # for mm_encoder_outputs, later in the same vision stage
        frames_per_video = kwargs["pixel_values_videos"].shape[1]
        infos = []
        for kind, item, frames in units:
            if kind == "image":
                infos.append(images[item])
                continue
            closes = frames[-1] == frames_per_video - 1  # the video's one newline follows its last frame
            infos.append(
                ImageInfo(
                    len(frames) * self.pooled**2 + int(closes),
                    ((self.pooled, self.pooled),) * len(frames),
                    (self.side * self.side,) * len(frames),
                    video=item,
                    frames=frames,
                    tail=int(closes),
                )
            )
        return infos

    def _units(self, kwargs: dict) -> tuple[list[tuple[str, int, tuple[int, ...]]], list[ImageInfo]]:
        """The call's units in placeholder order ``(kind, item, frames)`` and the images' infos."""
        flat = kwargs["input_ids"].flatten()
        images = self._image_infos(kwargs)
        starts: list[tuple[int, tuple[str, int, tuple[int, ...]]]] = []
        columns = torch.nonzero(flat == self.image_token_id).flatten().tolist()
        need = sum(i.tokens for i in images)
        if len(columns) != need:
            raise ValueError(
                f"{len(images)} image(s) need {need} <image> placeholder tokens in input_ids, found {len(columns)}"
            )
        cursor = 0
        for item, info in enumerate(images):
            starts.append((columns[cursor], ("image", item, ())))
            cursor += info.tokens
        count, frames = kwargs["pixel_values_videos"].shape[:2]
        per_frame = self.pooled * self.pooled
        per_video = frames * per_frame + 1  # get_video_features appends one image_newline per video
        columns = torch.nonzero(flat == self.video_token_id).flatten().tolist()
        if len(columns) != count * per_video:
            raise ValueError(
                f"{count} video(s) need {count * per_video} <video> placeholder tokens in input_ids, "
                f"found {len(columns)}"
            )
        for item in range(count):
            parts = [(f,) for f in range(frames)] if self.pool == "frame" else [tuple(range(frames))]
            for part in parts:
                starts.append((columns[item * per_video + part[0] * per_frame], ("video", item, part)))
        return [unit for _, unit in sorted(starts, key=lambda pair: pair[0])], images

    def _image_infos(self, kwargs: dict) -> list[ImageInfo]:
        if kwargs.get("pixel_values") is None:
            return []
        sizes = kwargs.get("image_sizes")
        if sizes is None:
            raise ValueError(
                "image_sizes is missing: LLaVA-OneVision needs each image's size (the processor returns it)"
            )
        base = self.side * self.side
        infos = []
        for size, patched in zip(torch.as_tensor(sizes).tolist(), self._patched(kwargs), strict=True):
            if not patched:  # one of several images in its prompt: the base view and one newline
                infos.append(ImageInfo(base + 1, ((self.side, self.side),), (base,), tail=1))
                continue
            (nh, nw), (*_, (rows, cols)) = self._layout(tuple(size))
            infos.append(
                ImageInfo(
                    tokens=base + rows * (cols + 1),
                    grids=((self.side, self.side), (rows, cols)),
                    vit_tokens=(base,) * (1 + nh * nw),
                    newlines=(False, True),
                )
            )
        return infos

    def _patched(self, kwargs: dict) -> list[bool]:
        """Per image, whether transformers cuts it into AnyRes crops: not when its prompt holds several images."""
        count = len(torch.as_tensor(kwargs["image_sizes"]))
        per_prompt = kwargs.get("batch_num_images")
        if per_prompt is None:
            return [True] * count
        patched = [int(n) == 1 for n in torch.as_tensor(per_prompt).flatten().tolist() for _ in range(int(n))]
        if len(patched) != count:
            raise ValueError(
                f"batch_num_images={torch.as_tensor(per_prompt).tolist()} does not add up to {count} images"
            )
        return patched

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(hidden)

    def _pack(
        self, crops: torch.Tensor, size: tuple[int, int], newline: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(C, P, X) values of one image's crops -> (n, X) in the LLM's token order, by transformers' own packing.

        Its stitching, unpadding and bilinear downscale act channel-wise, so scores (X = 1), keys and pre-projector
        vectors are packed exactly as the projected features are.
        """
        packed, _ = self.model.model.pack_image_features(
            [crops],
            torch.tensor([size]),
            image_newline=newline,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
        )
        return packed[0]

    def encode(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        if kwargs.get("pixel_values_videos") is None:
            return self._encode_images(kwargs)
        units, _ = self._units(kwargs)
        groups = []
        if kwargs.get("pixel_values") is not None:
            image_units = [i for i, unit in enumerate(units) if unit[0] == "image"]
            for images, tokens in self._encode_images(kwargs):
                groups.append(([image_units[i] for i in images], tokens))
        video_units = [(i, unit) for i, unit in enumerate(units) if unit[0] == "video"]
        groups += self._encode_videos(kwargs["pixel_values_videos"], video_units)
        return groups

    def _encode_videos(
        self, videos: torch.Tensor, units: list[tuple[int, tuple[str, int, tuple[int, ...]]]]
    ) -> list[tuple[list[int], VisionTokens]]:
        """One group per unit (the unit that ends a video also carries the video's newline, so sizes differ)."""
        frames = videos.shape[1]
        tower = self.model.model.vision_tower
        # The tower call get_video_features makes (frames as a batch), capturing the scoring layer's input as well.
        layer_input, hidden = selected_hidden_states(
            tower, videos.reshape(-1, *videos.shape[2:]), [self.feature_index - 1, self.feature_index]
        )
        pool = self.model.model.apply_pooling  # bilinear, channel-wise: pools scores, keys and vectors alike
        exact = pool(
            self._project(hidden)
        )  # (V*T, g*g, D): what get_video_features computes, projected first
        pooled_hidden = pool(
            hidden
        )  # (V*T, g*g, Dv): the bilinear mix of each window's pre-projector vectors
        attn = self.scoring_layer.self_attn
        normed = self.scoring_layer.layer_norm1(layer_input)
        shape = (*normed.shape[:-1], attn.num_heads, attn.head_dim)
        q = attn.q_proj(normed).view(shape).transpose(1, 2)
        k = attn.k_proj(normed).view(shape).transpose(1, 2)  # (V*T, H, P, d)
        n_frames, _, patches, _ = q.shape
        # No [CLS]: every patch is scored by the attention it receives from its own frame's patches; a window by
        # the same bilinear mix of its patches' scores that makes its feature.
        scores = ops.visual_attention(
            q,
            k,
            None,
            torch.arange(patches, device=q.device).expand(n_frames, -1),
            causal=False,
            scale=attn.scale,
        )  # (V*T, P) fp32
        scores = pool(scores[..., None])[..., 0]  # (V*T, g*g)
        keys = pool(k.mean(1))  # (V*T, g*g, d)
        newline = self.model.model.image_newline[None, :].to(exact.dtype)
        groups: list[tuple[list[int], VisionTokens]] = []
        for index, (_, item, unit_frames) in units:
            rows = [item * frames + f for f in unit_frames]
            grid = (self.pooled, self.pooled)
            groups.append(
                (
                    [index],
                    OnevisionVideoTokens(
                        pooled_hidden[rows].flatten(0, 1)[None],
                        scores[rows].flatten()[None],
                        keys[rows].flatten(0, 1)[None],
                        (grid,) * len(rows),
                        exact[rows].flatten(0, 1)[None],
                        newline if unit_frames[-1] == frames - 1 else None,
                    ),
                )
            )
        return groups

    def _encode_images(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        pixel_values = kwargs["pixel_values"]
        sizes = [tuple(s) for s in torch.as_tensor(kwargs["image_sizes"]).tolist()]
        patched = self._patched(kwargs)
        base_only = (0, 0), (0, 0, 0, 0, (0, 0))  # no high-resolution grid
        layouts = [self._layout(size) if p else base_only for size, p in zip(sizes, patched, strict=True)]
        counts = [1 + nh * nw if p else 1 for ((nh, nw), _), p in zip(layouts, patched, strict=True)]
        if pixel_values.dim() == 5:  # (images, max crops, C, H, W), padded with unused crops
            pixel_values = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts, strict=True)])
        tower = self.model.model.vision_tower
        layer_input, layer_output = selected_hidden_states(
            tower, pixel_values, [self.feature_index - 1, self.feature_index]
        )
        attn = self.scoring_layer.self_attn
        normed = self.scoring_layer.layer_norm1(layer_input)
        shape = (*normed.shape[:-1], attn.num_heads, attn.head_dim)
        q = attn.q_proj(normed).view(shape).transpose(1, 2)
        k = attn.k_proj(normed).view(shape).transpose(1, 2)  # (crops, H, P, d)
        crops, _, patches, _ = q.shape
        # No [CLS]: every patch is scored by the attention it receives from its own crop's patches.
        scores = ops.visual_attention(
            q,
            k,
            None,
            torch.arange(patches, device=q.device).expand(crops, -1),
            causal=False,
            scale=attn.scale,
        )  # (crops, P) fp32
        keys = k.mean(1)  # (crops, P, d)
        groups = []
        start = 0
        for image, (size, count, (_, (r0, r1, c0, c1, (rows, cols)))) in enumerate(
            zip(sizes, counts, layouts, strict=True)
        ):
            part = slice(start, start + count)
            start += count
            hidden = layer_output[part]
            packed_hidden = self._pack(hidden, size)
            downscaled = (rows, cols) != (r1 - r0, c1 - c0)
            tokens = OnevisionVisionTokens(
                packed_hidden[None],
                self._pack(scores[part, :, None], size)[None, :, 0],
                self._pack(keys[part], size)[None],
                self._placeholders(rows, cols).to(hidden.device),
                ((self.side, self.side), (rows, cols)) if rows else ((self.side, self.side),),
                hidden,
                lambda crops, size=size: self._pack(self._project(crops), size)[None],
                size,
                downscaled,
            )
            groups.append(([image], tokens))
        return groups

    def _placeholders(self, rows: int, cols: int) -> torch.Tensor:
        """Placeholder offset of every token: the base view's patches, then each cell skipping the row newlines."""
        base = self.side * self.side
        cell = torch.arange(rows * cols)
        if not cell.numel():  # a base view alone
            return torch.arange(base)
        return torch.cat([torch.arange(base), base + (cell // cols) * (cols + 1) + cell % cols])

    def features(self, tokens: VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        if isinstance(tokens, OnevisionVideoTokens):
            return tokens.features(selection, self._project)
        if selection is None:  # exactly what transformers packs: projected, unpadded, downscaled, newlines in
            crops = self._project(tokens.crops_hidden)
            return self._pack(crops, tokens.image_size, self.model.model.image_newline)[None]
        if selection.space == "projected":
            return selection.apply(tokens.projected())
        if not tokens.downscaled:  # every token is one patch: the projector commutes with the selection
            return self._project(selection.apply(tokens.hidden))
        # Kept tokens carry their exact (downscaled, projected) features; contextual ones merge pre-projector mixes.
        exact = tokens.projected()
        kept = exact.gather(1, selection.keep[..., None].expand(-1, -1, exact.shape[-1]))
        if selection.anchors is None:
            return kept
        merged = ops.merge_groups(tokens.hidden, selection.anchors, selection.assign, selection.merge)
        return torch.cat([kept, self._project(merged)], dim=1)

    def mm_encoder_outputs(self, features: list[torch.Tensor]) -> dict:
        """Images as a list of (k_i, D) under ``"image"``; videos' units concatenated as (1, sum k, D) under
        ``"video"`` (transformers flattens that entry's first two dimensions), each kind in placeholder order."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kinds = getattr(self, "_kinds", None)
        if kinds is None or len(kinds) != len(features) or "video" not in kinds:
            return super().mm_encoder_outputs(features)
        out = {}
        images = [f for f, kind in zip(features, kinds, strict=True) if kind == "image"]
        if images:
            out["image"] = BaseModelOutputWithPooling(pooler_output=images)
        videos = [f for f, kind in zip(features, kinds, strict=True) if kind == "video"]
        out["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(videos)[None])
        return out


# ---------------------------------------------------------------------------------------------------------------
# the family, for the tools that cost or build a model without hooking it (flops, `visiondrop flops`, bench)
# ---------------------------------------------------------------------------------------------------------------

#: transformers' default ``image_grid_pinpoints`` of LLaVA-OneVision (5.24): every ``(h, w)`` of 1..6 x 1..6 tiles of
#: 384 px (used when a config leaves them out).
DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = tuple(
    (384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7)
)


def _arch_fields(
    data: Mapping[str, Any], vision: Mapping[str, Any], llm: Mapping[str, int]
) -> dict[str, Any]:
    """The SigLIP tower (no [CLS]; ``"full"``: all 729 patches of a crop reach the projector) run once per crop.

    The projector runs on every crop's patches before AnyRes-Max downscales them (its cost does not shrink).
    """
    data = {"vision_feature_select_strategy": "full", "vision_feature_layer": -1, **data}
    fields = clip_arch_fields(data, vision, llm)
    pinpoints = tuple((int(h), int(w)) for h, w in (data.get("image_grid_pinpoints") or DEFAULT_PINPOINTS))
    crop = fields["image_size"]
    fields["image_grid_pinpoints"] = pinpoints
    fields["max_crops"] = 1 + max((h // crop) * (w // crop) for h, w in pinpoints)
    fields["anyres_max_patches"] = anyres_max_count(data.get("vision_aspect_ratio", "anyres_max_9"))
    return fields


def llava_onevision_image_tokens(arch: flops.ArchSpec, height: int, width: int) -> tuple[int, int]:
    """ViT crops and LLM image tokens of LLaVA-OneVision for an image of ``height × width`` pixels.

    The AnyRes pinpoint that keeps the most of the image's pixels (ties: the least padding) gives ``nh × nw`` tiles;
    the stitched patch grid is unpadded to the image's aspect ratio and, past ``1.1² · N`` base-view areas
    (``anyres_max_N``), bilinearly downscaled (:func:`onevision_grid`); one newline closes each row; the base view's
    729 patches come first.

    Returns
    -------
    (int, int)
        ``(crops, image_tokens)``. The shipped config gives ``(5, 3699)`` for 672 × 672 (a 2 × 2 grid, 54 × 54
        cells, no downscale) and ``(37, 7371)`` for 2304 × 2304 (6 × 6 tiles, 162 × 162 cells downscaled to 81 × 81).
    """
    if arch.family != "llava_onevision" or arch.image_size is None or arch.image_features_per_crop is None:
        raise ValueError(
            f"llava_onevision_image_tokens needs a llava_onevision architecture, got {arch.family!r}"
        )
    height, width = flops._count(height, "height"), flops._count(width, "width")
    if height == 0 or width == 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    grid_h, grid_w = _best_grid(arch.image_grid_pinpoints, height, width)
    tiles = (grid_h // arch.image_size, grid_w // arch.image_size)
    side = arch.image_size // arch.patch_size
    *_, (rows, cols) = onevision_grid((height, width), tiles, side, arch.anyres_max_patches)
    return 1 + tiles[0] * tiles[1], arch.image_features_per_crop + rows * (cols + 1)


def _image_shape(arch: flops.ArchSpec, size: tuple[int, int] | None = None) -> flops.ImageShape:
    """The base view, the (downscaled) high-resolution grid and its newlines of one ``size`` image (default 672²)."""
    height, width = size or flops.DEFAULT_IMAGE_SIZE
    crops, tokens = llava_onevision_image_tokens(arch, height, width)
    per_crop = arch.vit_tokens_per_crop or 0
    return flops.ImageShape(
        tokens=tokens,
        vit_tokens=(per_crop,) * crops,
        grids=None,
        size=(height, width),
        description=(
            f"{tokens} visual tokens for a {height}x{width} image (base view + high-resolution grid, AnyRes-Max "
            f"{arch.anyres_max_patches} + newlines; {crops} SigLIP passes of {per_crop} tokens)"
        ),
    )


def _bench_image(config: Any, batch: int, generator: torch.Generator) -> BenchImage:
    """One 672 × 672 image per row (for LLaVA-OneVision-7B: 5 crops, 3,699 tokens), as the processor gives it."""
    vision = config.vision_config
    crop = vision.image_size
    side = crop // vision.patch_size
    height, width = flops.DEFAULT_IMAGE_SIZE
    pinpoints = tuple(tuple(int(v) for v in p) for p in config.image_grid_pinpoints)
    grid_h, grid_w = _best_grid(pinpoints, height, width)
    tiles = (grid_h // crop, grid_w // crop)
    *_, (rows, cols) = onevision_grid(
        (height, width), tiles, side, anyres_max_count(config.vision_aspect_ratio)
    )
    tokens = side * side + rows * (cols + 1)
    pixels = torch.randn(batch, 1 + tiles[0] * tiles[1], 3, crop, crop, generator=generator)
    return BenchImage(
        inputs={"pixel_values": pixels, "image_sizes": torch.tensor([[height, width]] * batch)},
        placeholders=[int(config.image_token_id)] * tokens,
        image_flags=[True] * tokens,
        tokens=tokens,
        grids=((side, side), (rows, cols)),
        vit_tokens=side * side,
    )


FAMILY = register_family(
    Family(
        name=LlavaOnevisionAdapter.family,
        model_types=("llava_onevision",),
        model_classes=LlavaOnevisionAdapter.model_classes,
        has_cls=LlavaOnevisionAdapter.has_cls,
        arch_fields=_arch_fields,
        image_shape=_image_shape,
        bench_image=_bench_image,
        vision_parts=clip_vision_parts,
    )
)
