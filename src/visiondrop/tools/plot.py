"""``visiondrop plot``: accuracy against prefill FLOPs from a ``visiondrop eval --json`` file, drawn with Pillow.

One point per method, budget and position policy: x is the analytic prefill FLOPs of the pruned model as a share of
the unpruned model's (what the run's report gives), y the accuracy; the budgets of one method and policy are joined
by a line, filled markers are ``preserve``, hollow ones ``compact``. The unpruned model is the star at 100 %.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["add_parser", "draw_accuracy_vs_flops", "points"]

_W, _H = 1100, 640
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 270, 50, 60


def points(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[float, float, Any]]]:
    """``{(method, policy): [(flops %, accuracy, budget), ...]}`` from eval rows (rows with errors are skipped)."""
    out: dict[tuple[str, str], list[tuple[float, float, Any]]] = {}
    for row in rows:
        if row["method"] == "none" or "accuracy" not in row or not row.get("flops_ratio"):
            continue
        name = row["method"].split(":")[0]
        extra = [part for part in row["method"].split(":")[1:] if not part.startswith("positions=")]
        label = ":".join([name, *extra])
        given = [
            part.split("=", 1)[1] for part in row["method"].split(":")[1:] if part.startswith("positions=")
        ]
        policy = row.get("positions") or (given[0] if given else "auto")
        out.setdefault((label, policy), []).append(
            (100.0 / row["flops_ratio"], row["accuracy"], row["budget"])
        )
    for series in out.values():
        series.sort()
    return out


def _colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.8, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_accuracy_vs_flops(rows: Sequence[dict[str, Any]], title: str = "") -> Image.Image:
    """The picture for one eval's rows (see the module docstring)."""
    series = points(rows)
    if not series:
        raise ValueError("no rows with an accuracy and a FLOPs ratio to draw")
    base = next((r for r in rows if r["method"] == "none"), None)
    accuracies = [a for pts in series.values() for _, a, _ in pts] + ([base["accuracy"]] if base else [])
    y_lo = max(0.0, math.floor(min(accuracies) * 10) / 10 - 0.05)
    y_hi = min(1.0, math.ceil(max(accuracies) * 10) / 10 + 0.02)
    x_hi = 105.0

    image = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def xy(x: float, y: float) -> tuple[float, float]:
        return _LEFT + x / x_hi * plot_w, _TOP + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    for tick in range(0, 101, 10):
        x, _ = xy(tick, y_lo)
        draw.line([(x, _TOP), (x, _TOP + plot_h)], fill=(235, 235, 235))
        draw.text((x, _TOP + plot_h + 6), f"{tick}%", fill="black", font=small, anchor="mt")
    steps = round((y_hi - y_lo) / 0.05)
    for k in range(steps + 1):
        value = y_lo + k * 0.05
        _, y = xy(0, value)
        draw.line([(_LEFT, y), (_LEFT + plot_w, y)], fill=(235, 235, 235))
        draw.text((_LEFT - 6, y), f"{value:.2f}", fill="black", font=small, anchor="rm")
    draw.rectangle([_LEFT, _TOP, _LEFT + plot_w, _TOP + plot_h], outline="black")
    draw.text(
        (_LEFT + plot_w / 2, _H - 18),
        "prefill FLOPs, % of unpruned (analytic)",
        fill="black",
        font=font,
        anchor="mm",
    )
    label = Image.new("RGB", (120, 20), "white")
    ImageDraw.Draw(label).text((60, 10), "accuracy", fill="black", font=font, anchor="mm")
    image.paste(label.rotate(90, expand=True), (8, int(_TOP + plot_h / 2 - 60)))
    if title:
        draw.text((_LEFT + plot_w / 2, 22), title, fill="black", font=font, anchor="mm")

    methods: list[str] = []
    for label, _ in series:  # in the order the eval ran them
        if label not in methods:
            methods.append(label)
    colours = {m: _colour(i) for i, m in enumerate(methods)}
    for (label, policy), pts in series.items():
        colour = colours[label]
        coords = [xy(x, y) for x, y, _ in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2 if policy == "preserve" else 1)
        for cx, cy in coords:
            box = [cx - 5, cy - 5, cx + 5, cy + 5]
            draw.ellipse(box, fill=colour if policy == "preserve" else "white", outline=colour, width=2)
    if base is not None:
        cx, cy = xy(100.0, base["accuracy"])
        star = [
            (cx + r * math.sin(k * math.pi / 5), cy - r * math.cos(k * math.pi / 5))
            for k, r in zip(range(10), [9, 4] * 5, strict=True)
        ]
        draw.polygon(star, fill="black")

    lx, ly = _LEFT + plot_w + 20, _TOP
    draw.text((lx, ly), "method", fill="black", font=font)
    for i, label in enumerate(methods):
        y = ly + 22 + i * 18
        draw.ellipse([lx, y, lx + 10, y + 10], fill=colours[label])
        draw.text((lx + 16, y + 5), label, fill="black", font=small, anchor="lm")
    y = ly + 34 + len(methods) * 18
    draw.ellipse([lx, y, lx + 10, y + 10], fill="gray", outline="gray", width=2)
    draw.text((lx + 16, y + 5), "positions=preserve", fill="black", font=small, anchor="lm")
    draw.ellipse([lx, y + 18, lx + 10, y + 28], fill="white", outline="gray", width=2)
    draw.text((lx + 16, y + 23), "positions=compact", fill="black", font=small, anchor="lm")
    draw.text((lx, y + 44), "star: unpruned", fill="black", font=small)
    draw.text((lx, y + 60), "points: budgets of one method", fill="black", font=small)
    return image


def cmd_plot(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for path in args.eval_json:  # several evals of the same samples: one unpruned row is enough
        data = json.loads(Path(path).read_text())
        more = data["results"] if isinstance(data, dict) else data
        rows += [r for r in more if not (r["method"] == "none" and any(x["method"] == "none" for x in rows))]
    image = draw_accuracy_vs_flops(rows, title=args.title or "")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    print(f"picture: {out} ({out.stat().st_size // 1024} KB)")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``visiondrop plot``."""
    plot = subparsers.add_parser(
        "plot", help="accuracy vs prefill FLOPs (PNG) from a `visiondrop eval --json` file"
    )
    plot.add_argument("eval_json", nargs="+", help="the file(s) `visiondrop eval --json` wrote")
    plot.add_argument("--out", default="accuracy_vs_flops.png", help="PNG to write")
    plot.add_argument("--title", help="title line")
    plot.set_defaults(func=cmd_plot)
