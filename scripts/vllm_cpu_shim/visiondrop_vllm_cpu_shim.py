"""Import shim for .venv-vllm only (scripts/setup_vllm.sh puts it on the path with a .pth file; not part of visiondrop).

The registry's only torchvision wheel for torch 2.13 is a CUDA build: its C extension cannot load beside the CPU torch,
and ``import torchvision`` then fails while ``torchvision._meta_registrations`` registers fake kernels for ops whose
schemas the C extension would have defined. vLLM's LLaVA imports transformers image processors, which import
``torchvision.transforms.v2``. This shim waits for ``torchvision._meta_registrations`` to be imported and, only if the
C extension did not define the ops, declares their schemas first (no kernels: calling such an op still raises torch's
"no kernel" error). Installing the finder imports nothing, so the .pth costs nothing at interpreter start.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

#: The ops ``torchvision._meta_registrations`` registers fake kernels for whether or not its C extension loaded
#: (torchvision 0.28: ``nms`` and ``qnms``; the others are registered only when the extension loaded). Schemas as
#: torchvision's C++ sources define them; each is declared only when missing.
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_TARGET = "torchvision._meta_registrations"
_LIBRARY = None  # keeps the torch.library.Library alive (its definitions go away with it)


def declare_missing_schemas() -> list[str]:
    """Declare each torchvision op whose schema is not registered; the names declared."""
    global _LIBRARY
    import torch

    declared = []
    for schema in SCHEMAS:
        name = schema.split("(", 1)[0]
        try:
            torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
            continue
        except RuntimeError:
            pass
        if _LIBRARY is None:
            _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")  # a fragment: adds to the namespace
        _LIBRARY.define(schema)
        declared.append(name)
    return declared


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # once: let the normal finders locate the real module
        declare_missing_schemas()
        return importlib.machinery.PathFinder.find_spec(fullname, path)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
