"""One file per method; each registers its class by name (import order = listing order)."""

# isort: off
from . import visiondrop, fastv, pyramiddrop, visionzip, dart, divprune  # noqa: F401
from . import vispruner, holov, sparsevlm, vscan, simple, none  # noqa: F401

# isort: on
from .base import MethodInfo, PruningMethod, available_methods, build, method_class, register
from .dart import DART
from .divprune import DivPrune
from .fastv import FastV
from .holov import HoloV
from .none import NoPruning
from .pyramiddrop import PyramidDrop
from .simple import Pooling, RandomPruning
from .sparsevlm import SparseVLM
from .visiondrop import VisionDrop
from .visionzip import VisionZip
from .vispruner import VisPruner
from .vscan import VScan

__all__ = [
    "DART",
    "DivPrune",
    "FastV",
    "HoloV",
    "MethodInfo",
    "NoPruning",
    "Pooling",
    "PruningMethod",
    "PyramidDrop",
    "RandomPruning",
    "SparseVLM",
    "VScan",
    "VisPruner",
    "VisionDrop",
    "VisionZip",
    "available_methods",
    "build",
    "method_class",
    "register",
]
