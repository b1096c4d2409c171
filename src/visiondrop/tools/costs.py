"""General helpers of the command line: budgets, image sizes and ``key=value`` settings, dtype sizes, tables and byte
counts (used by ``visiondrop flops``, ``visiondrop bench``, ``visiondrop run`` and the testbed tools)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DTYPE_BYTES",
    "dtype_bytes",
    "format_bytes",
    "format_table",
    "parse_budget",
    "parse_image_size",
    "parse_settings",
]


#: Bytes per KV-cache element for the ``--dtype`` names this command accepts.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "fp32": 4,
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
}


# ---------------------------------------------------------------------------------------------------------------
# parsing the command line
# ---------------------------------------------------------------------------------------------------------------


def parse_budget(text: str | int | float) -> int | float:
    """``"64"`` -> 64 tokens per image, ``"0.25"`` -> a quarter of each image's tokens.

    Raises
    ------
    ValueError
        If ``text`` is not a number; the range is checked by the method.
    """
    if isinstance(text, bool):
        raise ValueError(
            f"--budget {text!r}: give a token count (e.g. 64) or a fraction in (0, 1] (e.g. 0.25)"
        )
    if isinstance(text, (int, float)):
        return text
    raw = text.strip()
    if re.fullmatch(r"[+-]?\d+", raw):
        return int(raw)
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(
            f"--budget {text!r}: give a token count (e.g. 64) or a fraction in (0, 1] (e.g. 0.25)"
        )
    return value


def parse_image_size(text: str) -> tuple[int, int]:
    """``"672x672"`` (height × width in pixels; ``x``, ``X`` or ``×``) -> ``(672, 672)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if match is None or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise ValueError(f"--image-size {text!r}: give HEIGHTxWIDTH in pixels, e.g. 672x672")
    return int(match.group(1)), int(match.group(2))


def parse_settings(text: str | None) -> dict[str, Any]:
    """``"layer=3,merge=mean"`` -> ``{"layer": 3, "merge": "mean"}`` (ints, floats, booleans, else strings)."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: use key=value[,key=value...]")
        value: Any = raw.strip()
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        elif re.fullmatch(r"[+-]?\d+", value):
            value = int(value)
        elif re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", value):
            value = float(value)
        out[key.strip()] = value
    return out


def dtype_bytes(name: str) -> int:
    """Bytes per element of ``name`` (``bfloat16``, ``float16``, ``float32`` and their short forms)."""
    key = name.strip().lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"--dtype {name!r}: use one of bfloat16, float16, float32 (or bf16, fp16, fp32)")
    return DTYPE_BYTES[key]


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


def format_bytes(count: float) -> str:
    """``335544320`` -> ``"320.0 MiB"``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)
