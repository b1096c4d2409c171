"""VisPruner (Zhang et al., ICCV 2025): important tokens by [CLS] attention plus diverse tokens, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..schedule import Stage
from ..tokens import VisionTokens
from .base import MethodInfo, VisionOnlyMethod, register

__all__ = ["VisPruner", "remove_duplicates"]


@register
@dataclass
class VisPruner(VisionOnlyMethod):
    """VisPruner: keep the ``important_ratio`` share of the budget with the most [CLS] attention at the feature
    layer, then fill the rest with *diverse* tokens: among the remaining patches, near-duplicates are removed
    iteratively (:func:`remove_duplicates`, cosine similarity of the feature-layer states) until the budget is met.
    Nothing is merged; the budget is the count entering the LLM in either budget mode.

    Needs a vision encoder with [CLS] (refused on Qwen2-VL / 2.5-VL, like VisionZip).

    Parameters
    ----------
    important_ratio : float
        Share of the budget taken by important ([CLS]-ranked) tokens, in [0, 1] (the paper's default 0.5); the
        rest are diverse tokens.
    """

    budget: int | float = 64
    budget_mode: str = "average"
    important_ratio: float = 0.5

    name = "vispruner"
    requires_cls = True
    info = MethodInfo(
        stages="vision",
        signal="visual-only",
        merges=False,
        paper="Zhang et al., Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in "
        "VLMs (VisPruner), ICCV 2025",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        ratio = self.important_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(f"important_ratio must be a number in [0, 1], got {ratio!r}")

    def select_vision(self, tokens: VisionTokens, stage: Stage) -> ops.Selection:
        if not tokens.has_cls:
            raise ValueError(
                "vispruner ranks patches by [CLS] attention; this vision encoder has no [CLS] token"
            )
        patches = tokens.patch_mask.nonzero().flatten()  # (P,)
        scores = tokens.cls_attention()[:, patches]  # (I, P)
        features = tokens.hidden[:, patches]  # (I, P, Dv)
        total = stage.dominant
        important = min(total, round(total * self.important_ratio))
        picks = []
        for image in range(tokens.num_images):
            order = scores[image].argsort(descending=True, stable=True)
            chosen = order[:important]
            rest = order[important:].sort().values  # raster order: the duplicate scan pairs neighbours
            diverse = rest[remove_duplicates(features[image, rest], total - important)]
            picks.append(torch.cat([chosen, diverse]).sort().values)
        return ops.Selection(keep=patches[torch.stack(picks)])


def remove_duplicates(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted) of ``k`` of the ``m`` tokens left after removing near-duplicates iteratively.

    Each round splits the remaining tokens alternately into two sets A and B, finds for every token of A its most
    similar token of B (cosine), and removes the A tokens with the highest such similarity — at most all of A, and
    no more than needed to reach ``k``. Rounds repeat until ``k`` remain.

    Parameters
    ----------
    features : Tensor, shape (m, D)
    k : int
        Tokens to keep, ``0 <= k <= m``.

    Returns
    -------
    LongTensor, shape (k,)
    """
    m = features.shape[0]
    if not 0 <= k <= m:
        raise ValueError(f"cannot keep {k} of {m} tokens")
    alive = torch.arange(m, device=features.device)
    unit = F.normalize(features.float(), dim=-1)
    while alive.numel() > k:
        if alive.numel() == 1:  # k == 0
            return alive[:0]
        a, b = alive[0::2], alive[1::2]
        nearest = (unit[a] @ unit[b].T).amax(dim=1)  # (|A|,)
        drop = min(alive.numel() - k, a.numel())
        removed = a[ops.top_k_sorted(nearest[None], drop)[0]]
        alive = alive[~torch.isin(alive, removed)]
    return alive
