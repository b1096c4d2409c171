"""Calls on a cache that a pruned prefill filled: decode steps, continued conversations, and the caller's view.

Decode steps never prune. Each in-LLM stage's layers get a mask built from the stage's prefill mask plus the new
tokens, sized against the stage's own cache (``create_causal_mask(..., layer_idx=...)``), and the positions of
``positions.decode_stage``. A caller's inputs, written for the unpruned prompt, are translated to the pruned one here,
and ``generate()``'s output gets the caller's prompt back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..compat import cache_of
from . import positions
from .call import CacheRecord, StageRecord, StageState, VisionOutcome

if TYPE_CHECKING:
    from .session import Session

__all__ = [
    "CallerPromptStreamer",
    "Decode",
    "continue_prompt",
    "explicit_mask",
    "restore_prompt",
    "translate_manual_step",
]


class Decode:
    """A forward pass on a cache filled by a pruned prefill: decode steps or a continued conversation."""

    def __init__(self, session: Session, record: CacheRecord, kwargs: dict) -> None:
        self.session = session
        self.record = record
        self.cache = cache_of(kwargs)
        tensor = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        past = self.cache.get_seq_length()
        mask = kwargs.get("attention_mask")
        if mask is None:
            self.tail = torch.ones(
                tensor.shape[0],
                past + tensor.shape[1] - record.prefill_length,
                dtype=torch.bool,
                device=tensor.device,
            )
        else:
            self.tail = mask[:, record.prefill_length :].bool()
        self.positions = positions.step(kwargs, past)
        self.states: dict[int, StageState] = {}

    def enter_layer(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        stage = self.record.stage_of(idx)
        if stage is None:
            return hidden
        state = self.states.get(stage.first_layer)
        if state is None:
            state = self._state(stage, hidden, kwargs)
            self.states[stage.first_layer] = state
        kwargs["attention_mask"] = state.masks[self.session.text.layer_type(idx)]
        kwargs["position_embeddings"] = state.position_embeddings
        if kwargs.get("position_ids") is not None and state.position_ids is not None:
            kwargs["position_ids"] = state.position_ids
        return hidden

    def _state(self, stage: StageRecord, hidden: torch.Tensor, kwargs: dict) -> StageState:
        session = self.session
        mask2d = torch.cat([stage.mask, self.tail], dim=1)
        ids, rotary = positions.decode_stage(
            session.text, hidden, self.positions, stage.dropped, session.positions, kwargs
        )
        masks = session.stage_masks(hidden, mask2d, self.cache, stage.first_layer)
        return StageState(masks, rotary, ids)


def continue_prompt(kwargs: dict, vision: VisionOutcome) -> None:
    """Translate a continued conversation (previous prompt + answer + new turn) to the pruned prefix, in place."""
    ids = kwargs.get("input_ids")
    old = vision.orig_ids
    if ids is None or ids.shape[0] != old.shape[0] or ids.shape[1] < old.shape[1]:
        raise ValueError(
            "input_ids do not continue the pruned conversation held in past_key_values "
            f"(expected {tuple(old.shape)} prompt tokens first, got {None if ids is None else tuple(ids.shape)})"
        )
    if not torch.equal(ids[:, : old.shape[1]], old):
        raise ValueError("input_ids do not start with the prompt that filled past_key_values")
    prefix = old.shape[1]
    mask = kwargs.get("attention_mask")
    tail = (torch.ones_like(ids) if mask is None else mask)[:, prefix:]
    old_mask = vision.new_mask if vision.new_mask is not None else torch.ones_like(vision.new_ids)
    kwargs["input_ids"] = torch.cat([vision.new_ids, ids[:, prefix:]], dim=1)
    kwargs["attention_mask"] = torch.cat([old_mask.to(tail.dtype), tail], dim=1)
    appended = positions.appended(vision.new_positions[..., -1:], tail)
    kwargs["position_ids"] = torch.cat([vision.new_positions, appended], dim=-1)
    for key, value in vision.new_aligned.items():
        if kwargs.get(key) is not None:
            kwargs[key] = torch.cat([value, kwargs[key][:, prefix:]], dim=1)


def translate_manual_step(kwargs: dict, vision: VisionOutcome, cache: Any) -> None:
    """A forward call continuing a pruned prefill by hand (outside ``generate``), e.g. a decode loop.

    The caller builds its mask for the unpruned prompt; the cache holds the pruned one. Mask columns of the pruned
    prompt are swapped for the pruned prompt's, and missing positions continue from the prompt's last position as
    ``generate()`` would make them.
    """
    ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    query = ids.shape[1]
    past = cache.get_seq_length()
    pruned, original = vision.new_ids.shape[1], vision.orig_ids.shape[1]
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[1] == past + query + original - pruned:
        head = vision.new_mask if vision.new_mask is not None else torch.ones_like(vision.new_ids)
        mask = torch.cat([head.to(mask.dtype), mask[:, original:]], dim=1)
        kwargs["attention_mask"] = mask
    if kwargs.get("position_ids") is None:
        full = (
            mask
            if mask is not None
            else torch.ones(ids.shape[0], past + query, dtype=torch.long, device=ids.device)
        )
        kwargs["position_ids"] = positions.appended(vision.new_positions[..., -1:], full[:, pruned:])[
            ..., -query:
        ]


def explicit_mask(kwargs: dict, cache: Any) -> None:
    """Give the model an all-ones 2-D mask where it had none.

    transformers 5.x reads positions that do not grow by exactly 1 as packed sequences when no mask (and no cache) is
    given, and would then block attention across the gaps that pruning leaves in ``preserve`` positions.
    """
    tensor = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    past = cache.get_seq_length() if cache is not None else 0
    kwargs["attention_mask"] = torch.ones(
        tensor.shape[0], past + tensor.shape[1], dtype=torch.long, device=tensor.device
    )


class CallerPromptStreamer:
    """A streamer wrapper that shows the caller's prompt ids in place of the pruned ones ``generate()`` puts first."""

    def __init__(self, streamer: Any, prompt: torch.Tensor) -> None:
        self._streamer = streamer
        self._prompt: torch.Tensor | None = prompt

    def put(self, value: torch.Tensor) -> None:
        if self._prompt is not None:  # generate() puts the whole prompt once, before any generated token
            value, self._prompt = self._prompt.to(value.device), None
        self._streamer.put(value)

    def end(self) -> None:
        self._streamer.end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._streamer, name)


def restore_prompt(out: Any, caller_ids: torch.Tensor, pruned_length: int) -> Any:
    """Put the caller's prompt back in front of the generated tokens of ``generate()``'s output."""

    def fix(sequences: torch.Tensor) -> torch.Tensor:
        repeat = sequences.shape[0] // caller_ids.shape[0]
        prompt = caller_ids.repeat_interleave(repeat, dim=0).to(sequences.device)
        return torch.cat([prompt, sequences[:, pruned_length:]], dim=1)

    if isinstance(out, torch.Tensor):
        return fix(out)
    if getattr(out, "sequences", None) is not None:
        out.sequences = fix(out.sequences)
    return out
