"""The interface every pruning method shares: a dataclass with a ``budget``, a schedule, and two selection hooks."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..ops import Selection
from ..schedule import Schedule, Stage

if TYPE_CHECKING:
    import torch

    from ..models.base import LLMTokens, ModelAdapter, VisionTokens
    from ..runtime import Run

__all__ = [
    "POSITION_POLICIES",
    "MethodInfo",
    "PruningMethod",
    "available_methods",
    "build",
    "method_class",
    "register",
]


@dataclass(frozen=True)
class MethodInfo:
    """What the ``methods`` listing says about a method.

    Attributes
    ----------
    stages : str
        Where it prunes: ``"vision"`` (before the LLM), ``"LLM"`` or ``"vision+LLM"``.
    signal : str
        ``"visual-only"``, ``"text-guided"`` or ``"none"``.
    merges : bool
        Whether pruned tokens are merged into kept ones rather than dropped.
    paper : str
        Citation.
    """

    stages: str
    signal: str
    merges: bool
    paper: str


#: The values of every method's ``positions`` field.
POSITION_POLICIES = ("auto", "compact", "preserve")

_REGISTRY: dict[str, type[PruningMethod]] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: make ``cls`` buildable by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, in registration order."""
    return list(_REGISTRY)


def method_class(name: str) -> type[PruningMethod]:
    """The class registered as ``name``; ValueError listing the names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def build(name: str, **kwargs: Any) -> PruningMethod:
    """Build a method by registry name, e.g. ``build("visiondrop", budget=64)``.

    Each call returns a new instance (the registry holds classes, never shared instances).
    """
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(
            f"{cls.name} has no field(s) {', '.join(unknown)}; its fields: {', '.join(sorted(fields))}"
        )
    return cls(**kwargs)


@dataclass
class PruningMethod:
    """Base class of every method.

    Attributes
    ----------
    budget : int or float
        An int: visual tokens per image; a float in (0, 1]: that fraction of each image's visual tokens.
    budget_mode : str
        ``"average"``: the budget is the layer-average visual token count (the convention in-LLM papers quote);
        ``"input"``: the budget is the count entering the LLM (like-for-like with pre-LLM methods).
    positions : str
        The position policy (SPEC §5), one meaning for every method: ``"compact"`` renumbers the positions after
        each stage (what most papers' code does), ``"preserve"`` keeps each surviving token's original position (a
        merged token takes its anchor's), ``"auto"`` is compact where the model's positions are 1-D RoPE and
        preserve for M-RoPE models (Qwen2-VL), where compact has no meaning. Default ``"auto"``
        (VisionDrop: ``"preserve"``).
    """

    budget: int | float = 64
    budget_mode: str = "average"
    positions: str = "auto"

    #: Registry name.
    name: ClassVar[str] = ""
    info: ClassVar[MethodInfo]
    #: Whether the method ranks by [CLS] attention and so needs a vision encoder with [CLS].
    requires_cls: ClassVar[bool] = False

    def __post_init__(self) -> None:
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"budget must be an int (tokens) or a float in (0, 1] (fraction), got {budget!r}")
        if isinstance(budget, int) and budget <= 0:
            raise ValueError(f"budget must be > 0 visual tokens per image, got {budget}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(
                f"a float budget is a fraction of each image's tokens in (0, 1], got {budget}; "
                "pass an int for a token count"
            )
        if self.budget_mode not in ("average", "input"):
            raise ValueError(f"budget_mode must be 'average' or 'input', got {self.budget_mode!r}")
        if self.positions not in POSITION_POLICIES:
            raise ValueError(
                f"positions must be one of {', '.join(map(repr, POSITION_POLICIES))}, got {self.positions!r}"
            )

    # --- budgets and schedules ------------------------------------------------------------------------------
    def budget_tokens(self, image_tokens: int) -> float:
        """The budget in tokens for an image of ``image_tokens`` tokens (a fraction is scaled)."""
        if isinstance(self.budget, float):
            return self.budget * image_tokens
        return float(self.budget)

    def check_image_tokens(self, image_tokens: int) -> None:
        """ValueError when the budget cannot apply to an image of this size."""
        if isinstance(self.budget, int) and self.budget > image_tokens:
            raise ValueError(
                f"budget={self.budget} is more than the {image_tokens} visual tokens the image has"
            )

    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        """Per-stage token counts for an image of ``image_tokens`` tokens in an LLM of ``num_layers`` layers.

        ``grids`` are the image's patch grids ``(rows, cols)`` when known (only grid-shaped methods need them).
        """
        raise NotImplementedError

    def first_boundary(self, num_layers: int) -> int | None:
        """The earliest in-LLM boundary this method may use (None: it never prunes inside the LLM)."""
        return None

    def settings(self) -> dict[str, Any]:
        """The method's fields, for reports and result files."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    # --- selection hooks ------------------------------------------------------------------------------------
    def select_vision(self, tokens: VisionTokens, stage: Stage) -> Selection:
        """Which vision-stage tokens survive: ``stage.dominant`` kept + ``stage.contextual`` merged."""
        raise NotImplementedError(f"{self.name} does not prune at the vision stage")

    def select_llm(self, tokens: LLMTokens, stage: Stage) -> Selection:
        """Which image tokens survive an in-LLM boundary."""
        raise NotImplementedError(f"{self.name} does not prune inside the LLM")

    # --- use ------------------------------------------------------------------------------------------------
    def position_policy(self, adapter: ModelAdapter) -> str:
        """The position policy for this model: ``positions`` with ``auto`` resolved."""
        if self.positions == "auto":
            return "compact" if adapter.supports_compact_positions else "preserve"
        return self.positions

    def check_model(self, adapter: ModelAdapter) -> None:
        """Errors that need the model but no input: budget vs. the family's token count, schedule vs. layers."""
        num_layers = adapter.text.num_layers
        tokens = adapter.default_image_tokens()
        if tokens is not None:
            self.check_image_tokens(tokens)
            self.schedule(tokens, num_layers, adapter.default_grids())
        if self.position_policy(adapter) == "compact" and not adapter.supports_compact_positions:
            raise ValueError(
                f"positions='compact' has no meaning for {adapter.family} (3-D M-RoPE positions); "
                "use positions='preserve' or 'auto'"
            )
        if self.requires_cls and not adapter.has_cls:
            raise ValueError(
                f"{self.name} ranks patches by [CLS] attention and {adapter.family}'s vision encoder has no [CLS]"
            )

    def apply(self, model: torch.nn.Module, *, profile: bool = False) -> AbstractContextManager[Run]:
        """Prune ``model`` inside a ``with`` block; it is exactly as before once the block exits.

        ``profile=True`` times the method's own work (scoring, merging, rebuilding sequences) into
        ``run.timings``, synchronising CUDA around it; leave it off otherwise.

        Example
        -------
        >>> with method.apply(model) as run:                   # doctest: +SKIP
        ...     out = model.generate(**inputs, max_new_tokens=32)
        >>> print(run.report)                                   # doctest: +SKIP
        """
        from ..runtime import attach

        return attach(self, model, profile=profile)


# ---------------------------------------------------------------------------------------------------------------
# Schedules shared by the baselines
# ---------------------------------------------------------------------------------------------------------------


def vision_only_schedule(tokens: float, image_tokens: int, num_layers: int, contextual: int = 0) -> Schedule:
    """A method that prunes once, before the LLM, to ``tokens`` (of which ``contextual`` are merged)."""
    count = max(1, min(image_tokens, round(tokens)))
    return Schedule((Stage(0, count - contextual, contextual),), image_tokens, num_layers)


def one_boundary_count(method: PruningMethod, image_tokens: int, num_layers: int, layer: int) -> int:
    """Tokens an in-LLM method that prunes once, after ``layer``, keeps from then on.

    ``average`` mode solves ``(N * K + n * (L - K)) / L = budget`` for ``n``; ``input`` mode keeps ``budget`` tokens
    at the pruning point (the count the pruned layers work with).
    """
    if not 1 <= layer <= num_layers - 1:
        raise ValueError(
            f"{method.name}: layer={layer} is outside 1..{num_layers - 1} for a {num_layers}-layer LLM "
            "(the boundary runs after that many layers)"
        )
    budget = method.budget_tokens(image_tokens)
    if method.budget_mode == "input":
        return max(1, min(image_tokens, round(budget)))
    kept = (budget * num_layers - image_tokens * layer) / (num_layers - layer)
    if round(kept) < 1:
        lowest = (image_tokens * layer + (num_layers - layer)) / num_layers
        raise ValueError(
            f"{method.name}: a layer-average budget of {budget:g} is out of reach when all {image_tokens} tokens run "
            f"through the first {layer} layers (lowest: {lowest:.1f}); use a smaller layer or budget_mode='input'"
        )
    return min(image_tokens, round(kept))
