"""What every ``visiondrop`` command shares, the one module of command-line helpers: one ``key=value`` parser, one
dtype table, one budget parser, one image-size parser, one byte formatter, one table formatter, output checks made
before any model runs, one JSON writer, and :class:`CLIError`.

The ``key=value`` rules (``--set``, ``eval --methods name:key=value``), one set for every command:

- items are separated by ``,``; an item without ``=`` continues the previous value, so ``boundaries=8,16,24`` is
  the tuple ``(8, 16, 24)``; ``/`` also separates tuple items (``boundaries=8/16/24``, the only form inside
  ``eval --methods``, where ``,`` separates methods); ``stages=54/10,8/30/5`` is ``((54, 10), (8, 30, 5))``;
- an empty value (``boundaries=``) or ``()`` is the empty tuple; ``none`` is None;
- ``true`` / ``false`` (any case) are booleans; ``12`` is an int; ``0.5``, ``1e-3`` are floats;
- anything else is a string (``merge=mean``); the method checks every field's type and value.

``budget`` and ``budget_mode`` are refused there: ``--budget`` and ``--budget-mode`` give them.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DTYPES",
    "CLIError",
    "add_model_options",
    "check_output_dir",
    "check_output_file",
    "dtype_bytes",
    "format_bytes",
    "format_table",
    "parse_budget",
    "parse_image_size",
    "parse_settings",
    "parse_value",
    "torch_dtype",
    "write_json",
]


class CLIError(ValueError):
    """A user error reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------------------------

#: ``--dtype`` names -> (torch dtype name, bytes per element).
DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("float32", 4),
    "fp32": ("float32", 4),
    "bfloat16": ("bfloat16", 2),
    "bf16": ("bfloat16", 2),
    "float16": ("float16", 2),
    "fp16": ("float16", 2),
}


def _dtype_entry(name: Any) -> tuple[str, int]:
    key = str(name).strip().lower()
    if key not in DTYPES:
        raise CLIError(f"--dtype {name!r}: use one of bfloat16, float16, float32 (or bf16, fp16, fp32)")
    return DTYPES[key]


def torch_dtype(name: str) -> Any:
    """``"bf16"`` -> ``torch.bfloat16``; :class:`CLIError` naming the value for an unknown name."""
    import torch

    return getattr(torch, _dtype_entry(name)[0])


def dtype_bytes(name: str) -> int:
    """Bytes per element of a ``--dtype`` name (``bfloat16`` -> 2)."""
    return _dtype_entry(name)[1]


# ---------------------------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------------------------

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


def parse_budget(text: str | int | float, flag: str = "--budget") -> int | float:
    """``"64"`` -> 64 tokens per image, ``"0.25"`` -> a quarter of each image's tokens.

    Raises
    ------
    CLIError
        (a ValueError) if ``text`` is not a finite number; the range is checked by the method.
    """
    message = f"{flag} {text!r}: give a token count (e.g. 64) or a fraction in (0, 1] (e.g. 0.25)"
    if isinstance(text, bool):
        raise CLIError(message)
    if isinstance(text, (int, float)):
        return text
    raw = str(text).strip()
    if _INT.fullmatch(raw):
        return int(raw)
    value = float(raw) if _FLOAT.fullmatch(raw) else math.nan
    if not math.isfinite(value):
        raise CLIError(message)
    return value


