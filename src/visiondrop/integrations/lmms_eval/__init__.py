"""lmms-eval integration: the model ``visiondrop`` and the task ``visiondrop_pocket``.

Install with ``bash scripts/setup.sh lmms`` (or ``pip install "visiondrop[lmms]"`` into an environment that already
has the torch you want). Nothing here is imported by ``import visiondrop``; lmms-eval finds the model through the
``lmms_eval.models`` entry point (:mod:`.manifest`) and the task through ``--include_path "$(visiondrop lmms-tasks)"``.

Modules
-------
manifest
    The :class:`lmms_eval.models.registry_v2.ModelManifest` of ``--model visiondrop``.
model
    The model classes (chat and simple).
tasks/visiondrop_pocket
    The pocket benchmark as an lmms-eval task (YAML + functions).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["TASKS_DIR"]

TASKS_DIR: Path = Path(__file__).resolve().parent / "tasks"
"""Folder to pass to lmms-eval's ``--include_path`` (holds ``visiondrop_pocket``)."""
