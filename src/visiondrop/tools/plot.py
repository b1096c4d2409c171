"""``visiondrop plot``: accuracy against prefill FLOPs, or against measured time to first token, drawn with Pillow.

One point per method, budget and position policy, y the accuracy from ``visiondrop eval --json`` files. By default x
is the analytic prefill FLOPs of the pruned model as a share of the unpruned model's (what the run's report gives).
With ``--ttft BENCH.json ...`` x is the measured time to first token as a share of the unpruned model's, from
``visiondrop bench --json`` runs (each method timed next to the unpruned model in one interleaved run): every eval
point is matched to the bench result of the same method (name and fixed fields, ``positions`` aside), budget, budget
convention and position policy, and a point without one is an error naming it; a thin horizontal bar spans the
per-round ratios (round ``i`` of the method over round ``i`` of the unpruned model). The budgets of one method and
policy are joined by a line, filled markers are ``preserve``, hollow ones ``compact``. The unpruned model is the star
at 100 %.
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

from .common import parse_budget

__all__ = ["add_parser", "draw_accuracy_vs_flops", "draw_accuracy_vs_ttft", "points", "ttft_points"]

#: ``{(method, policy): [(x %, accuracy, budget), ...]}``, one list per line of the picture.
Series = dict[tuple[str, str], list[tuple[float, float, Any]]]

_W, _H = 1100, 640
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 270, 50, 60


def _label_and_policy(row: dict[str, Any]) -> tuple[str, str]:
    """An eval row's method label without its ``positions=`` part, and its position policy."""
    name = row["method"].split(":")[0]
    extra = [part for part in row["method"].split(":")[1:] if not part.startswith("positions=")]
    given = [part.split("=", 1)[1] for part in row["method"].split(":")[1:] if part.startswith("positions=")]
    return ":".join([name, *extra]), row.get("positions") or (given[0] if given else "auto")


def points(rows: Sequence[dict[str, Any]]) -> Series:
    """``{(method, policy): [(flops %, accuracy, budget), ...]}`` from eval rows (rows with errors are skipped)."""
    out: Series = {}
    for row in rows:
        if row["method"] == "none" or "accuracy" not in row or not row.get("flops_ratio"):
            continue
        label, policy = _label_and_policy(row)
        out.setdefault((label, policy), []).append(
            (100.0 / row["flops_ratio"], row["accuracy"], row["budget"])
        )
    for series in out.values():
        series.sort()
    return out


