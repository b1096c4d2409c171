"""The pruned prefill/decode loop: hooks installed for the duration of ``method.apply(model)`` (SPEC §3–5).

One call, followed through the package (``ARCHITECTURE.md`` names every step):

- ``session.py``: :func:`attach` installs the hooks and removes them on exit, also when the body raises; no attribute
  is left on the model. Every ``generate()`` or ``forward()`` made inside the block is one
  :class:`~visiondrop.runtime.call.Call`.
- ``vision.py``: the vision stage shrinks each image's placeholder run to the tokens that survive.
- ``prefill.py``: in-LLM boundaries, run from forward pre-hooks on the decoder layers, and the report.
- ``decode.py``: decode steps on the stages' shorter caches; they never prune.
- ``positions.py``: every position the LLM is given; ``checks.py``: what is refused before anything runs.
"""

from .session import Run, attach

__all__ = ["Run", "attach"]
