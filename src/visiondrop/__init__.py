"""visiondrop: training-free visual token pruning for Hugging Face vision-language models.

>>> import visiondrop as vd
>>> method = vd.build("visiondrop", budget=64)          # doctest: +SKIP
>>> with method.apply(model) as run:                    # doctest: +SKIP
...     out = model.generate(**inputs, max_new_tokens=64)
>>> print(run.report)                                   # doctest: +SKIP
"""

from .methods import (
    DART,
    DivPrune,
    FastV,
    MethodInfo,
    NoPruning,
    Pooling,
    PruningMethod,
    PyramidDrop,
    RandomPruning,
    VisionDrop,
    VisionZip,
    available_methods,
    build,
    method_class,
    register,
)
from .ops import Selection
from .report import Report
from .schedule import PUBLISHED_SCHEDULE, Schedule, Stage, derive_visiondrop_schedule

__version__ = "0.1.0"

# The runtime and the model adapters need transformers; they load on first use, so that building a method (and
# importing ``visiondrop.ops`` or any method) works where transformers is absent or of another version.
_LAZY = {"Run": ("runtime", "Run"), "supported_models": ("models", "supported_models")}


def __getattr__(name: str) -> object:
    """Load the transformers-backed names (``Run``, ``supported_models``) on first access."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DART",
    "PUBLISHED_SCHEDULE",
    "DivPrune",
    "FastV",
    "MethodInfo",
    "NoPruning",
    "Pooling",
    "PruningMethod",
    "PyramidDrop",
    "RandomPruning",
    "Report",
    "Run",
    "Schedule",
    "Selection",
    "Stage",
    "VisionDrop",
    "VisionZip",
    "__version__",
    "available_methods",
    "build",
    "derive_visiondrop_schedule",
    "method_class",
    "register",
    "supported_models",
]