def _text(value: Any) -> str:
    """A field value as a method spec writes it (tuple items joined by ``/``, booleans in lower case)."""
    if isinstance(value, (list, tuple)):
        return "/".join(_text(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _key(name: str, fields: Sequence[str]) -> str:
    """A method's identity for matching: its name and its fixed ``key=value`` fields, sorted, ``positions`` aside."""
    return ":".join([name, *sorted(f for f in fields if not f.startswith("positions="))])


def _budget_key(budget: Any, mode: Any) -> tuple[float, str]:
    return float(budget), str(mode or "average")


def ttft_points(
    rows: Sequence[dict[str, Any]],
    benches: Sequence[dict[str, Any]],
    positions: Sequence[str] | None = None,
) -> tuple[Series, dict[tuple[str, str, Any], tuple[float, float]]]:
    """Eval points placed at their measured time to first token.

    Parameters
    ----------
    rows : sequence of dict
        ``visiondrop eval`` rows; those with an accuracy are drawn (rows with errors are skipped), only those of
        ``positions`` when it is given.
    benches : sequence of dict
        ``visiondrop bench --json`` results; each result is keyed by its method name and fixed fields (``positions``
        aside), budget, budget convention and position policy.

    Returns
    -------
    series : dict
        ``{(method, policy): [(ttft %, accuracy, budget), ...]}`` in budget order: ttft % = 100 x the method's
        median time to first token / the unpruned model's in the same bench run.
    spread : dict
        ``{(method, policy, budget): (lowest %, highest %)}`` of the per-round ratios.

    Raises
    ------
    ValueError
        Naming the method, budget and policy of an eval point no bench result measured, or of a configuration two
        bench results measured.
    """
    measured: dict[tuple[str, str, tuple[float, str]], tuple[float, list[float]]] = {}
    for bench in benches:
        base_rounds = bench["unpruned"]["ttft_s_rounds"]
        for result in bench["results"]:
            parts = result["method"].split(":")
            fields = dict(part.split("=", 1) for part in parts[1:])
            fields.update({k: _text(v) for k, v in (result.get("fields") or {}).items()})
            policy = result.get("positions") or fields.get("positions") or "auto"
            key = (
                _key(parts[0], [f"{k}={v}" for k, v in fields.items()]),
                policy,
                _budget_key(result["budget"], result["budget_mode"]),
            )
            if key in measured:
                raise ValueError(
                    f"--ttft: {result['method']} at budget {result['budget']} ({policy}) is in two bench results; "
                    "give each configuration once"
                )
            rounds = [100.0 * t / b for t, b in zip(result["ttft_s_rounds"], base_rounds, strict=False)]
            measured[key] = (100.0 / result["prefill_speedup"], rounds)
    series: Series = {}
    spread: dict[tuple[str, str, Any], tuple[float, float]] = {}
    for row in rows:
        if row["method"] == "none" or "accuracy" not in row:
            continue
        label, policy = _label_and_policy(row)
        if positions and policy not in positions:
            continue
        parts = label.split(":")
        key = (_key(parts[0], parts[1:]), policy, _budget_key(row["budget"], row.get("budget_mode")))
        if key not in measured:
            raise ValueError(
                f"--ttft: no measured time to first token for {label} at budget {row['budget']} "
                f"({row.get('budget_mode') or 'average'}, positions={policy}); run `visiondrop bench --methods {label} "
                f"--budget {row['budget']} --set positions={policy}` or leave the policy out with --positions"
            )
        x, rounds = measured[key]
        series.setdefault((label, policy), []).append((x, row["accuracy"], row["budget"]))
        if rounds:
            spread[(label, policy, row["budget"])] = (min(rounds), max(rounds))
    for line in series.values():  # joined in budget order: measured times need not fall with the budget
        line.sort(key=lambda point: float(point[2]))
    return series, spread


def _colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.8, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_accuracy_vs_flops(rows: Sequence[dict[str, Any]], title: str = "") -> Image.Image:
    """The picture for one eval's rows (see the module docstring)."""
    series = points(rows)
    if not series:
        raise ValueError("no rows with an accuracy and a FLOPs ratio to draw")
    return _draw(rows, series, {}, "prefill FLOPs, % of unpruned (analytic)", title)


def draw_accuracy_vs_ttft(
    rows: Sequence[dict[str, Any]],
    benches: Sequence[dict[str, Any]],
    title: str = "",
    positions: Sequence[str] | None = None,
) -> Image.Image:
    """Accuracy against measured time to first token (see :func:`ttft_points` and the module docstring)."""
    series, spread = ttft_points(rows, benches, positions)
    if not series:
        raise ValueError(
            "no rows with an accuracy to draw"
            + (f" under positions {', '.join(positions)}" if positions else "")
        )
    return _draw(rows, series, spread, "time to first token, % of unpruned (measured, median)", title)


def _draw(
    rows: Sequence[dict[str, Any]],
    series: Series,
    spread: dict[tuple[str, str, Any], tuple[float, float]],
    x_title: str,
    title: str,
) -> Image.Image:
    """Draw ``series`` (x in % of unpruned) with ``spread`` bars, the unpruned row of ``rows`` as the star."""
    base = next((r for r in rows if r["method"] == "none"), None)
    accuracies = [a for pts in series.values() for _, a, _ in pts] + ([base["accuracy"]] if base else [])
    y_lo = max(0.0, math.floor(min(accuracies) * 10) / 10 - 0.05)
    y_hi = min(1.0, math.ceil(max(accuracies) * 10) / 10 + 0.02)
    widest = max([x for pts in series.values() for x, _, _ in pts] + [hi for _, hi in spread.values()])
    x_hi = 105.0 if widest <= 100 else math.ceil(widest / 10) * 10 + 5.0  # a pruned call slower than unpruned

    image = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def xy(x: float, y: float) -> tuple[float, float]:
        return _LEFT + x / x_hi * plot_w, _TOP + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    for tick in range(0, int(x_hi), 10):
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
        x_title,
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
        for _, y, budget in pts:
            if (label, policy, budget) in spread:
                lo, hi = spread[(label, policy, budget)]
                draw.line([xy(lo, y), xy(hi, y)], fill=colour, width=1)
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
    if spread:
        draw.text((lx, y + 76), "bars: range over timed rounds", fill="black", font=small)
    return image


def cmd_plot(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for path in args.eval_json:  # several evals of the same samples: one unpruned row is enough
        data = json.loads(Path(path).read_text())
        more = data["results"] if isinstance(data, dict) else data
        rows += [r for r in more if not (r["method"] == "none" and any(x["method"] == "none" for x in rows))]
    if args.ttft:
        benches = [json.loads(Path(path).read_text()) for path in args.ttft]
        for path, bench in zip(args.ttft, benches, strict=True):
            if not isinstance(bench, dict) or "unpruned" not in bench or "results" not in bench:
                raise ValueError(
                    f"--ttft {path}: not a `visiondrop bench --json` file (no 'unpruned' and 'results')"
                )
        policies = [p.strip() for p in args.positions.split(",")] if args.positions else None
        if args.budgets:
            wanted = {float(parse_budget(b, "--budgets")) for b in args.budgets.split(",") if b.strip()}
            rows = [r for r in rows if r["method"] == "none" or float(r["budget"]) in wanted]
        image = draw_accuracy_vs_ttft(rows, benches, title=args.title or "", positions=policies)
    else:
        if args.positions or args.budgets:
            raise ValueError(
                "--positions and --budgets select points of the --ttft picture; give --ttft BENCH.json too"
            )
        image = draw_accuracy_vs_flops(rows, title=args.title or "")
    out = Path(args.out or ("accuracy_vs_ttft.png" if args.ttft else "accuracy_vs_flops.png"))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    print(f"picture: {out} ({out.stat().st_size // 1024} KB)")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``visiondrop plot``."""
    plot = subparsers.add_parser(
        "plot",
        help="accuracy vs prefill FLOPs, or vs measured time to first token (--ttft), as PNG, from "
        "`visiondrop eval --json` files",
    )
    plot.add_argument("eval_json", nargs="+", help="the file(s) `visiondrop eval --json` wrote")
    plot.add_argument(
        "--ttft",
        nargs="+",
        metavar="BENCH_JSON",
        help="`visiondrop bench --json` file(s): draw accuracy against their measured time to first token instead "
        "of FLOPs; every drawn eval point needs a bench result of the same method, budget and position policy",
    )
    plot.add_argument(
        "--positions",
        help="with --ttft: draw only these position policies (e.g. preserve; comma-separated)",
    )
    plot.add_argument("--budgets", help="with --ttft: draw only these budgets (e.g. 192,64; comma-separated)")
    plot.add_argument(
        "--out", help="PNG to write (default accuracy_vs_flops.png, or accuracy_vs_ttft.png with --ttft)"
    )
    plot.add_argument("--title", help="title line")
    plot.set_defaults(func=cmd_plot)
