"""The interface every pruning method shares: a dataclass with a ``budget``, a schedule, and two selection hooks."""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import sys
import types
import typing
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..ops import Selection
from ..schedule import Schedule, Stage, check_boundaries, check_boundaries_fit

if TYPE_CHECKING:
    import torch

    from ..models.base import ModelAdapter
    from ..runtime import Run
    from ..tokens import ImageInfo, LLMTokens, VisionTokens

__all__ = [
    "POOLS",
    "POSITION_POLICIES",
    "MethodInfo",
    "OneBoundaryMethod",
    "PruningMethod",
    "VisionOnlyMethod",
    "available_methods",
    "build",
    "method_class",
    "refuse_without_cls",
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

#: The values of every method's ``pool`` field: how a video's frames compete for the budget.
POOLS = ("frame", "video")

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


# ---------------------------------------------------------------------------------------------------------------
# Field validation, at construction and on every assignment (issue 15). Each field is checked against its declared
# type (bool is not an int; a sequence is a list or tuple, stored as a tuple), then the class's own __post_init__
# checks run again (ranges, choices). A failed assignment leaves the method exactly as it was. A subclass gets all
# of this by inheriting; it only declares its fields' types and checks their values in __post_init__.
# ---------------------------------------------------------------------------------------------------------------

_POSITION_POLICIES = ("auto", "compact", "preserve")


def _field_type(cls: type, name: str) -> Any:
    """The evaluated annotation of field ``name`` (None when it cannot be evaluated: not checked by type)."""
    for klass in cls.__mro__:
        text = inspect.get_annotations(klass).get(name)
        if text is not None:
            if not isinstance(text, str):
                return text
            module = sys.modules.get(klass.__module__)
            try:
                return eval(text, {**vars(typing), **vars(module)} if module else dict(vars(typing)))
            except Exception:  # a name only imported for type checkers: leave the field to __post_init__
                return None
    return None


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint`` (int, float, str, bool, None, unions, Sequence[X], tuple[X, ...], Any)."""
    if hint is None or hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (collections.abc.Sequence, tuple, list) or hint in (collections.abc.Sequence, tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return all(_type_ok(v, args[0]) for v in value) if args else True
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return text or str(hint).replace("typing.", "").replace("collections.abc.", "")


class _CheckedFields(type):
    """Metaclass of :class:`PruningMethod`: after ``__init__`` (and ``__post_init__``) the instance checks every
    later assignment to a field."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            method = super().__call__(*args, **kwargs)
        except (TypeError, ValueError) as err:
            raise _named(cls, err) from None
        _freeze(method)
        return method


def _named(cls: type, err: Exception) -> Exception:
    """The error with the class named in front and on one line."""
    text = " ".join(str(err).split())
    prefix = f"{cls.__name__}"
    return type(err)(text if text.startswith(prefix) else f"{prefix}: {text}")


def _check_field_types(method: PruningMethod) -> None:
    """TypeError naming class, field and value for a field whose value does not fit its declared type."""
    cls = type(method)
    for f in dataclasses.fields(cls):
        value = getattr(method, f.name)
        hint = _field_type(cls, f.name)
        if not _type_ok(value, hint):
            raise TypeError(f"{cls.__name__}.{f.name} must be {_type_name(hint)}, got {value!r}")


def _freeze(method: PruningMethod) -> None:
    """Store list fields as tuples (hashable, not shared with the caller), then check every later assignment."""
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if isinstance(value, list):
            object.__setattr__(method, f.name, tuple(value))
    object.__setattr__(method, "_fields_checked", True)


@dataclass
class PruningMethod(metaclass=_CheckedFields):
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
    pool : str
        How a video's visual tokens compete (images are unaffected). A video is split per frame (Qwen-VL: per
        temporal patch of two frames); an int budget is tokens per frame, a float a fraction of the video's tokens.
        ``"frame"`` (default): every frame is pruned on its own, to its own schedule (the report counts each frame);
        ``"video"``: the whole video is one pool of ``budget x frames`` tokens (or the fraction of all its tokens),
        so busy frames may keep more than quiet ones (the report counts the video).
    """

    budget: int | float = 64
    budget_mode: str = "average"
    positions: str = "auto"
    pool: str = "frame"

    #: Registry name.
    name: ClassVar[str] = ""
    info: ClassVar[MethodInfo]
    #: Whether the method ranks by [CLS] attention and so needs a vision encoder with [CLS].
    requires_cls: ClassVar[bool] = False

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get("_fields_checked") or name not in {f.name for f in dataclasses.fields(self)}:
            object.__setattr__(self, name, value)
            return
        before = dict(self.__dict__)
        object.__setattr__(self, name, value)
        object.__setattr__(
            self, "_fields_checked", False
        )  # __post_init__'s own normalising assignments go through
        try:
            self.__post_init__()
        except (TypeError, ValueError) as err:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise _named(type(self), err) from None
        _freeze(self)

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.positions not in _POSITION_POLICIES:
            raise ValueError(
                f"positions must be one of {', '.join(map(repr, _POSITION_POLICIES))}, got {self.positions!r}"
            )
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
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(map(repr, POOLS))}, got {self.pool!r}")
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

    def for_unit(self, info: ImageInfo) -> PruningMethod:
        """The method that schedules one pruning unit: itself for an image or one frame of a video; for a whole
        video (``pool="video"``) a copy whose int budget is ``budget x frames`` (a fraction stays as it is).

        Raises
        ------
        ValueError
            When an int budget is more than a frame's tokens (one line naming the video).
        """
        frames = len(info.frames)
        if info.video is None or frames <= 1:
            self.check_image_tokens(info.tokens)
            return self
        per_frame = info.tokens // frames
        try:  # an int budget is tokens per frame: it must fit one frame
            self.check_image_tokens(per_frame)
        except ValueError:
            raise ValueError(
                f"budget={self.budget} is more than the {per_frame} visual tokens per frame of video {info.video}"
            ) from None
        if isinstance(self.budget, float):
            return self
        return dataclasses.replace(self, budget=self.budget * frames)

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
            refuse_without_cls(self.name, adapter.family)

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
    check_boundaries_fit(method.name, "layer", layer, num_layers)
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


def refuse_without_cls(method: str, family: str | None = None) -> None:
    """The one refusal of a [CLS]-ranked method on a vision encoder without [CLS] (ValueError)."""
    encoder = f"{family}'s vision encoder" if family else "this vision encoder"
    raise ValueError(f"{method} ranks patches by [CLS] attention and {encoder} has no usable [CLS]")


class OneBoundaryMethod(PruningMethod):
    """Base of in-LLM methods that prune once, after their ``layer`` field (FastV, DART).

    Every layer before ``layer`` sees all image tokens; from ``layer`` on, :func:`one_boundary_count` tokens remain.
    Subclasses declare the ``layer`` field (with their own default) and implement :meth:`select_llm`.
    """

    layer: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_boundaries("layer", self.layer)

    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        self.check_image_tokens(image_tokens)
        kept = one_boundary_count(self, image_tokens, num_layers, self.layer)
        return Schedule((Stage(0, image_tokens), Stage(self.layer, kept)), image_tokens, num_layers)

    def first_boundary(self, num_layers: int) -> int:
        return self.layer


class VisionOnlyMethod(PruningMethod):
    """Base of methods that drop tokens once, before the LLM, to the budget (DivPrune, random, VisPruner, HoloV).

    The budget is the count entering the LLM in either budget mode; subclasses implement :meth:`select_vision`.
    """

    def schedule(
        self, image_tokens: int, num_layers: int, grids: tuple[tuple[int, int], ...] | None = None
    ) -> Schedule:
        self.check_image_tokens(image_tokens)
        return vision_only_schedule(self.budget_tokens(image_tokens), image_tokens, num_layers)
