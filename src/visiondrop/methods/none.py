"""``none``: keeps every token. Runs through the same machinery, so it proves the machinery changes nothing."""

from __future__ import annotations

from dataclasses import dataclass

from ..schedule import Schedule, Stage
from .base import MethodInfo, PruningMethod, register

__all__ = ["NoPruning"]


@register
@dataclass
class NoPruning(PruningMethod):
    """Prune nothing: outputs are bit-identical to the unpatched model; the report shows every stage at full count.

    ``budget`` and ``budget_mode`` are accepted for a uniform interface and ignored.
    """

    name = "none"
    info = MethodInfo(stages="-", signal="none", merges=False, paper="(unpruned baseline)")

    def check_image_tokens(self, image_tokens: int) -> None:
        """Any budget is fine: nothing is pruned."""

    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        return Schedule((Stage(0, image_tokens, 0),), image_tokens, num_layers)
