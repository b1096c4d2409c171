"""lmms-eval model registration (entry point group ``lmms_eval.models``).

lmms-eval loads this module while it builds its model registry, before it knows which model a run asks for, so it
imports nothing but lmms-eval's registry and names the classes by path: torch, transformers and visiondrop load only
when a run actually asks for ``--model visiondrop``.
"""

from lmms_eval.models.registry_v2 import ModelManifest

__all__ = ["MANIFEST"]

MANIFEST = ModelManifest(
    model_id="visiondrop",
    chat_class_path="visiondrop.integrations.lmms_eval.model.VisionDropChat",
    simple_class_path="visiondrop.integrations.lmms_eval.model.VisionDropSimple",
)
"""``--model visiondrop``: the chat class by default, the simple one with lmms-eval's ``--force_simple``."""
