"""VisionZip (Yang et al., CVPR 2025): [CLS]-ranked dominant patches plus merged contextual tokens, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..schedule import Schedule, Stage
from ..tokens import VisionTokens
from .base import MethodInfo, PruningMethod, refuse_without_cls, register, vision_only_schedule

__all__ = ["VisionZip"]

#: The published LLaVA-1.5 splits 54+10, 108+20, 162+30 all keep this share dominant.
DOMINANT_SHARE = 54 / 64


@register
@dataclass
class VisionZip(PruningMethod):
    """VisionZip: VisionDrop's vision stage alone — the ``dominant`` patches with the most [CLS] attention at the
    feature layer, the rest merged into ``contextual`` tokens (strided anchors, key similarity, anchor + mean).

    [CLS] itself is not passed on (plain LLaVA drops it), so ``dominant + contextual`` tokens enter the LLM and the
    budget is that sum in either budget mode. With ``dominant``/``contextual`` unset the split follows the published
    ones (54+10 at 64, 108+20 at 128, 162+30 at 192): ``dominant = round(budget * 54/64)``.

    Needs a vision encoder with [CLS] (CLIP); see the README's supported-models table.

    Parameters
    ----------
    dominant, contextual : int, optional
        An explicit split; it must add up to an int budget.
    """

    budget: int | float = 64
    budget_mode: str = "average"
    dominant: int | None = None
    contextual: int | None = None

    name = "visionzip"
    requires_cls = True
    info = MethodInfo(
        stages="vision",
        signal="visual-only",
        merges=True,
        paper="Yang et al., VisionZip: Longer is Better but Not Necessary in Vision Language Models, CVPR 2025",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [v for v in (self.dominant, self.contextual) if v is not None]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in given):
            raise ValueError(
                f"dominant/contextual must be ints >= 0, got {self.dominant!r}/{self.contextual!r}"
            )
        if given and (self.dominant is None or self.contextual is None):
            raise ValueError(f"give both dominant and contextual, got {self.dominant!r}/{self.contextual!r}")
        if self.dominant is not None:
            if isinstance(self.budget, float) or self.dominant + self.contextual != self.budget:
                raise ValueError(
                    f"dominant={self.dominant} + contextual={self.contextual} must add up to budget={self.budget}"
                )
            if self.dominant < 1:
                raise ValueError(f"dominant must be >= 1, got {self.dominant}")

    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        self.check_image_tokens(image_tokens)
        tokens = max(1, min(image_tokens, round(self.budget_tokens(image_tokens))))
        if self.dominant is not None:
            contextual = self.contextual
        else:
            contextual = min(tokens - max(1, round(tokens * DOMINANT_SHARE)), tokens - 1)
        return vision_only_schedule(tokens, image_tokens, num_layers, contextual=contextual)

    def select_vision(self, tokens: VisionTokens, stage: Stage) -> ops.Selection:
        if not tokens.has_cls:
            refuse_without_cls(self.name)
        return ops.contextual_selection(
            tokens.cls_attention(),
            tokens.keys(),
            stage.dominant,
            stage.contextual,
            candidates=tokens.patch_mask,
            merge="reference",
            space="vision",
        )
