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
from .models import supported_models
from .ops import Selection
from .report import Report
from .runtime import Run
from .schedule import PUBLISHED_SCHEDULE, Schedule, Stage, derive_visiondrop_schedule

__version__ = "0.1.0"

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
