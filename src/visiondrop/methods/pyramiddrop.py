"""PyramidDrop (Xing et al., CVPR 2025): several in-LLM stages, each keeping a ratio of the image tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .. import ops
from ..schedule import Schedule, Stage, check_boundaries, check_boundaries_fit, default_boundaries
from ..tokens import LLMTokens
from .base import MethodInfo, PruningMethod, register

__all__ = ["PyramidDrop"]


@register
@dataclass
class PyramidDrop(PruningMethod):
    """PyramidDrop: at each boundary keep the share ``ratio`` of the image tokens, ranked by the attention of the
    last instruction token (computed with the next layer's q/k, like every in-LLM score here).

    Stage ``k`` keeps ``round(N * ratio**k)`` tokens. With ``ratio=None`` the ratio is solved from the budget (the
    layer-average, or in ``input`` mode the count after the first boundary). All image tokens run through the
    layers before the first boundary, so a small average budget cannot be met with boundaries at L/4, L/2, 3L/4:
    then (and only when ``boundaries`` is not given) the first boundary moves earlier, one layer at a time, with the
    others spread evenly after it, until the budget is reachable. The report prints the schedule actually used.

    Decoding: pruned once at prefill (see :class:`~visiondrop.methods.fastv.FastV`).

    Parameters
    ----------
    boundaries : sequence of int, optional
        Layers after which the stages run (the paper's default for 32 layers: 8, 16, 24).
    ratio : float, optional
        lambda, the share kept at each stage (the paper's default 0.5); ``None`` solves it from the budget.
    """

    budget: int | float = 64
    budget_mode: str = "average"
    boundaries: Sequence[int] | None = None
    ratio: float | None = None

    name = "pyramiddrop"
    info = MethodInfo(
        stages="LLM",
        signal="text-guided",
        merges=False,
        paper="Xing et al., PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual "
        "Redundancy Reduction, CVPR 2025",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio is not None and (isinstance(self.ratio, bool) or not 0 < float(self.ratio) < 1):
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        if self.boundaries is not None:
            self.boundaries = check_boundaries("boundaries", self.boundaries)

    def _marks(self, num_layers: int, first: int | None = None) -> list[int]:
        if first is None:
            return list(self.boundaries) if self.boundaries is not None else default_boundaries(num_layers)
        step = (num_layers - first) / 3
        marks = sorted({first, *(first + round(step * k) for k in (1, 2))})
        return [m for m in marks if 1 <= m <= num_layers - 1]

    def _solve(self, image_tokens: int, num_layers: int, marks: list[int]) -> float | None:
        """The ratio whose schedule meets the budget with these boundaries, or None if none does."""
        budget = self.budget_tokens(image_tokens)
        if self.budget_mode == "input":
            return min(1.0, budget / image_tokens)
        widths = [b - a for a, b in zip([0, *marks], [*marks, num_layers], strict=True)]

        def average(r: float) -> float:
            return sum(w * image_tokens * r**k for k, w in enumerate(widths)) / num_layers

        if average(0.0) > budget:
            return None
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if average(mid) < budget else (lo, mid)
        if round(image_tokens * hi) < 1:  # the budget needs (almost) no tokens after the first boundary
            return None
        return hi

    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        self.check_image_tokens(image_tokens)
        marks = self._marks(num_layers)
        check_boundaries_fit(self.name, "boundaries", marks, num_layers)
        ratio = self.ratio if self.ratio is not None else self._solve(image_tokens, num_layers, marks)
        if ratio is None and self.boundaries is None:
            for first in range(marks[0] - 1, 0, -1):
                marks = self._marks(num_layers, first)
                ratio = self._solve(image_tokens, num_layers, marks)
                if ratio is not None:
                    break
        if ratio is None:
            raise ValueError(
                f"{self.name}: a layer-average budget of {self.budget_tokens(image_tokens):g} is out of reach with "
                f"boundaries {marks}; give earlier boundaries or use budget_mode='input'"
            )
        stages = [Stage(0, image_tokens)]
        previous = image_tokens
        for k, layer in enumerate(marks, start=1):
            count = max(1, min(previous, round(image_tokens * ratio**k)))
            stages.append(Stage(layer, count))
            previous = count
        return Schedule(tuple(stages), image_tokens, num_layers)

    def first_boundary(self, num_layers: int) -> int:
        return 1 if self.boundaries is None else self.boundaries[0]

    def select_llm(self, tokens: LLMTokens, stage: Stage) -> ops.Selection:
        return ops.Selection(keep=ops.top_k_sorted(tokens.text_attention(), stage.dominant))
