"""Serve pruned LVLMs with vLLM: the settings a vLLM engine needs to run a visiondrop method's vision stage.

>>> import visiondrop as vd
>>> from visiondrop.vllm import hf_overrides
>>> from vllm import LLM                                                           # doctest: +SKIP
>>> llm = LLM(model=path, hf_overrides=hf_overrides(vd.build("visiondrop", budget=64, boundaries=())))  # doctest: +SKIP

This module does not import vLLM: the plugin (:mod:`visiondrop.integrations.vllm`) is registered through vLLM's
``vllm.general_plugins`` entry point and loaded by vLLM itself. ``vllm serve MODEL --hf-overrides '<json>'`` takes
``json.dumps(hf_overrides(method))``.
"""

from __future__ import annotations

import json
from typing import Any

from .methods.base import PruningMethod, build

__all__ = ["ARCHITECTURES", "CONFIG_KEY", "check_vision_only", "hf_overrides", "method_from_config"]

#: Key of the method's settings in the model's (overridden) Hugging Face config.
CONFIG_KEY = "visiondrop"
#: The plugin's architecture for each supported stock architecture.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "VisionDropLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "VisionDropLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "VisionDropQwen2_5_VLForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "VisionDropQwen2VLForConditionalGeneration",
}
# Layers assumed when checking a method before the model is known: any in-LLM boundary a method would place in a
# real LLM it also places in one this deep.
_ANY_DEPTH = 1 << 20


def check_vision_only(method: PruningMethod, num_layers: int | None = None) -> None:
    """ValueError when ``method`` prunes inside the LLM, which vLLM cannot run.

    vLLM's paged KV cache holds one sequence length for every layer, so only the vision stage (before the LLM) can
    run there; VisionDrop needs ``boundaries=()``.

    Parameters
    ----------
    method : PruningMethod
    num_layers : int, optional
        The LLM's decoder layers; unknown (any depth) when ``None``.
    """
    if not isinstance(method, PruningMethod):
        raise TypeError(
            f"expected a visiondrop method (vd.build(...)), got {type(method).__name__} {method!r}"
        )
    if method.info.stages == "LLM":
        raise ValueError(
            f"method={method.name!r} prunes inside the LLM, which vLLM cannot run (its paged KV cache keeps one "
            "length for every layer); use a vision-stage method or visiondrop with boundaries=()"
        )
    layer = method.first_boundary(num_layers or _ANY_DEPTH)
    if layer is not None:
        if hasattr(method, "boundaries"):  # VisionDrop: its in-LLM stages can be switched off
            where = ", ".join(
                f"{field}={getattr(method, field)!r}"
                for field in ("boundaries", "stages")
                if hasattr(method, field)
            )
            hint = "pass boundaries=() for the vision stage alone"
        else:  # a method whose LLM stage is part of it (vscan)
            where = f"method={method.name!r}"
            hint = "use a vision-stage method or visiondrop with boundaries=()"
        after = f" (after layer {layer})" if num_layers is not None else ""
        raise ValueError(
            f"{method.name} with {where} prunes inside the LLM{after}, which vLLM cannot run; {hint}"
        )


def hf_overrides(
    method: PruningMethod, architecture: str = "LlavaForConditionalGeneration"
) -> dict[str, Any]:
    """The ``hf_overrides`` that make vLLM run ``method``'s vision stage.

    Parameters
    ----------
    method : PruningMethod
        A vision-stage method (``vd.build("visiondrop", budget=64, boundaries=())``, ``visionzip``, ...).
    architecture : str
        The model's stock architecture (its config's ``architectures[0]``), a key of :data:`ARCHITECTURES`
        (LLaVA-1.5: ``LlavaForConditionalGeneration``, LLaVA-NeXT: ``LlavaNextForConditionalGeneration``, Qwen2.5-VL:
        ``Qwen2_5_VLForConditionalGeneration``, Qwen2-VL: ``Qwen2VLForConditionalGeneration``).

    Returns
    -------
    dict
        ``{"architectures": [plugin class], "visiondrop": {"method": name, **settings}}``: JSON-serialisable, so
        ``json.dumps`` of it is what ``vllm serve --hf-overrides`` takes.

    Raises
    ------
    ValueError
        For an in-LLM method or in-LLM boundaries, or an architecture the plugin does not support.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture={architecture!r} is not supported by the vLLM plugin; supported: {', '.join(ARCHITECTURES)}"
        )
    check_vision_only(method)
    settings = {"method": method.name, **method.settings()}
    return {"architectures": [ARCHITECTURES[architecture]], CONFIG_KEY: json.loads(json.dumps(settings))}


def method_from_config(config: Any) -> PruningMethod:
    """Rebuild the method from a config overridden by :func:`hf_overrides` (the plugin calls this at engine start).

    Raises
    ------
    ValueError
        When the config carries no settings, or settings the method refuses (each names its value).
    """
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict) or "method" not in settings:
        raise ValueError(
            f"the model config has no {CONFIG_KEY!r} settings (got {settings!r}); pass "
            "hf_overrides=visiondrop.vllm.hf_overrides(method)"
        )
    fields = dict(settings)
    name = fields.pop("method")
    if fields.get("stages") is not None:
        fields["stages"] = [tuple(stage) for stage in fields["stages"]]
    method = build(name, **fields)
    check_vision_only(method)
    return method
