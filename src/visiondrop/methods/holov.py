"""HoloV (Zou et al., NeurIPS 2025): holistic, crop-wise budget allocation before the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..schedule import Stage
from ..tokens import VisionTokens
from .base import MethodInfo, VisionOnlyMethod, register

__all__ = ["HoloV", "allocate", "crop_ids"]


@register
@dataclass
class HoloV(VisionOnlyMethod):
    """HoloV: split each patch grid into ``crops`` spatial crops, score every patch by its attention (its [CLS]
    attention; the attention it receives from all patches on encoders without [CLS]) plus ``diversity_weight`` times
    its dissimilarity to the rest of its crop, then share the budget between the crops in proportion to
    ``softmax(z(crop score) / temperature)`` — every crop gets its share, so the kept tokens cover the whole image
    instead of clustering on the highlighted region — and keep the top-scored patches of each crop.

    Nothing is merged; the budget is the count entering the LLM in either budget mode.

    Parameters
    ----------
    crops : int
        Crops per patch grid, a square number (4: a 2 x 2 split of the grid).
    temperature : float
        Sharpness of the budget allocation over crops (> 0; large: an even share, small: most to the best crop).
    diversity_weight : float
        Weight of a patch's intra-crop dissimilarity against its (max-normalised) attention, >= 0.
    """

    budget: int | float = 64
    budget_mode: str = "average"
    crops: int = 4
    temperature: float = 1.0
    diversity_weight: float = 1.0

    name = "holov"
    info = MethodInfo(
        stages="vision",
        signal="visual-only",
        merges=False,
        paper='Zou et al., Don\'t Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context '
        "Retention (HoloV), NeurIPS 2025",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        crops = self.crops
        if (
            isinstance(crops, bool)
            or not isinstance(crops, int)
            or crops < 1
            or math.isqrt(crops) ** 2 != crops
        ):
            raise ValueError(f"crops must be a square int >= 1 (1, 4, 9, ...), got {crops!r}")
        for field in ("temperature", "diversity_weight"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{field} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.diversity_weight < 0:
            raise ValueError(f"diversity_weight must be >= 0, got {self.diversity_weight!r}")

    def select_vision(self, tokens: VisionTokens, stage: Stage) -> ops.Selection:
        patches = tokens.patch_mask.nonzero().flatten()  # (P,)
        attention = tokens.cls_attention() if tokens.has_cls else tokens.visual_attention()
        attention = attention[:, patches].float()  # (I, P)
        unit = F.normalize(tokens.hidden[:, patches].float(), dim=-1)  # (I, P, Dv)
        crop = crop_ids(tokens.grids, patches.numel(), self.crops).to(patches.device)  # (P,)
        num_crops = int(crop.max()) + 1
        same = crop[:, None] == crop[None, :]  # (P, P)
        sizes = torch.bincount(crop, minlength=num_crops)
        picks = []
        for image in range(tokens.num_images):
            sim = unit[image] @ unit[image].T
            others = (sizes[crop] - 1).clamp(min=1)
            diversity = 1 - ((sim * same).sum(1) - sim.diagonal()) / others  # (P,) 1 - mean sim to its crop
            score = _unit_max(attention[image]) + self.diversity_weight * _unit_max(diversity)
            crop_score = torch.zeros(num_crops, device=score.device).index_add_(0, crop, score) / sizes
            z = (
                (crop_score - crop_score.mean()) / crop_score.std().clamp(min=1e-6)
                if num_crops > 1
                else crop_score
            )
            quota = allocate(torch.softmax(z / self.temperature, 0), sizes, stage.dominant)
            chosen = []
            for c in range(num_crops):
                members = (crop == c).nonzero().flatten()
                chosen.append(members[ops.top_k_sorted(score[members][None], int(quota[c]))[0]])
            picks.append(torch.cat(chosen).sort().values)
        return ops.Selection(keep=patches[torch.stack(picks)])


def _unit_max(x: torch.Tensor) -> torch.Tensor:
    return x / x.abs().max().clamp(min=1e-12)


def crop_ids(grids: tuple[tuple[int, int], ...], num_patches: int, crops: int) -> torch.Tensor:
    """The crop of every patch: each grid cut into ``sqrt(crops) x sqrt(crops)`` blocks, numbered across grids.

    Patches of unknown layout (no grids, or grids that do not cover ``num_patches``) are cut into ``crops``
    contiguous runs instead.

    Returns
    -------
    LongTensor, shape (num_patches,)
    """
    side = math.isqrt(crops)
    if not grids or sum(h * w for h, w in grids) != num_patches:
        return torch.arange(num_patches) * crops // max(num_patches, 1)
    out, first = [], 0
    for h, w in grids:
        rows = torch.arange(h)[:, None] * min(side, h) // h
        cols = torch.arange(w)[None, :] * min(side, w) // w
        ids = rows * min(side, w) + cols
        out.append(ids.flatten() + first)
        first = int(out[-1].max()) + 1
    return torch.cat(out)


def allocate(weights: torch.Tensor, capacity: torch.Tensor, total: int) -> torch.Tensor:
    """Integer shares of ``total`` proportional to ``weights``, none above its ``capacity`` (largest remainders;
    what a full crop cannot take goes to the others in proportion).

    Parameters
    ----------
    weights : Tensor, shape (C,)
        Non-negative.
    capacity : LongTensor, shape (C,)
    total : int
        At most ``capacity.sum()``.

    Returns
    -------
    LongTensor, shape (C,) summing to ``total``.
    """
    capacity = capacity.long()
    if total > int(capacity.sum()):
        raise ValueError(f"cannot place {total} tokens in crops of {capacity.tolist()} tokens")
    quota = torch.zeros_like(capacity)
    weights = weights.double().clamp(min=0)
    while int(quota.sum()) < total:
        open_ = quota < capacity
        left = total - int(quota.sum())
        w = torch.where(open_, weights, torch.zeros_like(weights))
        if float(w.sum()) <= 0:
            w = open_.double()
        share = w / w.sum() * left
        add = torch.minimum(share.floor().long(), capacity - quota)
        if int(add.sum()) == 0:
            # Every share is below one token, so fewer tokens are left than open crops: one each to the
            # largest remainders (ties to the lower index).
            remainder = torch.where(open_, share - share.floor(), torch.full_like(share, -1.0))
            add = torch.zeros_like(quota)
            add[ops.top_k_sorted(remainder[None].float(), left)[0]] = 1
        quota += add
    return quota
