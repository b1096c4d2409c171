"""lmms-eval model registration (entry point group ``lmms_eval.models``).

lmms-eval loads this module while it builds its model registry (on ``import lmms_eval.models``, for every run, whatever
the model), so it imports nothing but lmms-eval's registry and names the classes by path: the model module (and
accelerate, lmms-eval's request types) loads only when a run asks for ``--model visiondrop``. Python still runs the
parent packages' ``__init__`` (``import visiondrop``): measured with ``python -X importtime -c "import
lmms_eval.evaluator"``, 0.09 s on top of the torch and transformers that lmms-eval has imported by then.
"""

from lmms_eval.models.registry_v2 import ModelManifest

__all__ = ["MANIFEST"]

MANIFEST = ModelManifest(
    model_id="visiondrop",
    chat_class_path="visiondrop.integrations.lmms_eval.model.VisionDropChat",
    simple_class_path="visiondrop.integrations.lmms_eval.model.VisionDropSimple",
)
"""``--model visiondrop``: the chat class by default, the simple one with lmms-eval's ``--force_simple``."""
