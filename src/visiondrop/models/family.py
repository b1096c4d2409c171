"""What a model family is, for the code that never hooks a model: FLOPs accounting, image shapes and the bench.

Each adapter module (``models/llava.py``, ``models/llava_next.py``, ``models/qwen2_vl.py``, ...; the one list of them
is :data:`ADAPTER_MODULES`) defines one :class:`Family` next to its adapter and registers it with
:func:`register_family`; :mod:`visiondrop.flops`, the ``visiondrop flops`` command and ``visiondrop bench`` find it by
the config's ``model_type`` through :func:`family_of`, instead of testing family names themselves. This module
imports neither torch nor transformers (only :func:`load_adapters`, when called, imports the adapter modules).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADAPTER_MODULES",
    "BenchImage",
    "Family",
    "families",
    "family_of",
    "load_adapters",
    "register_family",
]

#: The adapter modules of :mod:`visiondrop.models`: importing one registers its adapter and its :class:`Family`. The one
#: list of them (``visiondrop.models`` imports them through :func:`load_adapters`); a new family's module goes here.
ADAPTER_MODULES: tuple[str, ...] = (
    "internvl",
    "llava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "qwen2_vl",
    "qwen3_vl",
    "video_llava",
)


@dataclass(frozen=True)
class BenchImage:
    """One image of the bench's inputs, as the model family receives it.

    Attributes
    ----------
    inputs : dict
        The image's model inputs besides the token ids, batched for ``batch`` rows (``pixel_values`` and the family's
        own: ``image_sizes``, ``image_grid_thw``); tensors on the CPU, pixels in float32.
    placeholders : list of int
        The token ids one row carries for the image, in order: its placeholder run and any markers around it.
    image_flags : list of bool
        For each id of :attr:`placeholders`, whether it is a visual token (the runtime prunes those).
    tokens : int
        Visual tokens the image gives the LLM unpruned (``sum(image_flags)``).
    grids : tuple of (rows, cols)
        The image's patch grids as the adapter reports them (what grid-shaped methods schedule on).
    vit_tokens : int
        Tokens of one vision-tower pass (one crop for LLaVA, the whole image for Qwen2-VL).
    modality_ids : str, optional
        The model input that marks each position's modality (Qwen2-VL's ``mm_token_type_ids``: 1 at visual tokens),
        or ``None`` when the family has none.
    """

    inputs: dict[str, Any]
    placeholders: list[int]
    image_flags: list[bool]
    tokens: int
    grids: tuple[tuple[int, int], ...]
    vit_tokens: int
    modality_ids: str | None = None


@dataclass(frozen=True, kw_only=True)
class Family:
    """A model family: its configs, its Hugging Face classes and what the tools need to cost or build it.

    Attributes
    ----------
    name : str
        Display name, the adapter's ``family`` (``"LLaVA-1.5"``).
    model_types : tuple of str
        ``model_type`` values of its configs (``"llava"``).
    model_classes : tuple of str
        The transformers class of each entry of :attr:`model_types`, in the same order.
    has_cls : bool
        Whether its vision encoder prepends a [CLS] token.
    arch_fields : callable
        ``(config dict, vision config dict, llm fields) -> dict``: the vision-tower, projector and image fields of a
        :class:`visiondrop.flops.ArchSpec` (its FLOPs description); raises ``KeyError`` for a missing field.
    image_shape : callable
        ``(arch, (height, width) or None) -> visiondrop.flops.ImageShape``: one image as the family receives it.
    bench_image : callable
        ``(transformers config, batch, generator) -> BenchImage``: one random image per row for ``visiondrop bench``.
    vision_parts : callable
        ``(model) -> (vision layers, projector)``: the modules ``visiondrop bench`` counts tokens through.
    """

    name: str
    model_types: tuple[str, ...]
    model_classes: tuple[str, ...]
    has_cls: bool
    arch_fields: Callable[[Mapping[str, Any], Mapping[str, Any], Mapping[str, int]], dict[str, Any]]
    image_shape: Callable[..., Any]
    bench_image: Callable[..., BenchImage]
    vision_parts: Callable[[Any], tuple[Any, Any]]

    def model_class(self, model_type: str) -> str:
        """The transformers class name of ``model_type`` (one of :attr:`model_types`)."""
        return self.model_classes[self.model_types.index(model_type)]


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``family`` known under each of its ``model_types``; returns it (adapter modules call this once)."""
    if len(family.model_classes) != len(family.model_types):
        raise ValueError(f"family {family.name!r}: one model class per model_type is needed")
    for model_type in family.model_types:
        _FAMILIES[model_type] = family
    return family


def load_adapters() -> None:
    """Import every module of :data:`ADAPTER_MODULES`, which registers every adapter and family (once: Python imports
    a module once)."""
    for name in ADAPTER_MODULES:
        importlib.import_module(f"{__package__}.{name}")


def families() -> dict[str, Family]:
    """Every registered family by ``model_type``."""
    load_adapters()
    return dict(_FAMILIES)


def family_of(model_type: Any) -> Family:
    """The family of a config's ``model_type``.

    Raises
    ------
    ValueError
        If no family handles ``model_type`` (the message lists the supported ones).
    """
    load_adapters()
    if model_type not in _FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r}: expected one of {', '.join(_FAMILIES)}")
    return _FAMILIES[model_type]
