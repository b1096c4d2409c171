"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes crops, unpadding and ``image_newline`` tokens.

How an image reaches the LLM unpruned (transformers 5.x ``pack_image_features``): a 24 x 24 base view of the whole
image, then the high-resolution grid stitched from ``nh x nw`` crops of 24 x 24 patches, unpadded to ``H' x W'``
cells, each of its rows followed by one ``image_newline`` token: ``576 + H' * (W' + 1)`` placeholders.

The policy visiondrop applies when a vision stage prunes an image (documented in the README):

- **scoring per crop**: every crop is its own CLIP view with its own [CLS], so a patch is scored by its own crop's
  [CLS] attention (or, with ``score="visual"``, by the attention it receives from its own crop's patches);
- **one pool per image**: the dominant tokens are the top ones over all the image's patches (base view and the
  unpadded high-resolution cells together; padded cells are never candidates), and the rest merge into contextual
  tokens exactly as for LLaVA-1.5 (strided anchors over the remaining patches in placeholder order);
- **packing**: surviving tokens keep placeholder order — base-view patches first, then high-resolution cells row by
  row — dominant ones first, then the contextual ones in anchor order; the base view's [CLS] goes first when kept;
- **newlines**: the ``image_newline`` tokens are dropped by a pruned vision stage (the grid rows they end no longer
  exist). They count as visual tokens in the image's placeholder count, so a float budget is a share of all of them.
  A vision stage that keeps everything leaves the image exactly as transformers packs it, newlines included, and
  in-LLM stages treat newline tokens like any other visual token.
"""

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
from .llava import checked_feature_layer, clip_arch_fields, clip_vision_parts, feature_index

__all__ = [
    "DEFAULT_PINPOINTS",
    "FAMILY",
    "LlavaNextAdapter",
    "NextVisionTokens",
    "anyres_layout",
    "llava_next_image_tokens",
    "next_image_info",
    "token_sources",
]


def _unpadded_window(image_size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """Rows and columns of the high-resolution grid that survive unpadding: (row0, row1, col0, col1).

    The same arithmetic as transformers' ``unpad_image`` (5.x): the padding added to fit the image's aspect ratio
    into the crop grid is cut symmetrically.
    """
    height, width = image_size
    if width / height > cols / rows:
        new_height = int(round(height * (cols / width), 7))
        pad = (rows - new_height) // 2
        return pad, rows - pad, 0, cols
    new_width = int(round(width * (rows / height), 7))
    pad = (cols - new_width) // 2
    return 0, rows, pad, cols - pad


def anyres_layout(config: Any, image_size: tuple[int, int]) -> tuple[int, int, tuple[int, int, int, int]]:
    """(nh, nw) crops of an image's high-resolution grid and the grid's unpadded window (row0, row1, col0, col1).

    ``image_size`` is (height, width); ``config`` a LLaVA-NeXT config (its pinpoints and CLIP crop size).
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    nh, nw = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, vision.image_size)
    return nh, nw, _unpadded_window(image_size, nh * side, nw * side)


def next_image_info(config: Any, image_size: tuple[int, int]) -> ImageInfo:
    """The placeholders (base view, then unpadded cells with one newline per row) of an image of ``image_size``.

    A pure function of the config and the size: the HF adapter and the vLLM plugin both count an image with it.
    """
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    nh, nw, (r0, r1, c0, c1) = anyres_layout(config, image_size)
    rows, cols = r1 - r0, c1 - c0
    base = side * side
    return ImageInfo(
        tokens=base + rows * (cols + 1),
        grids=((side, side), (rows, cols)),
        vit_tokens=(base + 1,) * (1 + nh * nw),
        newlines=(False, True),
    )


