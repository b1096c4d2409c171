"""Every position the runtime gives the LLM is worked out here (SPEC §5).

Positions are 2-D ``(B, T)`` ids, or ``(P, B, T)`` for the families with multi-axis rotary positions (M-RoPE). The
policy (``"preserve"`` or ``"compact"``) is the method's, with ``"auto"`` already resolved for the model:

- ``preserve``: every surviving token keeps the position it had in the unpruned sequence; rotary tables are gathered.
- ``compact``: survivors are renumbered without gaps (:meth:`visiondrop.layout.Layout.compact_positions`); rotary
  tables are recomputed, and tokens after the prompt move back by the tokens pruned before them.

Tokens appended after a pruned prompt (decode steps, a continued conversation) count on from the prompt's last
position, one step per real token, on every axis, exactly as ``generate()``'s own decode steps do.
"""

from __future__ import annotations

from typing import Any

import torch

from ..layout import Layout, hf_generate_positions
from ..models.base import ModelAdapter, TextStack

__all__ = [
    "after_layout",
    "appended",
    "decode_stage",
    "per_row",
    "prompt",
    "stage_rotary",
    "step",
]


def prompt(adapter: ModelAdapter, kwargs: dict, *, generate: bool) -> torch.Tensor:
    """Positions of the unpruned prompt: the family's own (M-RoPE), the caller's, or what the model would make.

    ``generate`` makes them as ``generate()`` does (cumulative mask, 0 on padding); a plain forward counts columns.
    """
    positions = adapter.positions(kwargs, generate=generate)
    if positions is not None:
        return positions
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"]
    input_ids = kwargs["input_ids"]
    if generate:
        return hf_generate_positions(kwargs.get("attention_mask"), *input_ids.shape, input_ids.device)
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)


def after_layout(layout: Layout, positions: torch.Tensor | None, policy: str) -> torch.Tensor | None:
    """Positions of the rebuilt sequence under ``policy`` (None stays None: the layers make their own)."""
    if positions is None:
        return None
    if policy == "preserve":
        return layout.gather_positions(positions)
    return layout.compact_positions(positions)


def stage_rotary(
    text: TextStack,
    layout: Layout,
    rotary: tuple[torch.Tensor, torch.Tensor],
    hidden: torch.Tensor,
    positions: torch.Tensor | None,
    policy: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary ``(cos, sin)`` a stage's layers get: gathered under ``preserve``, recomputed under ``compact``."""
    if policy == "preserve":
        return layout.gather(rotary[0]), layout.gather(rotary[1])
    return text.rotary_emb(hidden, positions)


def per_row(positions: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Give every row its own positions (a plain forward gets one ``(1, T)`` row shared by the batch)."""
    if positions is not None and positions.shape[-2] != batch:
        positions = positions.expand(*positions.shape[:-2], batch, positions.shape[-1])
    return positions


def appended(last: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Positions of tokens appended after a pruned prompt.

    Parameters
    ----------
    last : LongTensor, shape (B, 1) or (P, B, 1)
        The prompt's last position (every axis).
    mask : Tensor, shape (B, T)
        Which appended columns are real; each real one advances every axis by one.
    """
    return last + mask.long().cumsum(-1)


def step(kwargs: dict, past: int) -> torch.Tensor:
    """Positions of a forward call on a filled cache: the caller's, or the columns after the ``past`` cached ones."""
    positions = kwargs.get("position_ids")
    if positions is not None:
        return positions
    tensor = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
    batch, query = tensor.shape[:2]
    return (torch.arange(query, device=tensor.device) + past).expand(batch, -1)


def decode_stage(
    text: TextStack,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    dropped: torch.Tensor,
    policy: str,
    kwargs: dict,
) -> tuple[torch.Tensor | None, Any]:
    """Positions and rotary tables of a decode step in the layers of one in-LLM stage.

    Under ``compact`` (2-D positions) the step moves back by the ``dropped`` tokens (B,) that the stages up to this
    one removed from the prompt; otherwise the step keeps the model's positions, as its cached keys kept theirs.
    """
    if policy == "compact" and positions.dim() == 2:
        moved = positions - dropped[:, None]
        return moved, text.rotary_emb(hidden, moved)
    return kwargs.get("position_ids"), kwargs["position_embeddings"]
