"""General helpers of the command line: budgets, image sizes and ``key=value`` settings, dtype sizes, tables and byte
counts (used by ``visiondrop flops``, ``visiondrop bench``, ``visiondrop run`` and the testbed tools)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .common import DTYPES, dtype_bytes, format_bytes, parse_budget, parse_settings

__all__ = [
    "DTYPE_BYTES",
    "dtype_bytes",
    "format_bytes",
    "format_table",
    "parse_budget",
    "parse_image_size",
    "parse_settings",
]

#: Bytes per KV-cache element for the ``--dtype`` names (the one table is :data:`.common.DTYPES`).
DTYPE_BYTES: dict[str, int] = {name: size for name, (_, size) in DTYPES.items()}


# ---------------------------------------------------------------------------------------------------------------
# parsing the command line
# ---------------------------------------------------------------------------------------------------------------


def parse_image_size(text: str) -> tuple[int, int]:
    """``"672x672"`` (height × width in pixels; ``x``, ``X`` or ``×``) -> ``(672, 672)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if match is None or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise ValueError(f"--image-size {text!r}: give HEIGHTxWIDTH in pixels, e.g. 672x672")
    return int(match.group(1)), int(match.group(2))


# ---------------------------------------------------------------------------------------------------------------
# text helpers (also used by ``visiondrop bench``)
# ---------------------------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table with padded columns (readable as plain text too)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
