"""Qwen2-VL and Qwen2.5-VL: a ViT without [CLS], a 2x2 patch merger, window attention (2.5), M-RoPE positions.

- Scoring: visual-to-visual attention at the last full-attention block of the ViT (every block in Qwen2-VL, the
  ``fullatt_block_indexes`` ones in 2.5), computed from that block's own q/k (with its 2-D rotary embedding) over each
  image's patches; a merged token's score is the sum of its 2x2 patches' scores, its merge metric their mean key.
- Granularity: the LLM sees one token per 2x2 patch group, so methods choose among those *merged units*. Contextual
  merging happens before the merger's MLP (on the normalised, concatenated 2x2 patch vectors), as LLaVA merges before
  its projector.
- Window attention (2.5): blocks run on patches permuted window by window; scores and features are put back in raster
  order before any choice is made.
- Positions: M-RoPE gives every visual token a (t, h, w) position, so only ``positions="preserve"`` has a meaning:
  the 3-D positions are computed on the unpruned sequence (as the unpatched model would) and gathered for the tokens
  that survive. ``compact`` is refused.
- Videos (``pixel_values_videos``, ``video_grid_thw``): the ViT patches a video in temporal patches of two frames
  and attends within each one (``cu_seqlens`` per temporal patch), so a temporal patch is the video's *frame* here.
  With the method's ``pool="frame"`` each temporal patch is one pruning unit (an int budget = tokens kept per
  temporal patch); with ``pool="video"`` the whole video is one unit (``budget x temporal patches`` tokens, or the
  fraction), its grids one per temporal patch. Scores are the same visual attention within each temporal patch.
  Units of images and videos are listed in placeholder order over (batch, sequence) (images and videos may share a
  prompt); their features go back as ``mm_encoder_outputs["image"]`` and ``["video"]``. Positions are the model's
  own 3-D M-RoPE on the unpruned sequence, gathered for the kept tokens, as for images.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .. import flops, ops
from ..compat import qwen_window_index
from ..layout import hf_generate_positions
from .base import ImageInfo, ModelAdapter, TextStack, UnitTokens, VisionTokens, register_adapter
from .family import BenchImage, Family, register_family

__all__ = ["FAMILY", "Qwen2VLAdapter", "QwenVisionTokens", "qwen2_vl_image_tokens", "qwen2_vl_resize"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class QwenVisionTokens(UnitTokens):
    """One Qwen image (or a video's unit): its merged units (2x2 patches) in raster order; no [CLS].

    ``units`` are the normalised, concatenated patch vectors of every merged unit (the merger MLP's input, shape
    (1, n, 4 * Dv)); ``scores`` and ``keys`` the visual attention each unit receives and the mean pre-RoPE key of its
    patches; ``grids`` one grid for an image, one per temporal patch for a video's unit.
    """


@dataclass(frozen=True)
class _Unit:
    """One pruning unit of a call: image ``item``, or temporal patches ``frames`` of video ``item``."""

    kind: str  # "image" or "video"
    item: int
    frames: tuple[int, ...]
    start: int  # flat (batch * length) column of its first placeholder: the units' order


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``."""

    model_classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    family = "Qwen2-VL"
    supports_compact_positions = False
    has_cls = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = model.model.visual
        vision = self.config.vision_config
        self.merge = vision.spatial_merge_size
        full = getattr(vision, "fullatt_block_indexes", None)
        self.windowed = full is not None
        last_full = max(full) if full else len(self.visual.blocks) - 1
        self.scoring_index = last_full
        self.scoring_block = self.visual.blocks[last_full]
        self.last_block = len(self.visual.blocks) - 1

    @cached_property
    def text(self) -> TextStack:
        return TextStack(self.model.model.language_model)

    def vision_kwargs(self) -> tuple[str, ...]:
        return ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")

    def aligned_kwargs(self) -> tuple[str, ...]:
        return ("mm_token_type_ids",)

    def placeholder_ids(self, infos: list[ImageInfo]) -> tuple[int, ...]:
        if any(info.video is not None for info in infos):
            return (self.image_token_id, int(self.config.video_token_id))
        return (self.image_token_id,)

    def has_visual(self, kwargs: dict) -> bool:
        return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None

    def _grids(self, kwargs: dict, kind: str) -> list[tuple[int, int, int]]:
        pixels = "pixel_values" if kind == "image" else "pixel_values_videos"
        if kwargs.get(pixels) is None:
            return []
        grid_thw = kwargs.get(f"{kind}_grid_thw")
        if grid_thw is None:
            raise ValueError(
                f"{kind}_grid_thw is missing: {self.family} needs each {kind}'s patch grid (the processor returns it)"
            )
        return [tuple(g) for g in grid_thw.tolist()]

    def _units(self, kwargs: dict) -> list[_Unit]:
        """The call's pruning units in placeholder order: each image; each video's temporal patches
        (``pool="frame"``) or the whole video (``pool="video"``)."""
        flat = kwargs["input_ids"].flatten()
        units: list[_Unit] = []
        for kind, token in (("image", self.image_token_id), ("video", int(self.config.video_token_id))):
            grids = self._grids(kwargs, kind)
            columns = torch.nonzero(flat == token).flatten().tolist()
            per_frame = [h * w // (self.merge * self.merge) for _, h, w in grids]
            need = sum(t * n for (t, _, _), n in zip(grids, per_frame, strict=True))
            if need != len(columns):
                raise ValueError(
                    f"{len(grids)} {kind}(s) need {need} <{kind}> placeholder tokens in input_ids, found {len(columns)}"
                )
            cursor = 0
            for item, ((t, _, _), n) in enumerate(zip(grids, per_frame, strict=True)):
                if kind == "image" or self.pool == "frame":
                    parts = [(f,) for f in range(t)] if kind == "video" else [()]
                else:
                    parts = [tuple(range(t))]
                    run = columns[cursor : cursor + t * n]
                    if run[-1] - run[0] + 1 != t * n:
                        raise ValueError(
                            f"pool='video': video {item}'s placeholders are not one run (text between its temporal "
                            "patches, as Qwen3-VL's timestamps); pool='video' needs one run per video, use "
                            "pool='frame'"
                        )
                for frames in parts:
                    units.append(_Unit(kind, item, frames, columns[cursor]))
                    cursor += n * max(1, len(frames))
        return sorted(units, key=lambda u: u.start)

    def image_infos(self, kwargs: dict) -> list[ImageInfo]:
        grids = {kind: self._grids(kwargs, kind) for kind in ("image", "video")}
        if not grids["image"] and not grids["video"]:
            return []
        units = self._units(kwargs)
        self._kinds = [u.kind for u in units]  # for mm_encoder_outputs, later in the same vision stage
        infos = []
        for u in units:
            t, h, w = grids[u.kind][u.item]
            rows, cols = h // self.merge, w // self.merge
            if u.kind == "image":
                infos.append(
                    ImageInfo(tokens=t * rows * cols, grids=((t * rows, cols),), vit_tokens=(t * h * w,))
                )
            else:  # the ViT attends within each temporal patch: one pass of h*w patches per temporal patch
                count = len(u.frames)
                infos.append(
                    ImageInfo(
                        tokens=count * rows * cols,
                        grids=((rows, cols),) * count,
                        vit_tokens=(h * w,) * count,
                        video=u.item,
                        frames=u.frames,
                    )
                )
        return infos

    def _project(self, units: torch.Tensor) -> torch.Tensor:
        return self.visual.merger.mlp(units)

    def encode(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        """One ViT pass for the images and one for the videos; each unit becomes its own group."""
        towers = {}
        for kind in ("image", "video"):
            pixels = kwargs.get("pixel_values" if kind == "image" else "pixel_values_videos")
            if pixels is not None:
                towers[kind] = self._tower(pixels, kwargs[f"{kind}_grid_thw"])
        groups = []
        unit = self.merge * self.merge
        for index, u in enumerate(self._units(kwargs)):
            parts, (t, h, w) = towers[u.kind][u.item]
            rows, cols = h // self.merge, w // self.merge
            if u.kind == "image":
                grids, cut = ((t * rows, cols),), slice(None)
            else:  # a video's units run t-major: temporal patch f is block f of h*w/4 units
                per = h * w // unit
                grids, cut = (
                    ((rows, cols),) * len(u.frames),
                    slice(u.frames[0] * per, (u.frames[-1] + 1) * per),
                )
            groups.append(([index], self._make_tokens([p[cut][None] for p in parts], grids)))
        return groups

    def _make_tokens(self, parts: list[torch.Tensor], grids: tuple[tuple[int, int], ...]) -> VisionTokens:
        """VisionTokens of one unit from its slices of :meth:`_tower`'s tensors (each with a leading 1)."""
        units, scores, keys = parts
        return QwenVisionTokens(units, scores, keys, grids, self._project)

    def _tower(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> list[tuple[list[torch.Tensor], tuple[int, int, int]]]:
        """Run the ViT on images or videos (one ``grid_thw`` row each).

        Returns
        -------
        list of (tensors, (t, h, w))
            Per item: its merged units (n, 4 Dv), scores (n,) and keys (n, d) in raster order (t-major).
        """
        pixel_values = pixel_values.type(self.visual.dtype)
        captured: dict[str, object] = {}

        def grab_input(module, args, hook_kwargs):
            captured["input"] = args[0] if args else hook_kwargs["hidden_states"]
            captured["rope"] = hook_kwargs["position_embeddings"]
            captured["cu_seqlens"] = hook_kwargs["cu_seqlens"]

        def grab_output(module, args, output):
            captured["output"] = output

        handles = [self.scoring_block.register_forward_pre_hook(grab_input, with_kwargs=True)]
        handles.append(self.visual.blocks[self.last_block].register_forward_hook(grab_output))
        try:
            self.visual(pixel_values, grid_thw=grid_thw)
        finally:
            for handle in handles:
                handle.remove()

        unit = self.merge * self.merge
        scores_w, keys_w = self._patch_scores(captured)  # window order when windowed
        units_w = self.visual.merger.ln_q(captured["output"]).view(-1, unit * captured["output"].shape[-1])
        unit_scores = scores_w.view(-1, unit).sum(1)
        unit_keys = keys_w.view(-1, unit, keys_w.shape[-1]).mean(1)
        if self.windowed:  # blocks ran window by window: back to raster order of the merged units
            restore = torch.argsort(qwen_window_index(self.visual, grid_thw).to(unit_scores.device))
            unit_scores, unit_keys, units_w = unit_scores[restore], unit_keys[restore], units_w[restore]
        counts = (grid_thw.prod(-1) // unit).tolist()
        return [
            ([u, s, k], tuple(g))
            for s, k, u, g in zip(
                unit_scores.split(counts),
                unit_keys.split(counts),
                units_w.split(counts),
                grid_thw.tolist(),
                strict=True,
            )
        ]

    def _patch_scores(self, captured: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per patch: attention received from its image's patches, and its pre-RoPE key averaged over heads."""
        block = self.scoring_block
        attn = block.attn
        x = block.norm1(captured["input"])
        length = x.shape[0]
        q, k, _ = (
            attn.qkv(x).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )  # (S, H, d)
        keys = k.float().mean(1)
        cos, sin = captured["rope"]
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q = q.float() * cos + _rotate_half(q.float()) * sin
        k = k.float() * cos + _rotate_half(k.float()) * sin
        bounds = captured["cu_seqlens"].tolist()
        scores = []
        for start, end in itertools.pairwise(bounds):
            qi = q[start:end].transpose(0, 1)[None]  # (1, H, n, d)
            ki = k[start:end].transpose(0, 1)[None]
            cols = torch.arange(end - start, device=q.device)[None]
            scores.append(ops.visual_attention(qi, ki, None, cols, causal=False, scale=attn.scaling)[0])
        return torch.cat(scores), keys

    def features(self, tokens: VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        if selection is None:
            return self._project(tokens.hidden)
        if selection.space == "projected":
            return selection.apply(tokens.projected())
        return self._project(selection.apply(tokens.hidden))

    def mm_encoder_outputs(self, features: list[torch.Tensor]) -> dict:
        """Per-unit features as ``{"image": ..., "video": ...}``: the model scatters each kind into its own
        placeholders in order, so a video's units go back as consecutive entries of its list."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        out = {}
        for kind in ("image", "video"):
            chosen = [f for f, k in zip(features, self._kinds, strict=True) if k == kind]
            if chosen:
                out[kind] = BaseModelOutputWithPooling(pooler_output=chosen)
        return out

    def positions(self, kwargs: dict, *, generate: bool) -> torch.Tensor | None:
        """M-RoPE positions of the unpruned sequence, as the unpatched model computes them.

        ``generate()`` hands the model ``[text; t; h; w]`` positions (4, B, L); a plain forward computes (3, B, L).
        """
        if kwargs.get("position_ids") is not None:
            return kwargs["position_ids"]
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        types = kwargs.get("mm_token_type_ids")
        if types is None:
            raise ValueError(
                "mm_token_type_ids is missing: Qwen2-VL needs it for M-RoPE (the processor returns it)"
            )
        vision, _deltas = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=types,
            image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"),
            attention_mask=mask,
        )
        if not generate:
            return vision
        # generate() prepends its own 1-D text positions to the M-RoPE ones (the one definition is in layout).
        text = hf_generate_positions(mask, *input_ids.shape, input_ids.device)
        return torch.cat([text[None].to(vision.device), vision], dim=0)


# ---------------------------------------------------------------------------------------------------------------
# the family, for the tools that cost or build a model without hooking it (flops, `visiondrop flops`, bench)
# ---------------------------------------------------------------------------------------------------------------


def qwen2_vl_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Size the Qwen2-VL image processor resizes an image to (both sides multiples of ``factor``).

    Each side is rounded to the nearest multiple of ``factor`` (= patch · merge = 28); if the area
    then exceeds ``max_pixels`` (or falls below ``min_pixels``) the image is scaled uniformly to fit,
    rounding sides down (up). Defaults are transformers' processor defaults.
    """
    height, width = flops._count(height, "height"), flops._count(width, "width")
    if height == 0 or width == 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def qwen2_vl_image_tokens(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    resize: bool = True,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """ViT patches and LLM visual tokens of Qwen2-VL / Qwen2.5-VL for one ``height × width`` image.

    Parameters
    ----------
    height, width : int
        Image size in pixels.
    patch_size, merge_size : int, optional
        14 and 2 for Qwen2-VL and Qwen2.5-VL.
    resize : bool, optional
        Apply the processor's resize rule first (:func:`qwen2_vl_resize`); with ``False`` the sides
        must already be multiples of ``patch_size · merge_size``.
    min_pixels, max_pixels : int, optional
        Processor pixel bounds (transformers' defaults).

    Returns
    -------
    (int, int)
        ``(patches, tokens)``: tokens through the ViT (one temporal patch covers the duplicated image
        frame, so ``(h/14)·(w/14)``) and tokens entering the LLM after the ``merge²`` merger.
    """
    factor = patch_size * merge_size
    if resize:
        h, w = qwen2_vl_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    else:
        h, w = flops._count(height, "height"), flops._count(width, "width")
        if h == 0 or w == 0 or h % factor or w % factor:
            raise ValueError(f"image size {h}x{w} must be positive multiples of {factor} when resize=False")
    patches = (h // patch_size) * (w // patch_size)
    return patches, patches // (merge_size * merge_size)


def _arch_fields(
    data: Mapping[str, Any], vision: Mapping[str, Any], llm: Mapping[str, int]
) -> dict[str, Any]:
    """A dynamic-resolution ViT without [CLS] (one pass per image) and the 2x2 patch merger as the projector.

    Qwen2-VL's vision MLP has 2 matrices and ``embed_dim`` is the ViT width; Qwen2.5-VL's is SwiGLU (3 matrices) and
    ``hidden_size`` is the ViT width there.
    """
    merge = int(vision.get("spatial_merge_size", 2))
    if data.get("model_type") == "qwen2_vl":
        embed = int(vision["embed_dim"])
        vit_mlp = int(embed * vision["mlp_ratio"])
        mlp_matrices = 2
        merger_out = int(vision.get("hidden_size") or llm["hidden_size"])
    elif data.get("model_type") == "qwen3_vl":  # GELU vision MLP (2 matrices), `hidden_size` is the ViT width
        embed = int(vision["hidden_size"])
        vit_mlp = int(vision["intermediate_size"])
        mlp_matrices = 2
        merger_out = int(vision.get("out_hidden_size") or llm["hidden_size"])
    else:  # qwen2_5_vl
        embed = int(vision["hidden_size"])
        vit_mlp = int(vision["intermediate_size"])
        mlp_matrices = 3
        merger_out = int(vision.get("out_hidden_size") or llm["hidden_size"])
    merger_in = embed * merge * merge
    # Qwen3-VL's DeepStack runs one more merger of the same shape per level on the same units: (1 + levels)
    # mergers in -> h -> out cost exactly one merger in -> (1 + levels) h -> out.
    mergers = (
        1 + len(vision.get("deepstack_visual_indexes") or ()) if data.get("model_type") == "qwen3_vl" else 1
    )
    return {
        "vit_layers": int(vision["depth"]),
        "vit_hidden": embed,
        "vit_mlp": vit_mlp,
        "vit_mlp_matrices": mlp_matrices,
        "vit_tokens_per_crop": None,
        "vit_cls_tokens": 0,
        "image_features_per_crop": None,
        "patch_size": int(vision.get("patch_size", 14)),
        "image_size": None,
        "spatial_merge_size": merge,
        "projector_in": merger_in,
        "projector_hidden": merger_in * mergers,
        "projector_out": merger_out,
        "max_crops": 1,
    }


def _image_shape(arch: flops.ArchSpec, size: tuple[int, int] | None = None) -> flops.ImageShape:
    """Dynamic resolution: one ViT pass over the resized image (default 672 × 672), ``merge²`` patches per token."""
    height, width = size or flops.DEFAULT_IMAGE_SIZE
    factor = arch.patch_size * arch.spatial_merge_size
    resized = qwen2_vl_resize(height, width, factor=factor)
    patches, tokens = qwen2_vl_image_tokens(
        height, width, patch_size=arch.patch_size, merge_size=arch.spatial_merge_size
    )
    return flops.ImageShape(
        tokens=tokens,
        vit_tokens=(patches,),
        grids=((resized[0] // factor, resized[1] // factor),),
        size=(height, width),
        description=(
            f"{tokens} visual tokens for a {height}x{width} image (resized to {resized[0]}x{resized[1]}: "
            f"1 ViT pass of {patches} patches, {arch.spatial_merge_size}x{arch.spatial_merge_size} merged)"
        ),
    )


def _bench_image(config: Any, batch: int, generator: torch.Generator) -> BenchImage:
    """One 672 × 672 image per row (48 x 48 patches, 576 tokens at 7B's 14 px patches), as the processor gives it.

    ``<|vision_start|>`` and ``<|vision_end|>`` frame the placeholders (they are text tokens: ``mm_token_type_ids``
    0); ``pixel_values`` holds every row's flattened patches, ``(B * h * w, C * temporal * patch²)``.
    """
    vision = config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    height, width = qwen2_vl_resize(*flops.DEFAULT_IMAGE_SIZE, factor=patch * merge)
    h, w = height // patch, width // patch
    tokens = h * w // (merge * merge)
    channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)
    width_in = channels * vision.temporal_patch_size * patch * patch
    pixels = torch.randn(batch * h * w, width_in, generator=generator)
    ids = [
        int(config.vision_start_token_id),
        *[int(config.image_token_id)] * tokens,
        int(config.vision_end_token_id),
    ]
    return BenchImage(
        inputs={"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, h, w]] * batch)},
        placeholders=ids,
        image_flags=[False, *[True] * tokens, False],
        tokens=tokens,
        grids=((h // merge, w // merge),),
        vit_tokens=h * w,
        modality_ids="mm_token_type_ids",
    )


def _vision_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """The ViT blocks and the merger's MLP (the adapter projects through ``merger.mlp``, so count there)."""
    visual = model.model.visual
    return visual.blocks, visual.merger.mlp


FAMILY = register_family(
    Family(
        name=Qwen2VLAdapter.family,
        model_types=("qwen2_vl", "qwen2_5_vl"),
        model_classes=Qwen2VLAdapter.model_classes,
        has_cls=Qwen2VLAdapter.has_cls,
        arch_fields=_arch_fields,
        image_shape=_image_shape,
        bench_image=_bench_image,
        vision_parts=_vision_parts,
    )
)