def parse_image_size(text: str) -> tuple[int, int]:
    """``"672x672"`` (height × width in pixels; ``x``, ``X`` or ``×``) -> ``(672, 672)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if match is None or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise ValueError(f"--image-size {text!r}: give HEIGHTxWIDTH in pixels, e.g. 672x672")
    return int(match.group(1)), int(match.group(2))


def parse_value(text: str) -> Any:
    """One value by the module's rules: ``"true"`` -> True, ``"12"`` -> 12, ``"0.5"`` -> 0.5, ``""`` -> (),
    ``"8,16"`` / ``"8/16"`` -> (8, 16), ``"54/10,8/30"`` -> ((54, 10), (8, 30)), ``"none"`` -> None, else the string."""
    raw = text.strip()
    if raw in ("", "()", "[]"):
        return ()
    if "," in raw:
        return tuple(parse_value(part) for part in raw.split(",") if part.strip())
    if "/" in raw:
        return tuple(parse_value(part) for part in raw.split("/") if part.strip())
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lower() == "none":
        return None
    if _INT.fullmatch(raw):
        return int(raw)
    if _FLOAT.fullmatch(raw):
        return float(raw)
    return raw


_RESERVED = {"budget": "--budget", "budget_mode": "--budget-mode"}


def parse_settings(text: str | None, flag: str = "--set", separator: str = ",") -> dict[str, Any]:
    """``"layer=3,boundaries=8,16"`` -> ``{"layer": 3, "boundaries": (8, 16)}`` by the module's rules.

    ``separator`` separates the settings (``:`` inside an ``eval`` method spec). Raises :class:`CLIError` naming the
    item for a missing ``=``, an empty or repeated key, or ``budget`` / ``budget_mode`` (given by their own flags).
    """
    if not text or not text.strip():
        return {}
    pieces: list[tuple[str, str]] = []
    for item in text.split(separator):
        key, sep, raw = item.partition("=")
        if not sep:
            if pieces and separator == ",":
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + "," + item)
                continue
            raise CLIError(f"{flag} {item!r}: use key=value[{separator}key=value...]")
        key = key.strip()
        if not key.isidentifier():
            raise CLIError(f"{flag} {item!r}: {key!r} is not a field name")
        if key in _RESERVED:
            raise CLIError(f"{flag} {key}={raw}: give the {key.replace('_', ' ')} with {_RESERVED[key]}")
        if any(key == k for k, _ in pieces):
            raise CLIError(f"{flag}: {key} is given twice")
        pieces.append((key, raw))
    return {key: parse_value(raw) for key, raw in pieces}


def format_bytes(count: float) -> str:
    """``335544320`` -> ``"320.0 MiB"``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(count) >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} B"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table with padded columns (readable as plain text too)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# ---------------------------------------------------------------------------------------------------------------
# outputs: checked before the model runs, written at the end
# ---------------------------------------------------------------------------------------------------------------


def _check_writable_place(path: Path, flag: str, start: Path | None = None) -> None:
    """The nearest existing folder above ``path`` (or from ``start``) must be a folder we can create files in."""
    ancestor = start if start is not None else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CLIError(f"{flag} {str(path)!r}: {str(ancestor)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        raise CLIError(f"{flag} {str(path)!r}: cannot write in {str(ancestor)!r} ({err.strerror})") from None


def check_output_file(path: str | Path, flag: str = "--json") -> Path:
    """:class:`CLIError` unless a file can be written at ``path`` (an existing file is replaced); no side effect."""
    target = Path(path)
    if target.is_dir():
        raise CLIError(f"{flag} {str(path)!r}: is a folder; give a file name")
    _check_writable_place(target, flag)
    return target


def check_output_dir(path: str | Path, flag: str = "--out", names: tuple[str, ...] = ()) -> Path:
    """:class:`CLIError` unless ``path`` is (or can become) a folder where ``names`` can be written; no side effect."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CLIError(f"{flag} {str(path)!r}: is a file; give a folder")
    _check_writable_place(target, flag, start=target)
    for name in names:
        if (target / name).is_dir():
            raise CLIError(f"{flag} {str(path)!r}: {name} there is a folder")
    return target


def write_json(path: str | Path, data: Any, flag: str = "--json") -> Path:
    """Write ``data`` as indented JSON (folders made as needed); one-line :class:`CLIError` if it cannot."""
    target = check_output_file(path, flag)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise CLIError(f"{flag} {str(path)!r}: cannot write it ({err.strerror})") from None
    return target


def add_model_options(parser: Any, shipped: list[str] | tuple[str, ...]) -> None:
    """The options ``visiondrop bench`` and ``visiondrop flops`` share: which model, which budget, which settings.

    ``shipped`` are the config names that ``--model`` takes besides a path to a ``config.json``.
    """
    parser.add_argument(
        "--model",
        default="llava-1.5-7b",
        help=f"one of {', '.join(shipped)} (default llava-1.5-7b), or a config.json of a supported family",
    )
    parser.add_argument(
        "--budget",
        default="64",
        help="visual tokens per image (int) or a fraction (float in (0, 1]); default 64",
    )
    parser.add_argument("--budget-mode", default="average", choices=["average", "input"])
    parser.add_argument(
        "--set", dest="settings", help="other method fields, e.g. layer=3 (FastV) or merge=mean"
    )
