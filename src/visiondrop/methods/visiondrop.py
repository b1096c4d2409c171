"""VisionDrop (Xu, Wang, Luo, Du; AAAI 2026): visual-only scoring, progressive dominant + contextual pruning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import ops
from ..schedule import (
    Schedule,
    Stage,
    check_boundaries,
    check_boundaries_fit,
    default_boundaries,
    derive_visiondrop_schedule,
    schedule_from_stages,
    validate_stages,
)
from ..tokens import LLMTokens, VisionTokens
from .base import MethodInfo, PruningMethod, register

__all__ = ["VisionDrop"]

_SCORES = ("auto", "cls", "visual")
_MERGES = ("reference", "mean")
_POSITIONS = ("auto", "compact", "preserve")


@register
@dataclass
class VisionDrop(PruningMethod):
    """VisionDrop: rank visual tokens by visual-only attention at the vision encoder and again inside the LLM;
    keep the dominant ones and merge the rest into a few contextual tokens (SPEC §3–7).

    Parameters
    ----------
    budget : int or float
        Visual tokens per image (int) or a fraction of them (float in (0, 1]).
    budget_mode : str
        ``"average"`` (layer-average, the paper's convention) or ``"input"`` (tokens entering the LLM).
    stages : sequence, optional
        An explicit schedule: ``[(d0, c0), (layer, d, c), ...]`` — the vision stage's dominant/contextual counts,
        then one ``(layer, dominant, contextual)`` per boundary after LLM layer ``layer``; it replaces the budget.
        ``None`` derives it from the budget (:func:`~visiondrop.schedule.derive_visiondrop_schedule`); the authors' published budget-32
        schedule is :data:`~visiondrop.schedule.PUBLISHED_SCHEDULE` and also what the rule gives for 32 layers.
    boundaries : sequence of int, optional
        Layers after which derived schedules prune (default L/4, L/2, 3L/4). Empty: vision stage only.
    score : str
        Vision-stage score: ``"cls"`` ([CLS] attention to the patches; the release), ``"visual"`` (mean attention
        every patch receives from all patches; the paper's wording, the only choice without a [CLS]) or ``"auto"``
        (``cls`` when the encoder has a [CLS], else ``visual``: Qwen2-VL).
    keep_cls : bool
        Pass [CLS] on to the LLM as one of the dominant tokens (the release). Plain LLaVA drops [CLS]. Ignored for
        encoders without [CLS].
    merge : str
        Contextual token = ``"reference"``: anchor + mean(members) (the release) or ``"mean"``: mean over anchor and
        members.
    positions : str
        ``"compact"``: renumber positions after each stage (the release); ``"preserve"``: kept tokens keep their
        original positions, a merged token its anchor's (the default: on the pocket benchmark it keeps the answers
        that depend on where things are, 88% vs 75% retention at budget 192, README "Pocket benchmark");
        ``"auto"``: compact for 1-D RoPE models, preserve for M-RoPE models (Qwen2-VL), where compact has no meaning.
        :meth:`reference` uses compact, as the release does.
    debias : bool
        Beyond the paper: average each in-LLM score column over only the image queries that can see it under the
        causal mask, removing the bias toward early image tokens (SPEC §4.2).
    anchors : str
        Contextual anchors: ``"stride"`` (every ``r // c``-th remaining token, the release) or, beyond the paper,
        ``"farthest"`` (farthest-point sampling over the keys, away from the dominant tokens too: coverage).
    """

    budget: int | float = 64
    budget_mode: str = "average"
    stages: Sequence[Any] | None = None
    boundaries: Sequence[int] | None = None
    score: str = "auto"
    keep_cls: bool = True
    merge: str = "reference"
    positions: str = "preserve"
    debias: bool = False
    anchors: str = "stride"

    name = "visiondrop"
    info = MethodInfo(
        stages="vision+LLM",
        signal="visual-only",
        merges=True,
        paper="Xu et al., Rethinking Visual Token Reduction in LVLMs under Cross-Modal Misalignment, AAAI 2026",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("score", self.score, _SCORES)
        _choice("merge", self.merge, _MERGES)
        _choice("positions", self.positions, _POSITIONS)
        _choice("anchors", self.anchors, ("stride", "farthest"))
        if not isinstance(self.keep_cls, bool):
            raise TypeError(f"keep_cls must be a bool, got {self.keep_cls!r}")
        if not isinstance(self.debias, bool):
            raise TypeError(f"debias must be a bool, got {self.debias!r}")
        if self.stages is not None:
            validate_stages(self.stages)  # first: it names a malformed entry
            self.stages = tuple(tuple(s) if not isinstance(s, Stage) else s for s in self.stages)
        if self.boundaries is not None:
            self.boundaries = check_boundaries("boundaries", self.boundaries, empty=True)

    @classmethod
    def reference(cls, budget: int | float = 64, **overrides: Any) -> VisionDrop:
        """The preset that reproduces the authors' release (SPEC §6): [CLS] scoring, [CLS] kept, strided anchors,
        anchor + mean(members), next-layer full-sequence scoring, compact positions."""
        settings = dict(
            score="cls", keep_cls=True, merge="reference", positions="compact", debias=False, anchors="stride"
        )
        settings.update(overrides)
        return cls(budget=budget, **settings)

    # --- schedule -------------------------------------------------------------------------------------------
    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        if self.stages is not None:
            return schedule_from_stages(self.stages, image_tokens, num_layers)
        self.check_image_tokens(image_tokens)
        if self.boundaries is not None:
            check_boundaries_fit(self.name, "boundaries", self.boundaries, num_layers)
        return derive_visiondrop_schedule(
            self.budget_tokens(image_tokens),
            image_tokens,
            num_layers,
            mode=self.budget_mode,
            boundaries=self.boundaries,
        )

    def check_image_tokens(self, image_tokens: int) -> None:
        if self.stages is None:  # an explicit schedule replaces the budget (and is checked against the image)
            super().check_image_tokens(image_tokens)

    def first_boundary(self, num_layers: int) -> int | None:
        if self.stages is not None:
            layers = [s.layer if isinstance(s, Stage) else s[0] for s in self.stages[1:]]
        elif self.boundaries is not None:
            layers = list(self.boundaries)
        else:
            layers = default_boundaries(num_layers)
        return min(layers) if layers else None

    # --- selection ------------------------------------------------------------------------------------------
    def check_model(self, adapter) -> None:
        super().check_model(adapter)
        if self.score == "cls" and not adapter.has_cls:
            raise ValueError(
                f"score='cls' needs a vision encoder with [CLS] and {adapter.family}'s has no usable one; use 'visual' or 'auto'"
            )

    def select_vision(self, tokens: VisionTokens, stage: Stage) -> ops.Selection:
        if self.score == "cls" or (self.score == "auto" and tokens.has_cls):
            scores = tokens.cls_attention()
        else:
            scores = tokens.visual_attention()
        forced = None
        if self.keep_cls and tokens.has_cls:
            forced = torch.zeros(1, dtype=torch.long, device=scores.device)
        return ops.contextual_selection(
            scores,
            tokens.keys(),
            stage.dominant,
            stage.contextual,
            candidates=tokens.patch_mask,
            forced=forced,
            merge=self.merge,
            space="vision",
            anchors=self.anchors,
        )

    def select_llm(self, tokens: LLMTokens, stage: Stage) -> ops.Selection:
        scores = tokens.visual_attention(debias=self.debias)
        return ops.contextual_selection(
            scores, tokens.keys(), stage.dominant, stage.contextual, merge=self.merge, anchors=self.anchors
        )


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
