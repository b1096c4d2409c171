"""DivPrune (Alvar et al., CVPR 2025): the most diverse subset of the projected visual tokens, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..schedule import Stage
from ..tokens import VisionTokens
from .base import MethodInfo, VisionOnlyMethod, register

__all__ = ["DivPrune"]


@register
@dataclass
class DivPrune(VisionOnlyMethod):
    """DivPrune: treat pruning as a Max-Min Diversity Problem over the projected visual embeddings (cosine distance)
    and solve it greedily (:func:`~visiondrop.ops.max_min_diversity`); the rest is dropped. Text-agnostic, no
    attention needed; the budget is the count entering the LLM in either budget mode.
    """

    budget: int | float = 64
    budget_mode: str = "average"

    name = "divprune"
    info = MethodInfo(
        stages="vision",
        signal="visual-only",
        merges=False,
        paper="Alvar et al., DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models, CVPR 2025",
    )

    def select_vision(self, tokens: VisionTokens, stage: Stage) -> ops.Selection:
        patches = tokens.patch_mask.nonzero().flatten()
        projected = tokens.projected()[:, patches]
        chosen = ops.max_min_diversity(projected, stage.dominant)
        return ops.Selection(keep=patches[chosen], space="projected")
