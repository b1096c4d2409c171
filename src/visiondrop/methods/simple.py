"""Two baselines that surveys find strong: a seeded random subset and 2-D average pooling, both before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..models.base import VisionTokens
from ..schedule import Schedule, Stage
from .base import MethodInfo, PruningMethod, register, vision_only_schedule

__all__ = ["Pooling", "RandomPruning"]


@register
@dataclass
class RandomPruning(PruningMethod):
    """Keep a uniformly random subset of each image's patches (in raster order); the rest is dropped.

    Draws come from a generator seeded with ``seed`` at every call, so the same inputs give the same picks.
    """

    budget: int | float = 64
    budget_mode: str = "average"
    seed: int = 0

    name = "random"
    info = MethodInfo(stages="vision", signal="none", merges=False, paper="(baseline) seeded uniform subset")

    def schedule(self, image_tokens: int, num_layers: int, grid: tuple[int, int] | None = None) -> Schedule:
        self.check_image_tokens(image_tokens)
        return vision_only_schedule(self.budget_tokens(image_tokens), image_tokens, num_layers)

    def select_vision(self, tokens: VisionTokens, stage: Stage) -> ops.Selection:
        patches = tokens.patch_mask.nonzero().flatten().cpu()
        generator = torch.Generator().manual_seed(self.seed)
        picks = [
            patches[torch.randperm(patches.numel(), generator=generator)[: stage.dominant]].sort().values
            for _ in range(tokens.num_images)
        ]
        return ops.Selection(keep=torch.stack(picks).to(tokens.hidden.device))


@register
@dataclass
class Pooling(PruningMethod):
    """2-D average pooling of the patch grid before the LLM (of the projected features).

    The pooled grid is the one with the most cells ``h * w <= budget`` whose aspect ratio stays within 1.5x of the
    image grid's (:func:`~visiondrop.ops.pooled_grid_shape`): 8 x 8 = 64 at budget 64, 11 x 11 = 121 at 128,
    12 x 16 at 192 for a 24 x 24 grid. The schedule and report give the count actually kept.
    """

    budget: int | float = 64
    budget_mode: str = "average"

    name = "pooling"
    info = MethodInfo(stages="vision", signal="none", merges=True, paper="(baseline) 2-D average pooling")

    def schedule(self, image_tokens: int, num_layers: int, grid: tuple[int, int] | None = None) -> Schedule:
        self.check_image_tokens(image_tokens)
        out_h, out_w = self.pooled_grid(image_tokens, grid)
        return Schedule((Stage(0, 0, out_h * out_w),), image_tokens, num_layers)

    def pooled_grid(self, image_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        """The pooled ``(rows, cols)`` for an image of ``image_tokens`` patches on ``grid`` (default: square)."""
        if grid is None:
            side = round(image_tokens**0.5)
            if side * side != image_tokens:
                raise ValueError(f"pooling needs the patch grid of an image with {image_tokens} tokens")
            grid = (side, side)
        budget = max(1, round(self.budget_tokens(image_tokens)))
        return ops.pooled_grid_shape(grid[0], grid[1], budget)

    def select_vision(self, tokens: VisionTokens, stage: Stage) -> ops.Selection:
        rows, cols = tokens.grid
        out_h, out_w = self.pooled_grid(rows * cols, tokens.grid)
        selection = ops.grid_pool_selection(
            rows, cols, out_h, out_w, tokens.num_images, device=tokens.hidden.device
        )
        offset = 1 if tokens.has_cls else 0
        if offset:  # shift patch indices past [CLS], which is dropped
            assign = torch.full(
                (tokens.num_images, tokens.num_tokens), -1, dtype=torch.long, device=selection.assign.device
            )
            assign[:, offset:] = selection.assign
            selection = ops.Selection(
                keep=selection.keep,
                anchors=selection.anchors + offset,
                assign=assign,
                merge="mean",
                space="projected",
            )
        return selection
