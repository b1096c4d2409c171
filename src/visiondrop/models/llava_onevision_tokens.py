"""LLaVA-OneVision's token views for the methods: the AnyRes-Max grid of an image, and what a method sees of an image
(:class:`OnevisionVisionTokens`) and of a video frame's pooled windows (:class:`OnevisionVideoTokens`).

The adapter (``llava_onevision.py``) builds them; its module docstring says how images and videos reach the LLM and
which policy visiondrop applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property
from typing import Any

import torch

from .. import ops
from .base import VisionTokens
from .llava_next import _unpadded_window

__all__ = ["OnevisionVideoTokens", "OnevisionVisionTokens", "anyres_max_count", "onevision_grid"]


def anyres_max_count(aspect: Any) -> int:
    """``"anyres_max_9"`` -> 9; ValueError naming the value otherwise."""
    text = str(aspect)
    if not text.startswith("anyres_max_") or not text[len("anyres_max_") :].isdigit():
        raise ValueError(
            f"vision_aspect_ratio={aspect!r}: visiondrop supports LLaVA-OneVision's 'anyres_max_N' (e.g. 'anyres_max_9')"
        )
    return int(text[len("anyres_max_") :])


def onevision_grid(
    image_size: tuple[int, int], tiles: tuple[int, int], side: int, max_patches: int
) -> tuple[int, int, int, int, tuple[int, int]]:
    """The high-resolution grid one image gives the LLM, as ``pack_image_features`` (transformers 5.24) builds it.

    Parameters
    ----------
    image_size : (int, int)
        Original height and width in pixels.
    tiles : (int, int)
        Crops ``(nh, nw)`` of the image's AnyRes grid.
    side : int
        Patches per crop side (27 for SigLIP at 384 px / 14).
    max_patches : int
        The ``N`` of ``anyres_max_N``: base-view areas the grid may hold before it is downscaled.

    Returns
    -------
    (r0, r1, c0, c1, (rows, cols))
        The unpadded window of the stitched ``nh*side x nw*side`` patch grid, and the grid's shape as the LLM
        receives it (the window's shape, or the bilinearly downscaled one).
    """
    nh, nw = tiles
    r0, r1, c0, c1 = _unpadded_window(image_size, nh * side, nw * side)
    rows, cols = r1 - r0, c1 - c0
    ratio = math.sqrt(rows * cols / (max_patches * side**2))
    if ratio > 1.1:  # the same float arithmetic as transformers, so the counts agree with its processor
        rows, cols = int(rows // ratio), int(cols // ratio)
    return r0, r1, c0, c1, (rows, cols)


class OnevisionVisionTokens(VisionTokens):
    """One LLaVA-OneVision image at the granularity the LLM sees: base-view patches, then the high-resolution cells.

    Attributes
    ----------
    hidden : Tensor, shape (1, n, Dv)
        Pre-projector vector of every token (a downscaled cell: the bilinear mix of its patches' feature-layer
        outputs).
    image_size : (int, int)
        The image's original height and width.
    downscaled : bool
        Whether AnyRes-Max downscaled the high-resolution grid (the cells are then mixes of patches).
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        scores: torch.Tensor,
        keys: torch.Tensor,
        placeholder: torch.Tensor,
        grids: tuple[tuple[int, int], ...],
        crops_hidden: torch.Tensor,
        exact: Callable[[torch.Tensor], torch.Tensor],
        image_size: tuple[int, int],
        downscaled: bool,
    ) -> None:
        """
        Parameters
        ----------
        scores : Tensor, shape (1, n)
            Visual attention of every token (fp32).
        keys : Tensor, shape (1, n, d)
            Feature-layer keys averaged over heads.
        placeholder : LongTensor, shape (n,)
            Placeholder offset of every token in the unpruned image run (newlines skipped).
        crops_hidden : Tensor, shape (C, P, Dv)
            Feature-layer output of the image's crops (base view first).
        exact : callable
            ``crops_hidden -> (1, n, D)``: the projected features the LLM receives unpruned (without the newlines).
        """
        super().__init__(hidden, has_cls=False, grids=grids)
        self._scores = scores
        self._keys = keys
        self._placeholder = placeholder
        self.crops_hidden = crops_hidden
        self._exact = exact
        self.image_size = image_size
        self.downscaled = downscaled

    @cached_property
    def placeholder_offset(self) -> torch.Tensor:
        return self._placeholder

    def visual_attention(self) -> torch.Tensor:
        return self._scores

    def keys(self) -> torch.Tensor:
        return self._keys

    def projected(self) -> torch.Tensor:
        return self.exact_features

    @cached_property
    def exact_features(self) -> torch.Tensor:
        """(1, n, D): every token's LLM input feature as the unpruned model computes it."""
        return self._exact(self.crops_hidden)


class OnevisionVideoTokens(VisionTokens):
    """One LLaVA-OneVision video unit (a frame, or the whole video) at the granularity the LLM sees: ``g x g``
    bilinearly pooled windows per frame, frames end to end (the video's newline is not a token here).

    Attributes
    ----------
    hidden : Tensor, shape (1, n, Dv)
        Per window: the bilinear mix of its patches' feature-layer outputs (the merge space before the projector).
    newline : Tensor of shape (1, D), or None
        The ``image_newline`` feature when this unit ends its video (the model appends one per video).
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        scores: torch.Tensor,
        keys: torch.Tensor,
        grids: tuple[tuple[int, int], ...],
        exact: torch.Tensor,
        newline: torch.Tensor | None,
    ) -> None:
        """
        Parameters
        ----------
        scores : Tensor, shape (1, n)
            Per window: the bilinear mix of its patches' received visual attention (within its frame), fp32.
        keys : Tensor, shape (1, n, d)
            Per window: the bilinear mix of its patches' keys (averaged over heads).
        exact : Tensor, shape (1, n, D)
            Per window: the feature the unpruned model gives it (projected, then pooled).
        """
        super().__init__(hidden, has_cls=False, grids=grids)
        self._scores, self._keys, self._exact = scores, keys, exact
        self.newline = newline

    def visual_attention(self) -> torch.Tensor:
        return self._scores

    def keys(self) -> torch.Tensor:
        return self._keys

    def projected(self) -> torch.Tensor:
        return self._exact

    def features(
        self, selection: ops.Selection | None, project: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """(1, k, D) LLM input: unpruned, every window and the newline (when this unit ends the video); pruned,
        the kept windows' exact features, then the contextual tokens (projected merges of pooled vectors, or merges
        of projected features), and no newline, as for images."""
        if selection is None:
            if self.newline is None:
                return self._exact
            return torch.cat([self._exact, self.newline[None]], dim=1)
        if selection.space == "projected":
            return selection.apply(self._exact)
        kept = self._exact.gather(1, selection.keep[..., None].expand(-1, -1, self._exact.shape[-1]))
        if selection.anchors is None:
            return kept
        merged = ops.merge_groups(self.hidden, selection.anchors, selection.assign, selection.merge)
        return torch.cat([kept, project(merged)], dim=1)
