"""SparseVLM (Zhang et al., ICML 2025): question "raters" score image tokens at several LLM layers; pruned tokens
are partly recycled into a few merged ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..schedule import Schedule, Stage
from ..tokens import LLMTokens
from .base import MethodInfo, register
from .pyramiddrop import PyramidDrop

__all__ = ["SparseVLM", "density_peak_centres", "paper_layers"]

#: The layers after which the paper prunes LLaVA-1.5-7B (32 layers); other depths scale them.
PAPER_LAYERS = (2, 6, 15, 19)


def paper_layers(num_layers: int) -> list[int]:
    """:data:`PAPER_LAYERS` scaled to ``num_layers`` (8 layers: 1, 2, 4, 5)."""
    return sorted({max(1, min(num_layers - 1, round(layer * num_layers / 32))) for layer in PAPER_LAYERS})


@register
@dataclass
class SparseVLM(PyramidDrop):
    """SparseVLM: at each boundary, the prompt tokens after the image whose mean attention to the image is at least
    the average of those tokens are the *raters*; an image token's score is the attention the raters give it (next
    layer's q/k, mean over heads and raters). The top tokens are kept. Of the tokens pruned there, the
    ``recycle_ratio`` best-scored are *recycled*: clustered (density peaks over their keys) into a few merged tokens
    (the mean of each cluster), the rest dropped.

    Counts are fixed per stage, so that batches and reports are exact: the stage totals follow PyramidDrop's
    geometric rule solved from the budget (the paper's adaptive, rank-based per-layer count is replaced by this
    fixed schedule — see the README), and each stage's merged tokens are ``merge_ratio`` of the recycled ones.

    Decoding: pruned once, at prefill, like FastV (text-guided; ``use_cache=False`` differs by design).

    Parameters
    ----------
    boundaries : sequence of int, optional
        Layers after which the stages run; default the paper's 2, 6, 15, 19 of 32, scaled to the depth.
    ratio : float, optional
        Share kept per stage; ``None`` solves it from the budget.
    recycle_ratio : float
        Share of each stage's pruned tokens (the best-scored) that are recycled, in [0, 1] (0.3, our reading).
    merge_ratio : float
        Merged tokens per recycled token, in (0, 1] (0.1: one merged token per ten recycled, at least one).
    """

    budget: int | float = 64
    budget_mode: str = "average"
    recycle_ratio: float = 0.3
    merge_ratio: float = 0.1

    name = "sparsevlm"
    info = MethodInfo(
        stages="LLM",
        signal="text-guided",
        merges=True,
        paper="Zhang et al., SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference, "
        "ICML 2025",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for field, low_open in (("recycle_ratio", False), ("merge_ratio", True)):
            value = getattr(self, field)
            bad = isinstance(value, bool) or not isinstance(value, (int, float))
            if bad or not (0 < value <= 1 if low_open else 0 <= value <= 1):
                interval = "(0, 1]" if low_open else "[0, 1]"
                raise ValueError(f"{field} must be a number in {interval}, got {value!r}")

    def _marks(self, num_layers: int, first: int | None = None) -> list[int]:
        if first is None and self.boundaries is None:
            return paper_layers(num_layers)
        return super()._marks(num_layers, first)

    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        base = super().schedule(image_tokens, num_layers, grids)
        stages = [base.stages[0]]
        previous = image_tokens
        for stage in base.stages[1:]:
            total, merged = stage.tokens, 0
            if total < previous and total > 1 and self.recycle_ratio > 0:
                recycled = max(1, round((previous - total) * self.recycle_ratio))
                merged = min(total - 1, max(1, round(recycled * self.merge_ratio)))
            stages.append(Stage(stage.layer, total - merged, merged))
            previous = total
        return Schedule(tuple(stages), image_tokens, num_layers)

    def rater_scores(self, tokens: LLMTokens) -> torch.Tensor:
        """(I, n) the raters' mean attention to each image token."""
        attention, valid = tokens.question_attention()  # (I, Q, n), (I, Q)
        relevance = attention.mean(-1)  # (I, Q): each candidate's mean attention to the image
        average = (relevance * valid).sum(1) / valid.sum(1)
        raters = valid & (relevance >= average[:, None])
        weights = raters.float() / raters.sum(1, keepdim=True).clamp(min=1)
        return (weights[..., None] * attention).sum(1)

    def select_llm(self, tokens: LLMTokens, stage: Stage) -> ops.Selection:
        scores = self.rater_scores(tokens)
        keep = ops.top_k_sorted(scores, stage.dominant)
        if stage.contextual == 0:
            return ops.Selection(keep=keep)
        pruned = tokens.num_tokens - stage.dominant
        recycled = min(pruned, max(stage.contextual, round(pruned * self.recycle_ratio)))
        pool = ops.top_k_sorted(scores.scatter(1, keep, float("-inf")), recycled)  # (I, R)
        keys = tokens.keys()
        pool_keys = keys.gather(1, pool[..., None].expand(-1, -1, keys.shape[-1]))  # (I, R, d)
        centres = density_peak_centres(pool_keys, stage.contextual)  # (I, c) positions in the pool
        slots = ops.assign_to_anchors(pool_keys, centres)  # (I, R)
        anchors = pool.gather(1, centres)
        assign = torch.full_like(scores, -1, dtype=torch.long).scatter(1, pool, slots)
        assign = assign.scatter(1, anchors, -1)
        return ops.Selection(keep=keep, anchors=anchors, assign=assign, merge="mean")


def density_peak_centres(x: torch.Tensor, c: int, neighbours: int = 5) -> torch.Tensor:
    """Cluster centres by density peaks: high local density (k nearest neighbours) and far from denser points.

    Parameters
    ----------
    x : Tensor, shape (I, R, d)
    c : int
        Centres per image, ``1 <= c <= R``.

    Returns
    -------
    LongTensor, shape (I, c): positions among the ``R``, ascending.
    """
    x = x.float()
    r = x.shape[1]
    dist = torch.cdist(x, x) / x.shape[-1] ** 0.5  # (I, R, R)
    k = max(1, min(neighbours, r - 1))
    nearest = dist.topk(k + 1, dim=-1, largest=False).values[..., 1:] if r > 1 else dist
    density = torch.exp(-(nearest**2).mean(-1))  # (I, R)
    denser = density[:, None, :] > density[:, :, None]  # (I, R, R): j denser than i
    far = dist.masked_fill(~denser, float("inf")).amin(-1)
    far = torch.where(torch.isinf(far), dist.amax(-1), far)  # the densest point: its largest distance
    return ops.top_k_sorted(density * far, c)
