"""One file per method; each registers its class by name."""

from . import none, visiondrop  # noqa: F401  (registration order = listing order)
from .base import MethodInfo, PruningMethod, available_methods, build, method_class, register
from .none import NoPruning
from .visiondrop import VisionDrop

__all__ = [
    "MethodInfo",
    "NoPruning",
    "PruningMethod",
    "VisionDrop",
    "available_methods",
    "build",
    "method_class",
    "register",
]
