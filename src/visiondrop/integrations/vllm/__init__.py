"""vLLM out-of-tree plugin: visiondrop's vision-stage pruning inside vLLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL).

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in every process it starts; the model
class is registered by its ``"module:Class"`` path, so nothing here imports vLLM's model code until vLLM needs it.
Users select it with :func:`visiondrop.vllm.hf_overrides`.
"""

from __future__ import annotations

from ...vllm import ARCHITECTURES

__all__ = ["register"]

_CLASSES = {
    "VisionDropLlavaForConditionalGeneration": f"{__name__}.llava:VisionDropLlavaForConditionalGeneration",
    "VisionDropLlavaNextForConditionalGeneration": f"{__name__}.llava_next:VisionDropLlavaNextForConditionalGeneration",
    "VisionDropQwen2_5_VLForConditionalGeneration": f"{__name__}.qwen2_vl:VisionDropQwen2_5_VLForConditionalGeneration",
    "VisionDropQwen2VLForConditionalGeneration": f"{__name__}.qwen2_vl:VisionDropQwen2VLForConditionalGeneration",
}


def register() -> None:
    """Register the plugin's model classes with vLLM's ``ModelRegistry`` (lazily, by import path)."""
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES.values():
        ModelRegistry.register_model(architecture, _CLASSES[architecture])
