"""DART (Wen et al., 2025): keep the image tokens that duplicate a few pivot tokens least."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..schedule import Stage
from ..tokens import LLMTokens
from .base import MethodInfo, OneBoundaryMethod, register

__all__ = ["DART"]


@register
@dataclass
class DART(OneBoundaryMethod):
    """DART: after ``layer``, pick ``pivots`` pivot tokens per image — those with the largest key norm (the next
    layer's post-RoPE keys) — and keep them plus the image tokens least similar (cosine of the hidden states) to any
    pivot: the least duplicated ones. No attention scores are needed, so it is cheap and text-agnostic.

    The budget maps to the kept count as for :class:`~visiondrop.methods.fastv.FastV`.

    Parameters
    ----------
    layer : int
        Layers that see every image token before pruning (the paper's default 2).
    pivots : int
        Pivot tokens per image (capped at the kept count).
    """

    budget: int | float = 64
    budget_mode: str = "average"
    layer: int = 2
    pivots: int = 8

    name = "dart"
    info = MethodInfo(
        stages="LLM",
        signal="visual-only",
        merges=False,
        paper="Wen et al., Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters "
        "More, 2025",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.pivots, bool) or not isinstance(self.pivots, int) or self.pivots < 1:
            raise ValueError(f"pivots must be an int >= 1, got {self.pivots!r}")

    def select_llm(self, tokens: LLMTokens, stage: Stage) -> ops.Selection:
        keep = stage.dominant
        pivots = min(self.pivots, keep)
        norms = tokens.key_heads().float().norm(dim=-1)  # (I, n)
        pivot_idx = ops.top_k_sorted(norms, pivots)  # (I, p)
        unit = F.normalize(tokens.hidden.float(), dim=-1)
        pivot_vec = unit.gather(1, pivot_idx[..., None].expand(-1, -1, unit.shape[-1]))
        duplication = torch.matmul(unit, pivot_vec.transpose(1, 2)).amax(dim=-1)  # (I, n) nearest pivot
        duplication = duplication.scatter(1, pivot_idx, float("-inf"))  # pivots are kept first
        keep_idx = ops.top_k_sorted(-duplication, keep)
        return ops.Selection(keep=keep_idx)
