"""VScan (TMLR 2026): global and local scans with token merging in the vision encoder, then text-guided pruning at
a middle LLM layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops
from ..schedule import Schedule, Stage, check_boundaries, check_boundaries_fit
from ..tokens import LLMTokens, VisionTokens
from .base import MethodInfo, PruningMethod, register
from .holov import allocate, crop_ids

__all__ = ["VScan"]


@register
@dataclass
class VScan(PruningMethod):
    """VScan: two stages.

    1. Vision encoder (feature layer): a *global scan* keeps the ``global_share`` of the vision-stage tokens with the
       most [CLS] attention (on encoders without [CLS]: attention received from all patches); *local scans* then keep
       the best-scored remaining patches of each of ``windows`` spatial windows (an even share per window), so that
       every region is represented. Every other patch is merged into the selected token it is most similar to (keys of
       the feature layer, cosine; each output token is the mean of its group).
    2. LLM: after ``layer`` (default the middle, ``L // 2``), keep the ``llm_ratio`` share of the image tokens the last
       prompt token attends to most (FastV's signal, at a middle layer).

    Budget: ``average`` solves the vision-stage count ``n0`` from ``(n0 * K + n0 * llm_ratio * (L - K)) / L = budget``;
    ``input`` sets ``n0 = budget`` (the count entering the LLM). Decoding: the LLM stage is text-guided and pruned once
    at prefill, like FastV.

    Parameters
    ----------
    layer : int, optional
        LLM layers before the text-guided stage (default ``L // 2``, the paper's middle layer).
    llm_ratio : float
        Share of the image tokens the LLM stage keeps, in (0, 1] (0.5, our reading).
    global_share : float
        Share of the vision-stage tokens chosen by the global scan, in [0, 1] (0.5, our reading); the rest by the
        local scans.
    windows : int
        Local-scan windows per patch grid, a square number (4 = 2 x 2).
    """

    budget: int | float = 64
    budget_mode: str = "average"
    layer: int | None = None
    llm_ratio: float = 0.5
    global_share: float = 0.5
    windows: int = 4

    name = "vscan"
    info = MethodInfo(
        stages="vision+LLM",
        signal="text-guided",
        merges=True,
        paper="Zhang et al., VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models, "
        "TMLR 2026",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None:
            check_boundaries("layer", self.layer)
        for field, low, low_open in (("llm_ratio", 0, True), ("global_share", 0, False)):
            value = getattr(self, field)
            bad = isinstance(value, bool) or not isinstance(value, (int, float))
            if bad or not (low < value <= 1 if low_open else low <= value <= 1):
                raise ValueError(
                    f"{field} must be a number in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}"
                )
        windows = self.windows
        if (
            isinstance(windows, bool)
            or not isinstance(windows, int)
            or windows < 1
            or int(windows**0.5) ** 2 != windows
        ):
            raise ValueError(f"windows must be a square int >= 1 (1, 4, 9, ...), got {windows!r}")

    def _layer(self, num_layers: int) -> int:
        layer = num_layers // 2 if self.layer is None else self.layer
        check_boundaries_fit(self.name, "layer", layer, num_layers)
        return layer

    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        self.check_image_tokens(image_tokens)
        layer = self._layer(num_layers)
        budget = self.budget_tokens(image_tokens)
        if self.budget_mode == "average":
            budget = budget * num_layers / (layer + self.llm_ratio * (num_layers - layer))
        first = max(1, min(image_tokens, round(budget)))
        second = max(1, min(first, round(first * self.llm_ratio)))
        stages = [Stage(0, 0, first)]
        if second < first:
            stages.append(Stage(layer, second))
        return Schedule(tuple(stages), image_tokens, num_layers)

    def first_boundary(self, num_layers: int) -> int:
        return num_layers // 2 if self.layer is None else self.layer

    def select_vision(self, tokens: VisionTokens, stage: Stage) -> ops.Selection:
        patches = tokens.patch_mask.nonzero().flatten()  # (P,)
        scores = tokens.cls_attention() if tokens.has_cls else tokens.visual_attention()
        scores = scores[:, patches].float()  # (I, P)
        window = crop_ids(tokens.grids, patches.numel(), self.windows).to(patches.device)
        sizes = torch.bincount(window)
        total = stage.contextual
        global_count = min(total, round(total * self.global_share))
        picks = []
        for image in range(tokens.num_images):
            chosen = torch.zeros(patches.numel(), dtype=torch.bool, device=patches.device)
            chosen[ops.top_k_sorted(scores[image][None], global_count)[0]] = True
            room = sizes - torch.bincount(window[chosen], minlength=sizes.numel())
            quota = allocate(torch.ones(sizes.numel()), room, total - global_count)
            local = scores[image].masked_fill(chosen, float("-inf"))
            for w in range(sizes.numel()):
                members = ((window == w) & ~chosen).nonzero().flatten()
                chosen[members[ops.top_k_sorted(local[members][None], int(quota[w]))[0]]] = True
            picks.append(chosen.nonzero().flatten())
        anchors = torch.stack(picks)  # (I, c) positions among the patches, ascending
        keys = tokens.keys()[:, patches]  # (I, P, d)
        slots = ops.assign_to_anchors(keys, anchors)  # (I, P); anchors in their own slot
        assign = torch.full(
            (tokens.num_images, tokens.num_tokens), -1, dtype=torch.long, device=patches.device
        )
        assign[:, patches] = slots
        anchor_tokens = patches[anchors]
        assign = assign.scatter(1, anchor_tokens, -1)
        keep = torch.zeros(tokens.num_images, 0, dtype=torch.long, device=patches.device)
        return ops.Selection(keep=keep, anchors=anchor_tokens, assign=assign, merge="mean", space="vision")

    def select_llm(self, tokens: LLMTokens, stage: Stage) -> ops.Selection:
        return ops.Selection(keep=ops.top_k_sorted(tokens.text_attention(), stage.dominant))
