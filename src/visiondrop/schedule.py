"""Budgets -> per-stage token counts, and the three budget conventions (SPEC §2, §7).

A :class:`Schedule` says, for one image of ``image_tokens`` visual tokens in an LLM of ``num_layers`` layers, how
many tokens survive each stage:

- stage 0 (``layer == 0``) is the vision stage, before the LLM: ``dominant + contextual`` tokens enter the LLM;
- every later stage is a boundary after LLM layer ``layer`` (1-based count): it runs before layer index ``layer``.

A stage whose token count equals what it receives does nothing (it keeps every token, in order).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PUBLISHED_SCHEDULE",
    "Schedule",
    "Stage",
    "check_boundaries",
    "check_boundaries_fit",
    "default_boundaries",
    "derive_visiondrop_schedule",
    "split_contextual",
]

#: Decay of the visual tokens from one stage to the next in the authors' rule of thumb (SPEC §7).
DECAY = 0.73
#: Share of each stage's tokens that are contextual (merged) tokens, rounded up.
CONTEXTUAL_SHARE = 1 / 8


@dataclass(frozen=True)
class Stage:
    """Token counts after one pruning stage, per image.

    Attributes
    ----------
    layer : int
        0 for the vision stage; ``l >= 1`` for the boundary after LLM layer ``l`` (before layer index ``l``).
    dominant : int
        Tokens kept as they are (at stage 0 this includes [CLS] when a method keeps it).
    contextual : int
        Merged tokens.
    """

    layer: int
    dominant: int
    contextual: int = 0

    @property
    def tokens(self) -> int:
        return self.dominant + self.contextual

    def __str__(self) -> str:
        where = "vision" if self.layer == 0 else f"after L{self.layer}"
        merged = f" ({self.dominant}+{self.contextual})" if self.contextual else ""
        return f"{where}: {self.tokens}{merged}"


@dataclass(frozen=True)
class Schedule:
    """Per-stage token counts for one image.

    Attributes
    ----------
    stages : tuple of Stage
        Stage 0 (``layer == 0``) first, then boundaries in increasing layer order.
    image_tokens : int
        Visual tokens the image has before any pruning.
    num_layers : int
        Decoder layers of the LLM.
    """

    stages: tuple[Stage, ...]
    image_tokens: int
    num_layers: int

    def __post_init__(self) -> None:
        if not self.stages or self.stages[0].layer != 0:
            raise ValueError(f"a schedule starts with the vision stage (layer 0), got {self.stages!r}")
        previous = self.image_tokens
        last_layer = 0
        for stage in self.stages:
            if stage.dominant < 0 or stage.contextual < 0:
                raise ValueError(f"token counts must be >= 0, got {stage}")
            if stage.tokens <= 0:
                raise ValueError(f"every stage must keep at least one token, got {stage}")
            if stage.tokens > previous:
                if stage is self.stages[0]:
                    raise ValueError(
                        f"the vision stage {stage} keeps {stage.tokens} tokens and the image has {previous}"
                    )
                raise ValueError(
                    f"a schedule cannot grow: {stage} keeps {stage.tokens} tokens after {previous}"
                )
            if stage is not self.stages[0]:
                if stage.layer <= last_layer:
                    raise ValueError(
                        f"boundary at layer={stage.layer} after one at layer={last_layer}: boundaries run after "
                        "LLM layers >= 1, in increasing order"
                    )
                if stage.layer >= self.num_layers:
                    raise ValueError(
                        f"boundary after layer {stage.layer} leaves no LLM layer to run "
                        f"(the LLM has {self.num_layers}); use 1..{self.num_layers - 1}"
                    )
            previous, last_layer = stage.tokens, stage.layer

    @property
    def vision(self) -> Stage:
        return self.stages[0]

    @property
    def boundaries(self) -> tuple[Stage, ...]:
        return self.stages[1:]

    def counts(self) -> list[int]:
        """Visual tokens after each stage, ``[n_0, n_1, ..., n_S]``."""
        return [s.tokens for s in self.stages]

    def tokens_per_layer(self) -> list[int]:
        """Visual tokens each LLM layer sees, one entry per layer."""
        per_layer = []
        starts = [0] + [s.layer for s in self.boundaries] + [self.num_layers]
        for stage, begin, end in zip(self.stages, starts[:-1], starts[1:], strict=True):
            per_layer += [stage.tokens] * (end - begin)
        return per_layer

    @property
    def input_count(self) -> int:
        """Visual tokens entering the LLM (n_0)."""
        return self.stages[0].tokens

    @property
    def layer_average(self) -> float:
        """Visual tokens per LLM layer, averaged over the layers (the in-LLM papers' convention)."""
        return sum(self.tokens_per_layer()) / self.num_layers

    @property
    def final_count(self) -> int:
        """Visual tokens after the last stage (n_S)."""
        return self.stages[-1].tokens

    def is_identity(self) -> bool:
        """True when no stage removes a token."""
        return all(s.tokens == self.image_tokens for s in self.stages)

    def describe(self) -> str:
        """One line, e.g. ``576 -> vision: 48 (42+6) -> after L8: 35 (30+5) | input 48, layer-avg 32.0, final 19``."""
        chain = " -> ".join([str(self.image_tokens), *(str(s) for s in self.stages)])
        return f"{chain} | input {self.input_count}, layer-avg {self.layer_average:.1f}, final {self.final_count}"


#: The only schedule the authors published: LLaVA-1.5-7B (32 layers), average budget 32 (SPEC §7).
#: Stage 0 keeps 42 dominant (including [CLS]) + 6 contextual; boundaries after layers 8, 16 and 24.
PUBLISHED_SCHEDULE: tuple[tuple[int, ...], ...] = ((42, 6), (8, 30, 5), (16, 22, 4), (24, 16, 3))


def check_boundaries(field: str, value: int | Sequence[int], *, empty: bool = False) -> tuple[int, ...]:
    """The one rule for a method's in-LLM boundary field, checked when the method is built; returns the layers.

    A boundary is named by the number of LLM layers that run before it: an int >= 1. Several boundaries must
    strictly increase; ``empty`` allows none at all (the method then prunes before the LLM only). Whether a boundary
    fits the model's depth is :func:`check_boundaries_fit`'s, once the model is known.
    """
    marks = (value,) if isinstance(value, int) else tuple(value)
    if any(isinstance(b, bool) or not isinstance(b, int) for b in marks):
        raise TypeError(f"{field} must be ints (LLM layers), got {value!r}")
    if not marks and not empty:
        raise ValueError(f"{field} must name at least one LLM layer, got {value!r}")
    if any(b < 1 for b in marks):
        raise ValueError(
            f"{field} must be LLM layers >= 1 (layers that run before the boundary), got {value!r}"
        )
    if list(marks) != sorted(set(marks)):
        raise ValueError(f"{field} must increase, got {value!r}")
    return marks


def check_boundaries_fit(method: str, field: str, value: int | Sequence[int], num_layers: int) -> None:
    """Refuse a boundary that leaves no LLM layer after it (one line naming the method, the field and the value)."""
    marks = (value,) if isinstance(value, int) else tuple(value)
    outside = [b for b in marks if not 1 <= b <= num_layers - 1]
    if outside:
        shown = value if isinstance(value, int) else list(marks)
        raise ValueError(
            f"{method}: {field}={shown} is outside 1..{num_layers - 1} for an LLM of {num_layers} layers "
            f"(a boundary after layer {outside[0]} must leave a layer to run)"
        )


def default_boundaries(num_layers: int) -> list[int]:
    """Boundaries at L/4, L/2 and 3L/4 (rounded), dropping any that collide or fall outside ``1..L-1``."""
    marks = []
    for quarter in (1, 2, 3):
        layer = round(num_layers * quarter / 4)
        if 1 <= layer <= num_layers - 1 and layer not in marks:
            marks.append(layer)
    return marks


def split_contextual(tokens: int, share: float = CONTEXTUAL_SHARE) -> tuple[int, int]:
    """Split a stage's token count into (dominant, contextual): contextual = ceil(share * tokens), dominant >= 1."""
    if tokens <= 1:
        return tokens, 0
    contextual = min(math.ceil(share * tokens), tokens - 1)
    return tokens - contextual, contextual


def _geometric_counts(first: float, ratio: float, count: int) -> list[int]:
    counts = [round(first)]
    for _ in range(count - 1):
        counts.append(round(ratio * counts[-1]))
    return counts


def derive_visiondrop_schedule(
    budget: float,
    image_tokens: int,
    num_layers: int,
    *,
    mode: str = "average",
    boundaries: Sequence[int] | None = None,
    decay: float = DECAY,
    contextual_share: float = CONTEXTUAL_SHARE,
) -> Schedule:
    """The authors' rule of thumb (SPEC §7), turned into one documented rule.

    - boundaries after layers L/4, L/2, 3L/4 (or ``boundaries``);
    - each stage keeps ``decay`` (0.73) of the previous one, rounded;
    - ``mode="average"``: ``n_0 = round(budget * L / sum_k w_k * decay**k)`` with ``w_k`` the layers of stage ``k``,
      middle stages ``round(decay * n_{k-1})`` and the last stage takes what is left so that the layer-average
      equals the budget (exactly, when the last stage's layer count divides the remainder);
    - ``mode="input"``: ``n_0 = budget`` and the later stages decay from it;
    - if ``n_0`` would exceed the image's tokens, ``n_0`` is the image's tokens and the decay is raised (found by
      bisection) until the average meets the budget; a budget equal to the image's tokens keeps everything;
    - every stage is split ``ceil(n/8)`` contextual, the rest dominant.

    For LLaVA-1.5 (32 layers, 576 tokens) this gives 48 -> 35 -> 26 -> 19 at budget 32 (the published schedule,
    with splits (42, 6), (30, 5), (22, 4), (16, 3)), and 97 -> 71 -> 52 -> 36 at 64.

    Parameters
    ----------
    budget : float
        Visual tokens per image (layer-average or input count, per ``mode``); ``0 < budget <= image_tokens``.
    image_tokens, num_layers : int
    mode : str
        ``"average"`` or ``"input"``.
    boundaries : sequence of int, optional
        Layers after which the in-LLM stages run.

    Returns
    -------
    Schedule
    """
    if not 0 < budget <= image_tokens:
        raise ValueError(f"budget must be in (0, {image_tokens}] visual tokens per image, got {budget}")
    marks = default_boundaries(num_layers) if boundaries is None else list(boundaries)
    starts = [0, *marks, num_layers]
    widths = [b - a for a, b in itertools.pairwise(starts)]
    num_stages = len(widths)

    if mode == "input":
        counts = _geometric_counts(budget, decay, num_stages)
    elif mode == "average":
        target = budget * num_layers
        weight = sum(w * decay**k for k, w in enumerate(widths))
        first, ratio = target / weight, decay
        if first > image_tokens:
            first = image_tokens
            lo, hi = decay, 1.0
            for _ in range(60):
                mid = (lo + hi) / 2
                if sum(w * image_tokens * mid**k for k, w in enumerate(widths)) < target:
                    lo = mid
                else:
                    hi = mid
            ratio = hi
        counts = _geometric_counts(first, ratio, num_stages)
        if num_stages > 1:
            spent = sum(w * c for w, c in zip(widths[:-1], counts[:-1], strict=True))
            counts[-1] = round((target - spent) / widths[-1])
    else:
        raise ValueError(f"budget_mode must be 'average' or 'input', got {mode!r}")

    # Keep the counts feasible: within the image, at least one token, never growing.
    feasible = []
    ceiling = image_tokens
    for c in counts:
        c = max(1, min(ceiling, c))
        feasible.append(c)
        ceiling = c

    stages = []
    previous = image_tokens
    for layer, tokens in zip([0, *marks], feasible, strict=True):
        dominant, contextual = (
            (tokens, 0) if tokens == previous else split_contextual(tokens, contextual_share)
        )
        stages.append(Stage(layer, dominant, contextual))
        previous = tokens
    return Schedule(tuple(stages), image_tokens, num_layers)


def schedule_from_stages(stages: Sequence, image_tokens: int, num_layers: int) -> Schedule:
    """Build a :class:`Schedule` from a user's explicit ``stages``.

    Accepted forms: :class:`Stage` objects, or tuples — the first ``(dominant, contextual)`` for the vision stage,
    then ``(layer, dominant, contextual)`` per boundary (``contextual`` may be omitted: ``(layer, dominant)``).
    """
    parsed: list[Stage] = []
    for i, item in enumerate(stages):
        if isinstance(item, Stage):
            parsed.append(item)
            continue
        if not isinstance(item, (tuple, list)):
            raise TypeError(
                f"stages[{i}]={item!r}: each stage is a tuple of ints, (dominant, contextual) for the vision stage "
                "then (layer, dominant, contextual)"
            )
        values = tuple(item)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"stage entries must be ints, got {item!r}")
        if i == 0:
            if len(values) not in (1, 2):
                raise ValueError(
                    f"the first stage is (dominant, contextual) for the vision stage, got {item!r}"
                )
            parsed.append(Stage(0, *values))
        else:
            if len(values) not in (2, 3):
                raise ValueError(f"boundary stages are (layer, dominant, contextual), got {item!r}")
            parsed.append(Stage(*values))
    return Schedule(tuple(parsed), image_tokens, num_layers)


def validate_stages(stages: Sequence) -> None:
    """Check an explicit schedule for what does not need the model: shape, growth, layer order, layer >= 1."""
    parsed = schedule_from_stages(stages, image_tokens=1 << 30, num_layers=1 << 30)
    if parsed.stages[0].layer != 0:
        raise ValueError(f"the first stage must be the vision stage (layer 0), got {parsed.stages[0]}")
