"""InternVL 2.5 / 3.x (``InternVLForConditionalGeneration``): 448 px tiles, InternViT with [CLS], pixel shuffle.

How an image reaches the LLM unpruned (transformers 5.24, ``models/internvl/modeling_internvl.py``): the processor cuts
it into ``c x r`` tiles of ``image_size`` px (the grid whose aspect ratio is closest to the image's, 1 to 12 tiles)
plus, when there is more than one, a thumbnail of the whole image, last; every tile is one InternViT pass over
``[CLS] + s x s`` patches (448 / 14: ``s = 32``). ``get_image_features`` takes the last layer's output
(``vision_feature_layer=-1``), drops [CLS] (``"default"`` strategy), and pixel-shuffles each tile's ``s x s`` grid by
``downsample_ratio`` 0.5: LLM token ``(i, j)`` of a tile is the concatenation of its ViT patches ``(2i, 2j)``,
``(2i, 2j+1)``, ``(2i+1, 2j)``, ``(2i+1, 2j+1)`` (row, column; this order, ``Dv`` channels each), ``(s/2)^2 = 256``
tokens per tile, then the projector (LayerNorm + MLP). The image's ``<IMG_CONTEXT>`` run holds ``256 * T``
placeholders, tile by tile, each tile's tokens in raster order.

The policy visiondrop applies:

- **granularity**: methods choose among LLM tokens (the 2x2 units), never among ViT patches: the report's grids are
  one ``(s/2) x (s/2)`` grid per tile, in placeholder order, and a kept token carries exactly its four patches
  (``internvl_token_patches`` says which; ``tests/test_internvl.py`` proves it on a tiny model). Contextual tokens
  merge units (their concatenated 4-patch vectors) before the projector, as LLaVA merges before its projector.
- **scores**: visual attention at the feature layer (the last ViT layer), from that layer's own q/k on its normalised
  input, per tile: the attention each patch receives from its tile's patch queries (the softmax also covers [CLS]).
  A token's score is the **sum** of its 4 patches' scores — the attention mass its 2x2 region receives (ranking by
  it equals ranking by the mean, as every token has exactly 4 patches, and it preserves the tile's total mass, as
  Qwen2-VL's merged units do); its merge metric is the mean of its patches' keys (heads averaged). The patch scores
  are aggregated through the model's own ``pixel_shuffle``, so the score of token ``t`` is by construction made of
  the patches whose features token ``t`` carries.
- **no [CLS] ranking**: InternViT has a [CLS] token, but InternVL never consumes its output: the feature layer is the
  last layer and its [CLS] row is dropped before pixel shuffle (the tower's own pooling is a patch mean,
  ``use_mean_pooling``), so the [CLS] query of the scoring layer feeds nothing the LVLM was trained through. Its
  attention is not used: ``score="auto"`` gives visual scores, and ``score="cls"``, VisionZip and VisPruner are
  refused, as on Qwen2-VL. ``keep_cls`` has no effect (no [CLS] reaches the LLM unpruned either).
- **budget across tiles**: one pool per image, as LLaVA-NeXT's crops: an int budget is the image's tokens over all
  its tiles and the thumbnail, a float a share of all ``256 * T``; dominant tokens are the top ones over every tile
  together (each tile's scores come from its own softmax), survivors keep placeholder order (tile by tile, raster
  order within a tile).
- **images**: one placeholder run is one image (the processor frames each with ``<img>``/``</img>``); its tile
  count is the run's length / 256, and the runs must account for every tile of ``pixel_values``. Video frames,
  which the processor also sends as ``pixel_values`` (one tile each, one run each), are pruned as one-tile images.
  Features the caller encodes and passes as ``mm_encoder_outputs`` (transformers' ``(tiles, 256, D)`` tensor) skip
  the vision stage; in-LLM stages then see each tile as one image (its own budget), since nothing in that tensor
  says which tiles form an image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn

from .. import flops, ops
from .base import ImageInfo, ModelAdapter, TextStack, UnitTokens, VisionTokens, register_adapter
from .family import BenchImage, Family, register_family

__all__ = [
    "FAMILY",
    "MAX_TILES",
    "InternVLAdapter",
    "InternVLVisionTokens",
    "internvl_tiles",
    "internvl_token_patches",
]

#: The InternVL processors' default tile limits (``min_patches`` 1, ``max_patches`` 12), thumbnail excluded.
MIN_TILES, MAX_TILES = 1, 12


def internvl_token_patches(token: int, side: int, ratio: float = 0.5) -> tuple[int, list[int]]:
    """The tile and ViT patches one InternVL LLM token of an image carries.

    Parameters
    ----------
    token : int
        Index of the token in the image's placeholder run (``0 .. 256 T - 1``), i.e. a cell of the report's grids.
    side : int
        ViT patches per tile side (448 / 14 = 32).
    ratio : float, optional
        ``downsample_ratio`` (0.5: 2x2 patches per token).

    Returns
    -------
    (int, list of int)
        The tile (0-based, the thumbnail last) and the raster indices (``row * side + col``, [CLS] not counted) of
        the patches, in the order their features are concatenated.
    """
    merge = round(1 / ratio)
    units = side // merge
    tile, cell = divmod(token, units * units)
    row, col = divmod(cell, units)
    patches = [(merge * row + a) * side + merge * col + b for a in range(merge) for b in range(merge)]
    return tile, patches


class InternVLVisionTokens(UnitTokens):
    """One InternVL image: its LLM tokens (pixel-shuffled 2x2 patch units) over all its tiles; no [CLS] among them.

    ``units`` are the pixel-shuffled feature-layer outputs (the projector's input, shape (1, n, 4 * Dv)), tiles in
    order; ``scores`` the visual attention each token receives (sum over its 4 patches, each from its own tile);
    ``keys`` the mean key of its patches; ``grids`` one token grid per tile.
    """


@register_adapter
class InternVLAdapter(ModelAdapter):
    """``InternVLForConditionalGeneration`` (OpenGVLab/InternVL3-1B-hf ... InternVL3-78B-hf, InternVL2.5-*-hf): images."""

    model_classes = ("InternVLForConditionalGeneration",)
    family = "InternVL"
    has_cls = False  # its [CLS] exists but is never consumed: see the module docstring

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        if cfg.vision_feature_layer != -1:
            raise ValueError(
                f"vision_feature_layer={cfg.vision_feature_layer!r}: visiondrop supports InternVL's -1 (the last "
                "ViT layer, as every published InternVL 2.5 / 3 checkpoint uses)"
            )
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: visiondrop supports "
                "'default' (the [CLS] dropped before pixel shuffle)"
            )
        vision = cfg.vision_config
        height, width = _pair(vision.image_size)
        patch_h, patch_w = _pair(vision.patch_size)
        if height != width or patch_h != patch_w:
            raise ValueError(
                f"image_size={vision.image_size!r}, patch_size={vision.patch_size!r}: visiondrop supports square "
                "InternVL tiles"
            )
        self.side = height // patch_h
        self.ratio = float(cfg.downsample_ratio)
        self.merge = round(1 / self.ratio)
        if self.merge * self.ratio != 1 or self.side % self.merge:
            raise ValueError(
                f"downsample_ratio={cfg.downsample_ratio!r}: visiondrop supports 1/k ratios that divide the "
                f"{self.side} x {self.side} patch grid"
            )
        self.units = self.side // self.merge
        self.tile_tokens = self.units * self.units
        self.tower = model.model.vision_tower
        self.scoring_layer = self.tower.encoder.layer[-1]

    @cached_property
    def text(self) -> TextStack:
        return TextStack(self.model.model.language_model)

    def check_call(self, kwargs: dict) -> None:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is not None and pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: InternVL takes (tiles, channels, height, width)"
            )

    def image_infos(self, kwargs: dict) -> list[ImageInfo]:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        input_ids = kwargs.get("input_ids")
        if input_ids is None:  # the runtime refuses this case first, with its own message
            raise ValueError("input_ids is missing: InternVL images are found by their placeholder runs")
        infos = []
        for row in (input_ids == self.image_token_id).cpu():
            padded = torch.cat(
                [torch.zeros(1, dtype=torch.int8), row.to(torch.int8), torch.zeros(1, dtype=torch.int8)]
            )
            edges = torch.nonzero(padded[1:] != padded[:-1]).flatten().tolist()
            for start, end in zip(edges[0::2], edges[1::2], strict=True):
                length = end - start
                if length % self.tile_tokens:
                    raise ValueError(
                        f"a run of {length} image placeholders is not a whole number of InternVL tiles "
                        f"({self.tile_tokens} tokens each)"
                    )
                tiles = length // self.tile_tokens
                infos.append(
                    ImageInfo(
                        tokens=length,
                        grids=((self.units, self.units),) * tiles,
                        vit_tokens=(self.side * self.side + 1,) * tiles,
                    )
                )
        tiles = sum(len(info.grids) for info in infos)
        if tiles != pixel_values.shape[0]:
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} tiles but the image placeholders of input_ids ask for "
                f"{tiles} ({self.tile_tokens} per tile)"
            )
        return infos

    def _project(self, units: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(units)

    def _shuffle(self, per_patch: torch.Tensor) -> torch.Tensor:
        """(tiles, s*s, c) values of every patch -> (tiles, (s/2)^2, 4c), through the model's own ``pixel_shuffle``."""
        tiles, _, channels = per_patch.shape
        grid = per_patch.reshape(tiles, self.side, self.side, channels)
        shuffled = self.model.model.pixel_shuffle(grid, scale_factor=self.ratio)
        return shuffled.reshape(tiles, self.tile_tokens, -1)

    def encode(self, kwargs: dict) -> list[tuple[list[int], VisionTokens]]:
        infos = self.image_infos(kwargs)
        pixel_values = kwargs["pixel_values"].to(dtype=self.model.model.dtype)  # as get_image_features casts
        captured: dict[str, torch.Tensor] = {}

        def grab_input(module, args, hook_kwargs):
            captured["input"] = args[0] if args else hook_kwargs["hidden_states"]

        handle = self.scoring_layer.register_forward_pre_hook(grab_input, with_kwargs=True)
        try:
            # The call get_image_features makes; with vision_feature_layer=-1 it reads last_hidden_state.
            features = self.tower(pixel_values=pixel_values, return_dict=True).last_hidden_state
        finally:
            handle.remove()

        patch_scores, patch_keys = self._patch_scores(captured["input"])  # (tiles, s*s), (tiles, s*s, d)
        units = self._shuffle(features[:, 1:])  # (tiles, 256, 4 Dv): what the projector receives
        scores = self._shuffle(patch_scores[..., None]).sum(-1)  # (tiles, 256): the 4 patches' sum
        keys = self._shuffle(patch_keys)
        keys = keys.view(*keys.shape[:2], self.merge * self.merge, -1).mean(2)  # (tiles, 256, d)
        counts = [len(info.grids) for info in infos]
        groups = []
        for image, (u, s, k, info) in enumerate(
            zip(units.split(counts), scores.split(counts), keys.split(counts), infos, strict=True)
        ):
            tokens = InternVLVisionTokens(
                u.reshape(1, -1, u.shape[-1]),
                s.reshape(1, -1),
                k.reshape(1, -1, k.shape[-1]),
                info.grids,
                self._project,
            )
            groups.append(([image], tokens))
        return groups

    def _patch_scores(self, layer_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tile and patch: attention received from the tile's patch queries, and the head-averaged key.

        The scoring layer's own attention inputs: ``layernorm_before``, q/k projections, the optional q/k norms.
        """
        layer = self.scoring_layer
        attn = layer.attention
        normed = layer.layernorm_before(layer_input)
        tiles, n, _ = normed.shape
        q = attn.q_norm(attn.q_proj(normed)).view(tiles, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(normed)).view(tiles, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        patches = torch.arange(1, n, device=q.device).expand(tiles, -1)
        # Non-causal: every patch query sees every key of its tile, [CLS] included in the softmax.
        scores = ops.visual_attention(q[:, :, 1:], k, None, patches, causal=False, scale=attn.scale)
        return scores, k[:, :, 1:].float().mean(1)

    def features(self, tokens: VisionTokens, selection: ops.Selection | None) -> torch.Tensor:
        if selection is None:  # tile by tile, as get_image_features projects them
            tiles = tokens.hidden.view(len(tokens.grids), self.tile_tokens, -1)
            return self._project(tiles).reshape(1, tokens.num_tokens, -1)
        if selection.space == "projected":
            return selection.apply(tokens.projected())
        return self._project(selection.apply(tokens.hidden))

    def mm_encoder_outputs(self, features: list[torch.Tensor]) -> dict:
        """InternVL scatters one ``pooler_output`` tensor over its placeholders: the images' (k_i, D) rows, stacked."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=torch.cat(features, dim=0))}


def _pair(value: Any) -> tuple[int, int]:
    """An int or a (height, width) pair of a vision config (InternVL stores both forms)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


# ---------------------------------------------------------------------------------------------------------------
# the family, for the tools that cost or build a model without hooking it (flops, `visiondrop flops`, bench)
# ---------------------------------------------------------------------------------------------------------------


def internvl_tiles(
    height: int, width: int, *, tile: int = 448, min_tiles: int = MIN_TILES, max_tiles: int = MAX_TILES
) -> tuple[int, int]:
    """The ``(columns, rows)`` tile grid InternVL's processor cuts a ``height x width`` image into.

    Among the grids of ``min_tiles .. max_tiles`` tiles (ordered by tile count), the one whose aspect ratio
    (columns / rows) is closest to the image's wins; on a tie the grid with more tiles wins while the image's area
    exceeds half of that grid's area in pixels. A grid of more than one tile is followed by a thumbnail (one more
    ViT pass), which :func:`_image_shape` adds.
    """
    height, width = flops._count(height, "height"), flops._count(width, "width")
    if height == 0 or width == 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    grids = sorted(
        {
            (cols, rows)
            for count in range(min_tiles, max_tiles + 1)
            for cols in range(1, count + 1)
            for rows in range(1, count + 1)
            if min_tiles <= cols * rows <= max_tiles
        },
        key=lambda g: g[0] * g[1],
    )
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def _arch_fields(
    data: Mapping[str, Any], vision: Mapping[str, Any], llm: Mapping[str, int]
) -> dict[str, Any]:
    """InternViT run once per tile over ``[CLS] + s^2`` patches; pixel shuffle, then a 2-layer MLP projector.

    The projector's input is ``4 * Dv`` wide (one pixel-shuffled 2x2 unit; its LayerNorm is not counted) and its
    hidden and output widths are the LLM's; the ViT's MLP has 2 matrices. At most ``MAX_TILES`` tiles and a
    thumbnail per image.
    """
    image_size, _ = _pair(vision.get("image_size", 448))
    patch, _ = _pair(vision.get("patch_size", 14))
    merge = round(1 / float(data.get("downsample_ratio", 0.5)))
    vit_hidden = int(vision["hidden_size"])
    patches = (image_size // patch) ** 2
    return {
        "vit_layers": int(vision["num_hidden_layers"]),
        "vit_hidden": vit_hidden,
        "vit_mlp": int(vision["intermediate_size"]),
        "vit_mlp_matrices": 2,
        "vit_tokens_per_crop": patches + 1,
        "vit_cls_tokens": 1,
        "image_features_per_crop": patches,  # [CLS] dropped; pixel shuffle (spatial_merge_size) makes 256 of them
        "patch_size": patch,
        "image_size": image_size,
        "spatial_merge_size": merge,
        "projector_in": vit_hidden * merge * merge,
        "projector_hidden": llm["hidden_size"],
        "projector_out": llm["hidden_size"],
        "max_crops": MAX_TILES + 1,
        "image_grid_pinpoints": (),
    }


def _image_shape(arch: flops.ArchSpec, size: tuple[int, int] | None = None) -> flops.ImageShape:
    """The tiles and thumbnail of one ``size`` image (default 672 x 672: 2 x 2 tiles + thumbnail, 1,280 tokens)."""
    if arch.image_size is None or arch.vit_tokens_per_crop is None or arch.image_features_per_crop is None:
        raise ValueError(f"{arch.name or 'this config'}: the vision config lacks an image size")
    height, width = size or flops.DEFAULT_IMAGE_SIZE
    cols, rows = internvl_tiles(height, width, tile=arch.image_size)
    tiles = cols * rows + (1 if cols * rows > 1 else 0)
    merge2 = arch.spatial_merge_size**2
    per_tile = arch.image_features_per_crop // merge2
    side = math.isqrt(per_tile)
    thumb = " + thumbnail" if tiles > cols * rows else ""
    return flops.ImageShape(
        tokens=per_tile * tiles,
        vit_tokens=(arch.vit_tokens_per_crop,) * tiles,
        grids=((side, side),) * tiles,
        size=(height, width),
        description=(
            f"{per_tile * tiles} visual tokens for a {height}x{width} image ({cols}x{rows} tiles{thumb}: {tiles} ViT "
            f"passes of {arch.vit_tokens_per_crop} tokens; pixel shuffle {arch.spatial_merge_size}x"
            f"{arch.spatial_merge_size}: {arch.image_features_per_crop} ViT patches -> {per_tile} LLM tokens per tile)"
        ),
    )


def _bench_image(config: Any, batch: int, generator: torch.Generator) -> BenchImage:
    """One 672 x 672 image per row, as the processor tiles it: 2 x 2 tiles + thumbnail, 5 x 256 placeholders.

    ``pixel_values`` holds every row's tiles, ``(B * 5, 3, 448, 448)``; the ``<img>``/``</img>`` markers the
    processor adds are text tokens whose ids are not in the config, so the bench's rows carry the placeholders only.
    """
    vision = config.vision_config
    image_size, _ = _pair(vision.image_size)
    patch, _ = _pair(vision.patch_size)
    merge = round(1 / float(config.downsample_ratio))
    cols, rows = internvl_tiles(*flops.DEFAULT_IMAGE_SIZE, tile=image_size)
    tiles = cols * rows + (1 if cols * rows > 1 else 0)
    units = image_size // patch // merge
    tokens = units * units * tiles
    pixels = torch.randn(batch * tiles, 3, image_size, image_size, generator=generator)
    return BenchImage(
        inputs={"pixel_values": pixels},
        placeholders=[int(config.image_token_id)] * tokens,
        image_flags=[True] * tokens,
        tokens=tokens,
        grids=((units, units),) * tiles,
        vit_tokens=(image_size // patch) ** 2 + 1,
    )


def _vision_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """InternViT's encoder layers and the multimodal projector (the adapter projects through the whole module)."""
    inner = model.model
    return inner.vision_tower.encoder.layer, inner.multi_modal_projector


FAMILY = register_family(
    Family(
        name=InternVLAdapter.family,
        model_types=("internvl",),
        model_classes=InternVLAdapter.model_classes,
        has_cls=True,  # InternViT prepends one (the adapter does not rank by it: see the module docstring)
        arch_fields=_arch_fields,
        image_shape=_image_shape,
        bench_image=_bench_image,
        vision_parts=_vision_parts,
    )
)