def token_sources(side: int, nw: int, window: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat crop-token index and placeholder offset of every image token ([CLS], base patches, hi-res cells).

    Crops are ``side x side`` patches behind one [CLS] each, the base view first, then the ``nw``-wide
    high-resolution grid row-major; ``window`` is the grid's unpadded window.
    """
    width = side * side + 1
    r0, r1, c0, c1 = window
    rows = torch.arange(r0, r1)[:, None]
    cols = torch.arange(c0, c1)[None, :]
    crop = 1 + (rows // side) * nw + cols // side  # hi-res crops follow the base view, row-major
    token = 1 + (rows % side) * side + cols % side  # +1 skips each crop's [CLS]
    hires = (crop * width + token).flatten()
    source = torch.cat([torch.arange(width), hires])  # base [CLS] and patches, then the cells
    cells_w = c1 - c0
    cell = torch.arange(hires.numel())
    hires_offset = side * side + (cell // cells_w) * (cells_w + 1) + cell % cells_w
    placeholder = torch.cat([torch.tensor([0]), torch.arange(side * side), hires_offset])
    return source, placeholder


class NextVisionTokens(VisionTokens):
    """One LLaVA-NeXT image: [CLS] of the base view, its 576 patches, then the unpadded high-resolution cells.

    Every token is gathered from one crop's CLIP output; scores and keys come from that crop's own feature layer.
    """

    def __init__(
        self,
        crops_hidden: torch.Tensor,
        crops_input: torch.Tensor,
        layer: nn.Module,
        source: torch.Tensor,
        placeholder: torch.Tensor,
        grids: tuple[tuple[int, int], ...],
        project: Callable[[torch.Tensor], torch.Tensor],
        image_size: tuple[int, int],
    ) -> None:
        """
        Parameters
        ----------
        crops_hidden, crops_input : Tensor, shape (C, 1 + P, Dv)
            Feature-layer output and scoring-layer input of the image's crops (base view first).
        source : LongTensor, shape (n,)
            Flat index ``crop * (1 + P) + token`` of each image token.
        placeholder : LongTensor, shape (n,)
            Placeholder offset of each token in the unpruned packed image.
        """
        self._crops_hidden = crops_hidden
        self._crops_input = crops_input
        self._layer = layer
        self._source = source
        self._project = project
        flat = crops_hidden.reshape(-1, crops_hidden.shape[-1])
        super().__init__(flat[source][None], has_cls=True, grids=grids)
        self._placeholder = placeholder
        self.image_size = image_size

    @cached_property
    def placeholder_offset(self) -> torch.Tensor:
        return self._placeholder

    @cached_property
    def _qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self._layer.self_attn
        normed = self._layer.layer_norm1(self._crops_input)
        shape = (*normed.shape[:-1], attn.num_heads, attn.head_dim)
        return attn.q_proj(normed).view(shape).transpose(1, 2), attn.k_proj(normed).view(shape).transpose(
            1, 2
        )

    def _per_token(self, per_crop: torch.Tensor) -> torch.Tensor:
        """(C, 1 + P, ...) values of every crop token -> (1, n, ...) for this image's tokens."""
        flat = per_crop.reshape(-1, *per_crop.shape[2:])
        return flat[self._source][None]

    def cls_attention(self) -> torch.Tensor:
        q, k = self._qk
        scores = ops.cls_attention(q[:, :, :1], k, scale=self._layer.self_attn.scale)  # (C, P)
        per_crop = torch.cat([scores.new_zeros(scores.shape[0], 1), scores], dim=1)
        return self._per_token(per_crop)

    def visual_attention(self) -> torch.Tensor:
        q, k = self._qk
        crops, _, n, _ = q.shape
        patches = torch.arange(1, n, device=q.device).expand(crops, -1)
        scores = ops.visual_attention(
            q[:, :, 1:], k, None, patches, causal=False, scale=self._layer.self_attn.scale
        )
        per_crop = torch.cat([scores.new_zeros(crops, 1), scores], dim=1)
        return self._per_token(per_crop)

    def keys(self) -> torch.Tensor:
        _, k = self._qk
        return self._per_token(k.mean(1))

    def projected(self) -> torch.Tensor:
        return self._project(self.hidden)


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    """``LlavaNextForConditionalGeneration`` (llava-hf/llava-v1.6-vicuna-7b-hf, -mistral-7b-hf, ...)."""

    model_classes = ("LlavaNextForConditionalGeneration",)
    family = "LLaVA-NeXT"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        layer = checked_feature_layer(cfg, "default")
        vision = cfg.vision_config
        self.side = vision.image_size // vision.patch_size
        layers = vision_encoder_layers(model.model.vision_tower)
        index = feature_index(layer, len(layers))
        self.feature_index = index
        self.scoring_layer = layers[index - 1]

    @cached_property
    def text(self) -> TextStack:
        return TextStack(self.model.model.language_model)

    def vision_kwargs(self) -> tuple[str, ...]:
        return ("pixel_values", "image_sizes")

    def _layout(self, image_size: tuple[int, int]) -> tuple[int, int, tuple[int, int, int, int]]:
        return anyres_layout(self.config, image_size)

    def image_infos(self, kwargs: dict) -> list[ImageInfo]:
        sizes = kwargs.get("image_sizes")
        if kwargs.get("pixel_values") is None:
            return []
        if sizes is None:
            raise ValueError(
                "image_sizes is missing: LLaVA-NeXT needs each image's size (the processor returns it)"
            )
        return [next_image_info(self.config, tuple(size)) for size in torch.as_tensor(sizes).tolist()]

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(hidden)

    def encode(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        pixel_values = kwargs["pixel_values"]
        sizes = [tuple(s) for s in torch.as_tensor(kwargs["image_sizes"]).tolist()]
        layouts = [self._layout(size) for size in sizes]
        counts = [1 + nh * nw for nh, nw, _ in layouts]
        if pixel_values.dim() == 5:  # (images, max crops, C, H, W), padded with unused crops
            pixel_values = torch.cat([pv[:c] for pv, c in zip(pixel_values, counts, strict=True)])
        tower = self.model.model.vision_tower
        layer_input, layer_output = selected_hidden_states(
            tower, pixel_values, [self.feature_index - 1, self.feature_index]
        )
        hidden = layer_output.split(counts)
        inputs = layer_input.split(counts)
        groups = []
        for image, ((_, nw, window), h, x) in enumerate(zip(layouts, hidden, inputs, strict=True)):
            source, placeholder = token_sources(self.side, nw, window)
            tokens = NextVisionTokens(
                h,
                x,
                self.scoring_layer,
                source.to(h.device),
                placeholder.to(h.device),
                ((self.side, self.side), (window[1] - window[0], window[3] - window[2])),
                self._project,
                sizes[image],
            )
            groups.append(([image], tokens))
        return groups

    def features(self, tokens: VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        if selection is None:  # exactly what transformers packs: crops projected, unpadded, newlines appended
            model = self.model.model
            crops = self._project(tokens._crops_hidden[:, 1:])
            packed, _ = model.pack_image_features(
                [crops],
                torch.tensor([tokens.image_size]),
                vision_feature_select_strategy="default",
                image_newline=model.image_newline,
            )
            return packed[0][None]
        if selection.space == "projected":
            return selection.apply(tokens.projected())
        return self._project(selection.apply(tokens.hidden))


# ---------------------------------------------------------------------------------------------------------------
# the family, for the tools that cost or build a model without hooking it (flops, `visiondrop flops`, bench)
# ---------------------------------------------------------------------------------------------------------------

#: transformers' default ``image_grid_pinpoints`` (used when a config leaves them out).
DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = (
    (336, 672),
    (672, 336),
    (672, 672),
    (1008, 336),
    (336, 1008),
)


def _arch_fields(
    data: Mapping[str, Any], vision: Mapping[str, Any], llm: Mapping[str, int]
) -> dict[str, Any]:
    """LLaVA's CLIP tower and projector, run once per crop: the base view and up to the largest grid's tiles."""
    fields = clip_arch_fields(data, vision, llm)
    pinpoints = tuple((int(h), int(w)) for h, w in (data.get("image_grid_pinpoints") or DEFAULT_PINPOINTS))
    crop = fields["image_size"]
    fields["image_grid_pinpoints"] = pinpoints
    fields["max_crops"] = 1 + max((h // crop) * (w // crop) for h, w in pinpoints)
    return fields


def _best_grid(pinpoints: tuple[tuple[int, int], ...], height: int, width: int) -> tuple[int, int]:
    """The any-resolution pinpoint (h, w) that keeps the most of the image's pixels (ties: the least padding)."""
    best: tuple[int, int] | None = None
    best_key: tuple[int, int] | None = None
    for cand_h, cand_w in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(cand_h * cand_w - kept))
        if best_key is None or key > best_key:
            best, best_key = (cand_h, cand_w), key
    if best is None:
        raise ValueError("llava_next_image_tokens needs image_grid_pinpoints, got none")
    return best


def llava_next_image_tokens(arch: flops.ArchSpec, height: int, width: int) -> tuple[int, int]:
    """ViT crops and LLM image tokens of LLaVA-NeXT for an image of ``height × width`` pixels.

    Follows the any-resolution rule: the grid pinpoint that keeps the most of the image's pixels (ties: the least
    padding) gives ``rows × cols`` tiles of ``image_size``; their features are un-padded back to the image's aspect
    ratio (the adapter's own unpadding) and one ``image_newline`` token closes each feature row; the base view
    (``image_features_per_crop`` tokens) comes first.

    Parameters
    ----------
    arch : visiondrop.flops.ArchSpec
        A ``llava_next`` architecture.
    height, width : int
        Original image size in pixels.

    Returns
    -------
    (int, int)
        ``(crops, image_tokens)``: ViT passes (base + tiles) and visual tokens entering the LLM. The maximum for the
        shipped config is ``(5, 2928)`` (672×672 grid, square image: 576 + 48·48 + 48).
    """
    if arch.family != "llava_next" or arch.image_size is None or arch.image_features_per_crop is None:
        raise ValueError(f"llava_next_image_tokens needs a llava_next architecture, got {arch.family!r}")
    height, width = flops._count(height, "height"), flops._count(width, "width")
    if height == 0 or width == 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    grid_h, grid_w = _best_grid(arch.image_grid_pinpoints, height, width)
    grid_rows, grid_cols = grid_h // arch.image_size, grid_w // arch.image_size
    side = arch.image_size // arch.patch_size
    r0, r1, c0, c1 = _unpadded_window((height, width), grid_rows * side, grid_cols * side)
    rows, cols = r1 - r0, c1 - c0
    return 1 + grid_rows * grid_cols, arch.image_features_per_crop + rows * cols + rows


def _image_shape(arch: flops.ArchSpec, size: tuple[int, int] | None = None) -> flops.ImageShape:
    """The base view, the high-resolution grid and its newlines of one ``size`` image (default 672 × 672)."""
    height, width = size or flops.DEFAULT_IMAGE_SIZE
    crops, tokens = llava_next_image_tokens(arch, height, width)
    per_crop = arch.vit_tokens_per_crop or 0
    return flops.ImageShape(
        tokens=tokens,
        vit_tokens=(per_crop,) * crops,
        grids=None,
        size=(height, width),
        description=(
            f"{tokens} visual tokens for a {height}x{width} image (base view + high-resolution grid + "
            f"newlines; {crops} ViT passes of {per_crop} tokens)"
        ),
    )


def _bench_image(config: Any, batch: int, generator: torch.Generator) -> BenchImage:
    """One image per row of the largest pinpoint's size (672 × 672 for LLaVA-NeXT-7B: 5 crops, 2,928 tokens)."""
    vision = config.vision_config
    crop = vision.image_size
    side = crop // vision.patch_size
    height, width = max((tuple(p) for p in config.image_grid_pinpoints), key=lambda p: (p[0] * p[1], p))
    grid_h, grid_w = _best_grid(tuple(tuple(p) for p in config.image_grid_pinpoints), height, width)
    nh, nw = grid_h // crop, grid_w // crop
    r0, r1, c0, c1 = _unpadded_window((height, width), nh * side, nw * side)
    rows, cols = r1 - r0, c1 - c0
    tokens = side * side + rows * (cols + 1)
    pixels = torch.randn(batch, 1 + nh * nw, 3, crop, crop, generator=generator)
    return BenchImage(
        inputs={"pixel_values": pixels, "image_sizes": torch.tensor([[height, width]] * batch)},
        placeholders=[int(config.image_token_id)] * tokens,
        image_flags=[True] * tokens,
        tokens=tokens,
        grids=((side, side), (rows, cols)),
        vit_tokens=side * side + 1,
    )


FAMILY = register_family(
    Family(
        name=LlavaNextAdapter.family,
        model_types=("llava_next",),
        model_classes=LlavaNextAdapter.model_classes,
        has_cls=LlavaNextAdapter.has_cls,
        arch_fields=_arch_fields,
        image_shape=_image_shape,
        bench_image=_bench_image,
        vision_parts=clip_vision_parts,
    )
)
