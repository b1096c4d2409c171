"""Accuracy of methods x budgets on the testbed (``visiondrop eval``), with retention against the unpruned model.

A *method spec* names a registered method and optionally fixes some of its fields, with ``:`` between settings:
``visiondrop``, ``visiondrop:score=visual``, ``visiondrop:merge=mean:positions=preserve``, ``fastv:layer=1``,
``visiondrop:boundaries=`` (an empty tuple: the vision stage only). Values follow :mod:`visiondrop.tools.common`'s rules, with ``/`` between
tuple items. Each spec runs at every budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..methods import build, method_class
from .common import CLIError, parse_settings, parse_value

__all__ = [
    "MethodSpec",
    "markdown_tables",
    "paired_difference",
    "parse_method_spec",
    "parse_value",
    "run_eval",
    "standard_error",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodSpec:
    """A registry name and fixed field values, e.g. ``visiondrop:score=visual``."""

    name: str
    fields: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        if not self.fields:
            return self.name
        return self.name + ":" + ":".join(f"{k}={_text(v)}" for k, v in self.fields)

    def build(self, budget: int | float, budget_mode: str):
        return build(self.name, budget=budget, budget_mode=budget_mode, **dict(self.fields))


def _text(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_method_spec(text: str) -> MethodSpec:
    """Parse ``name[:key=value]...``; ValueError naming the spec for unknown names or malformed settings."""
    parts = text.strip().split(":")
    name = parts[0].strip().lower()
    if not name:
        raise CLIError(f"method spec {text!r}: give a method name (see `visiondrop methods`)")
    method_class(name)  # unknown names fail here, naming the available ones
    fields = parse_settings(":".join(parts[1:]), flag=f"method spec {text!r}:", separator=":")
    return MethodSpec(name, tuple(fields.items()))


def run_eval(
    model: Any,
    processor: Any,
    samples: Sequence[Any],
    specs: Sequence[MethodSpec],
    budgets: Sequence[int | float],
    *,
    budget_mode: str = "average",
    batch_size: int = 16,
    progress: bool = True,
    positions: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Accuracy of the unpruned model and of every spec at every budget, on the same samples.

    ``positions`` (e.g. ``["preserve", "compact"]``) runs every spec under each position policy, so that methods are
    compared at equal policy; a spec that fixes ``positions`` itself runs once, as given. Each run's label then ends
    in ``:positions=<policy>``.

    Returns
    -------
    list of dict
        One row per run: ``method`` (the spec's label; ``"none"`` for the unpruned row), ``budget``,
        ``budget_mode``, ``accuracy``, ``n``, ``per_type``, ``schedule`` (what the method kept, all three
        conventions) and ``retention`` (accuracy / unpruned accuracy). A combination a method cannot run (e.g. a
        layer-average below FastV's floor) gives a row with ``error`` instead of an accuracy.
    """
    from ..testbed import evaluate

    rows: list[dict[str, Any]] = []
    base = evaluate(model, processor, samples, batch_size=batch_size, progress=progress)
    answers = [sample.answer for sample in samples]
    rows.append(_row("none", None, None, base, None, answers))
    runs: list[MethodSpec] = []
    for policy in positions or [None]:
        for spec in specs:
            if policy is None or "positions" in dict(spec.fields):
                if spec not in runs:
                    runs.append(spec)
            else:
                runs.append(MethodSpec(spec.name, (*spec.fields, ("positions", policy))))
    for spec in runs:
        for budget in budgets:
            try:
                method = spec.build(budget, budget_mode)
                with method.apply(model) as run:
                    result = evaluate(model, processor, samples, batch_size=batch_size, progress=progress)
            except ValueError as err:
                logger.warning("%s at budget %s (%s): %s", spec.label, budget, budget_mode, err)
                rows.append(
                    {"method": spec.label, "budget": budget, "budget_mode": budget_mode, "error": str(err)}
                )
                continue
            rows.append(_row(spec.label, budget, budget_mode, result, run.report, answers))
            rows[-1]["positions"] = method.positions
    for row in rows:
        if "accuracy" in row:
            row["retention"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else math.nan
            row["stderr"] = standard_error(row["accuracy"], row["n"])
    return rows


def standard_error(accuracy: float, n: int) -> float:
    """One binomial standard error of an accuracy measured on ``n`` samples: ``sqrt(p (1 - p) / n)``."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else math.nan


def paired_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """Accuracy of row ``b`` minus row ``a`` on the same samples, and its paired standard error.

    Both rows come from one :func:`run_eval` (their ``correct`` lists cover the same samples in order); the error is
    ``sd(d) / sqrt(n)`` over the per-sample differences ``d = correct_b - correct_a``, smaller than the unpaired
    ``sqrt(se_a² + se_b²)`` when the two runs mostly agree.
    """
    ca, cb = a.get("correct"), b.get("correct")
    if ca is None or cb is None or len(ca) != len(cb) or not ca:
        raise ValueError("paired_difference needs two rows of one run_eval with per-sample 'correct' lists")
    n = len(ca)
    d = [y - x for x, y in zip(ca, cb, strict=True)]
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / (n - 1) if n > 1 else math.nan
    return mean, math.sqrt(var / n)


def _row(
    label: str, budget: Any, mode: Any, result: dict, report: Any, answers: Sequence[str]
) -> dict[str, Any]:
    row = {
        "method": label,
        "budget": budget,
        "budget_mode": mode,
        "accuracy": result["accuracy"],
        "n": result["n"],
        "per_type": result["per_type"],
        # per sample, 1 when the first generated word is the answer: paired comparisons (paired_difference)
        "correct": [int(p == a) for p, a in zip(result["predictions"], answers, strict=True)],
    }
    if report is not None and report.images:
        image = report.images[0]
        row["schedule"] = {
            "counts": image.counts(),
            "input": image.input_count,
            "layer_average": image.layer_average,
            "final": image.final_count,
        }
        if report.flops:
            row["flops_ratio"] = report.flops["ratio"]
    return row


def markdown_tables(rows: Sequence[dict[str, Any]]) -> str:
    """An accuracy table (methods x budgets, with retention) and a per-question-type table."""
    base = next(r for r in rows if r["method"] == "none")
    budgets = []
    for r in rows:
        if r["method"] != "none" and r["budget"] not in budgets:
            budgets.append(r["budget"])
    labels = []
    for r in rows:
        if r["method"] != "none" and r["method"] not in labels:
            labels.append(r["method"])
    mode = next((r["budget_mode"] for r in rows if r["method"] != "none"), "average")
    lines = [
        f"Accuracy ± one standard error (retention vs. unpruned {base['accuracy']:.3f}), n = {base['n']}, "
        f"budget mode: {mode}",
        "",
        "| method | " + " | ".join(str(b) for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    notes = []
    for label in labels:
        cells = []
        for budget in budgets:
            row = next((r for r in rows if r["method"] == label and r["budget"] == budget), None)
            if row is None:
                cells.append("")
            elif "error" in row:
                notes.append(f"{label} at {budget}: {row['error']}")
                cells.append(f"n/a [{len(notes)}]")
            else:
                avg = row.get("schedule", {}).get("layer_average")
                kept = f", avg {avg:.0f}" if avg is not None else ""
                se = standard_error(row["accuracy"], row["n"])
                cells.append(f"{row['accuracy']:.3f} ± {se:.3f} ({100 * row['retention']:.1f}%{kept})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"[{i}] {note}" for i, note in enumerate(notes, start=1)]
    types = list(base["per_type"])
    lines += [
        "",
        "Per question type:",
        "",
        "| method | budget | " + " | ".join(types) + " |",
        "|---|---|" + "---|" * len(types),
    ]
    for row in rows:
        if "error" in row:
            continue
        budget = "-" if row["budget"] is None else row["budget"]
        cells = " | ".join(f"{row['per_type'].get(t, math.nan):.3f}" for t in types)
        lines.append(f"| {row['method']} | {budget} | {cells} |")
    return "\n".join(lines)
