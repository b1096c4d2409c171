"""What the runtime refuses, before anything runs: one-line errors naming the value, the model left untouched."""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ..compat import cache_of
from ..models.base import ModelAdapter
from ..schedule import Stage

__all__ = ["check_forward_kwargs", "check_generate_kwargs", "check_selection"]

# transformers 5.23: generate() cache implementations whose layers may hold different lengths. Static caches
# preallocate one length for all layers and cannot; the rest are untested with per-layer lengths.
DYNAMIC_CACHES = (None, "dynamic", "offloaded")


def check_forward_kwargs(adapter: ModelAdapter, kwargs: dict) -> None:
    """Refuse forward arguments that pruning cannot honour (the family's own checks first)."""
    adapter.check_call(kwargs)
    if kwargs.get("labels") is not None:
        raise ValueError(
            "labels: training or loss computation with pruned tokens is out of scope of visiondrop"
        )
    cache = cache_of(kwargs)
    if cache is not None and getattr(cache, "is_compileable", False):
        raise ValueError(
            f"past_key_values={type(cache).__name__}: a static cache cannot hold the shorter per-layer lengths "
            "of pruned stages; use a DynamicCache"
        )
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)}: visiondrop needs a 2-D padding mask")
    if adapter.has_visual(kwargs) and kwargs.get("input_ids") is None:
        raise ValueError(
            "inputs_embeds with images: visiondrop needs input_ids to find the <image> placeholders"
        )


def check_generate_kwargs(model: torch.nn.Module, adapter: ModelAdapter, kwargs: dict) -> None:
    """Refuse ``generate()`` settings that assume one cache length for every layer, then the forward checks."""
    config = kwargs.get("generation_config") or model.generation_config
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if implementation not in DYNAMIC_CACHES:
        raise ValueError(
            f"cache_implementation={implementation!r}: pruned stages give layers different cache lengths, which "
            f"only a dynamic cache holds; use one of {[c for c in DYNAMIC_CACHES if c]}"
        )
    chunk = kwargs.get("prefill_chunk_size", getattr(config, "prefill_chunk_size", None))
    if chunk is not None:
        raise ValueError(
            f"prefill_chunk_size={chunk}: pruning needs the whole prompt in one prefill; pass prefill_chunk_size=None"
        )
    for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        value = kwargs.get(name, getattr(config, name, None))
        if value is not None:
            raise ValueError(
                f"{name}={_short(value)}: assisted decoding crops the cache to one length, which pruned layers do "
                "not share"
            )
    check_forward_kwargs(adapter, kwargs)


def check_selection(selection: ops.Selection, stage: Stage, where: str) -> None:
    """A method's selection must hold exactly the counts its schedule promised (the report and the cache rely on it)."""
    if selection.num_kept != stage.dominant or selection.num_merged != stage.contextual:
        raise RuntimeError(
            f"{where}: method returned {selection.num_kept}+{selection.num_merged} tokens, schedule says {stage}"
        )


def _short(value: Any) -> str:
    """``repr`` of a plain value; a model or other object by its type alone (its repr can run to many lines)."""
    return repr(value) if isinstance(value, (int, float, str, bool)) else f"<{type(value).__name__}>"
