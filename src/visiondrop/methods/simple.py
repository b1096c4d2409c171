"""Two baselines that surveys find strong: a seeded random subset and 2-D average pooling, both before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..schedule import Schedule, Stage
from ..tokens import VisionTokens
from .base import MethodInfo, PruningMethod, VisionOnlyMethod, register

__all__ = ["Pooling", "RandomPruning"]


@register
@dataclass
class RandomPruning(VisionOnlyMethod):
    """Keep a uniformly random subset of each image's patches (in raster order); the rest is dropped.

    Draws come from a generator seeded with ``seed`` at every call, so the same inputs give the same picks.
    """

    budget: int | float = 64
    budget_mode: str = "average"
    seed: int = 0

    name = "random"
    info = MethodInfo(stages="vision", signal="none", merges=False, paper="(baseline) seeded uniform subset")

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
    12 x 16 at 192 for a 24 x 24 grid. An image with several grids (LLaVA-NeXT: base view and high-resolution view)
    shares the budget between them in proportion to their patches and pools each. The schedule and report give the
    count actually kept.
    """

    budget: int | float = 64
    budget_mode: str = "average"

    name = "pooling"
    info = MethodInfo(stages="vision", signal="none", merges=True, paper="(baseline) 2-D average pooling")

    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        self.check_image_tokens(image_tokens)
        # A fraction scales the patches that are pooled, as select_vision does: LLaVA-NeXT's newline placeholders
        # are dropped, not pooled (counting them made the schedule promise more cells than the grids give).
        patches = sum(h * w for h, w in grids) if grids else image_tokens
        cells = sum(h * w for h, w in self.pooled_grids(patches, grids))
        return Schedule((Stage(0, 0, cells),), image_tokens, num_layers)

    def pooled_grids(
        self, image_tokens: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> list[tuple[int, int]]:
        """The pooled ``(rows, cols)`` of each of the image's grids (default: one square grid)."""
        if not grids:
            side = round(image_tokens**0.5)
            if side * side != image_tokens:
                raise ValueError(f"pooling needs the patch grid of an image with {image_tokens} tokens")
            grids = ((side, side),)
        budget = max(1, round(self.budget_tokens(image_tokens)))
        patches = sum(h * w for h, w in grids)
        return [ops.pooled_grid_shape(h, w, max(1, budget * h * w // patches)) for h, w in grids]

    def pooled_grid(self, image_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
        """The pooled ``(rows, cols)`` of a single-grid image."""
        return self.pooled_grids(image_tokens, None if grid is None else (grid,))[0]

    def select_vision(self, tokens: VisionTokens, stage: Stage) -> ops.Selection:
        patch_index = tokens.patch_index
        token_of_patch = torch.full(
            (int(patch_index.max()) + 1,), -1, dtype=torch.long, device=patch_index.device
        )
        token_of_patch[patch_index[patch_index >= 0]] = torch.nonzero(patch_index >= 0).flatten()
        anchors, assign = (
            [],
            torch.full(
                (tokens.num_images, tokens.num_tokens), -1, dtype=torch.long, device=patch_index.device
            ),
        )
        first_patch, slots = 0, 0
        num_patches = sum(h * w for h, w in tokens.grids)
        for (rows, cols), (out_h, out_w) in zip(
            tokens.grids, self.pooled_grids(num_patches, tokens.grids), strict=True
        ):
            cell = ops.grid_pool_selection(
                rows, cols, out_h, out_w, tokens.num_images, device=patch_index.device
            )
            owners = token_of_patch[first_patch : first_patch + rows * cols]
            anchors.append(owners[cell.anchors])
            assign[:, owners] = cell.assign + slots
            first_patch += rows * cols
            slots += out_h * out_w
        keep = torch.zeros(tokens.num_images, 0, dtype=torch.long, device=patch_index.device)
        return ops.Selection(
            keep=keep, anchors=torch.cat(anchors, dim=1), assign=assign, merge="mean", space="projected"
        )
