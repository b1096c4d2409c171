"""The state of one call, built once from its inputs and handed explicitly from stage to stage.

A :class:`Call` is one top-level ``generate()`` or ``forward()`` on a model inside ``apply()``. The vision stage makes
its :class:`VisionOutcome` (per image: what survived, its schedule, its span and row in the sequence the LLM gets);
each forward pass of the call is a :class:`~visiondrop.runtime.prefill.Prefill` (a prompt holding images) or a
:class:`~visiondrop.runtime.decode.Decode` (a step on a cache that a pruned prefill filled), held in ``Call.step``.
What a pruned prefill leaves for later calls on the same cache is a :class:`CacheRecord`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..layout import Span
from ..schedule import Schedule, Stage
from ..tokens import ImageInfo

if TYPE_CHECKING:
    from .decode import Decode
    from .prefill import Prefill

__all__ = ["CacheRecord", "Call", "ImageOut", "StageRecord", "StageState", "VisionOutcome"]


@dataclass
class ImageOut:
    """One image after the vision stage."""

    info: ImageInfo
    stage: Stage
    offsets: torch.Tensor  # (k,) place of each surviving token in the original placeholder run (positions)
    token_patch: torch.Tensor  # (k,) grid patch of each surviving token, -1 for [CLS]
    patch_owner: torch.Tensor  # (P,) surviving token that carries each patch, -1 dropped
    contextual: int
    projected: int  # tokens that went through the projector (cost accounting)


@dataclass
class VisionOutcome:
    """The vision stage of one call: per-image outcome, where each image sits, and the rewritten inputs.

    ``spans`` and ``rows`` describe the sequence the LLM receives (the shrunk one when ``changed``); the prefill
    and the report read them from here rather than searching the ids again.
    """

    infos: list[ImageInfo]
    images: list[ImageOut]
    schedules: list[Schedule]
    spans: list[list[Span]]  # per batch row, the images' spans in the LLM's input
    changed: bool  # whether the inputs were rewritten (False: every image kept all its tokens)
    orig_ids: torch.Tensor | None = None  # (B, L) the caller's input_ids
    new_ids: torch.Tensor | None = None  # (B, L0)
    new_mask: torch.Tensor | None = None  # (B, L0) or None when no padding at all
    new_positions: torch.Tensor | None = None  # (B, L0) or (P, B, L0) for M-RoPE
    new_aligned: dict[str, torch.Tensor] = field(default_factory=dict)  # other per-token inputs, shrunk alike

    @property
    def batch(self) -> int:
        return len(self.spans)

    @property
    def rows(self) -> list[int]:
        """Batch row of every image, in image order."""
        row_of = {s.image: b for b, row in enumerate(self.spans) for s in row}
        return [row_of[i] for i in range(len(self.images))]

    @property
    def counts(self) -> list[int]:
        return [im.stage.tokens for im in self.images]

    def expanded(self, factor: int) -> VisionOutcome:
        """The same outcome for a batch whose rows ``generate()`` repeated ``factor`` times (beams, samples)."""
        if factor == 1:
            return self
        order: list[int] = []
        spans: list[list[Span]] = []
        for row in self.spans:
            for _ in range(factor):
                spans.append([Span(s.start, s.length, len(order) + k) for k, s in enumerate(row)])
                order.extend(s.image for s in row)

        def repeat(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat_interleave(factor, dim=0)

        return VisionOutcome(
            infos=[self.infos[i] for i in order],
            images=[self.images[i] for i in order],
            schedules=[self.schedules[i] for i in order],
            spans=spans,
            changed=self.changed,
            orig_ids=repeat(self.orig_ids),
            new_ids=repeat(self.new_ids),
            new_mask=repeat(self.new_mask),
            new_positions=None
            if self.new_positions is None
            else self.new_positions.repeat_interleave(factor, dim=self.new_positions.dim() - 2),
            new_aligned={k: repeat(v) for k, v in self.new_aligned.items()},
        )


@dataclass
class StageState:
    """What every layer of an in-LLM stage receives instead of the model's own arguments."""

    masks: dict[str, Any]  # layer type -> 4-D mask (or None / 2-D for attention kinds that take those)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.Tensor | None


@dataclass
class StageRecord:
    """One in-LLM stage, kept with the cache so that decode steps can address its layers."""

    first_layer: int
    mask: torch.Tensor  # (B, L_s) bool, the stage's prefill mask
    dropped: torch.Tensor  # (B,) real tokens removed by in-LLM stages up to this one


@dataclass
class CacheRecord:
    """What a pruned prefill leaves for later calls on the same cache."""

    vision: VisionOutcome | None
    prefill_length: int  # layer-0 cache length after the prefill
    stages: list[StageRecord] = field(default_factory=list)

    def stage_of(self, layer_idx: int) -> StageRecord | None:
        found = None
        for stage in self.stages:
            if stage.first_layer <= layer_idx:
                found = stage
        return found


@dataclass
class Call:
    """One top-level ``generate()`` or ``forward()`` in flight, and the only per-call state a session holds.

    Attributes
    ----------
    generate : bool
        Whether ``generate()`` made the call (it then runs several forward passes); False for a plain forward.
    vision : VisionOutcome or None
        The vision stage that ``generate()`` ran on the prompt, for its prefill pass (None: no images, or a
        conversation continued from a pruned cache).
    step : Prefill or Decode or None
        The forward pass in flight and what its hooked layers do (None: a pass that prunes nothing).
    reported : bool
        Whether the call's report was recorded (``generate(use_cache=False)`` runs every step as a prefill; the
        report describes the prompt's).
    thread : int
        The thread that made the call: hooks sit on shared modules, so another thread's call must not overlap.
    outer : Call or None
        The call this one was made inside (a ``generate()`` made on the same thread during another call).
    passes : int
        Forward passes of the model in flight within this call (a plain forward call ends when its last one does).
    """

    generate: bool
    vision: VisionOutcome | None = None
    step: Prefill | Decode | None = None
    reported: bool = False
    thread: int = field(default_factory=threading.get_ident)
    outer: Call | None = None
    passes: int = 0
