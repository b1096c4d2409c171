"""``visiondrop table DIR...``: lmms-eval results as method × budget × benchmark, with retention vs. unpruned.

Reads every ``*_results.json`` that ``python -m lmms_eval --model visiondrop ... --output_path DIR`` wrote under the
given folders, and prints the paper's Table 1 layout: one row per (model, method, budget), one column per benchmark
score, and the average retention (score / the unpruned run's score, averaged over the benchmarks both runs have).
Also ``visiondrop lmms-tasks``: the folder to pass to lmms-eval's ``--include_path`` for the task
``visiondrop_pocket``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "add_parser", "build_table", "markdown", "read_runs"]

# model_args of the lmms-eval model that are not method fields (see integrations/lmms_eval/model.py).
_MODEL_ONLY = ("pretrained", "dtype", "attn_implementation", "device_map")
_TOKENS_KEY = "avg_visiondrop_visual_tokens_layer_average"
_FLOPS_KEY = "avg_visiondrop_prefill_tflops"


@dataclass
class Run:
    """One lmms-eval results file of the ``visiondrop`` model."""

    path: Path
    model: str
    method: str
    budget: int | float | None
    budget_mode: str | None
    scores: dict[str, float]
    date: str = ""
    visual_tokens: float | None = None
    prefill_tflops: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, Any, Any]:
        return (self.model, self.method, self.budget, self.budget_mode)


def _parse_model_args(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if "=" in item:
            key, value = item.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _scores(results: dict[str, Any]) -> dict[str, float]:
    """``{benchmark: score}``: each task's numeric metrics (stderr left out); ``task:metric`` when it has several."""
    out: dict[str, float] = {}
    for task, metrics in results.items():
        values = {
            name.split(",", 1)[0]: float(value)
            for name, value in metrics.items()
            if "," in name
            and "stderr" not in name
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        }
        if len(values) == 1:
            out[task] = next(iter(values.values()))
        else:
            for metric, value in values.items():
                out[f"{task}:{metric}"] = value
    return out


def read_runs(folders: Iterable[str | Path]) -> list[Run]:
    """Every ``visiondrop`` results file under ``folders`` (recursively), newest last.

    Raises
    ------
    FileNotFoundError
        If a folder does not exist.
    ValueError
        If no results file of the ``visiondrop`` model is found.
    """
    from .common import parse_budget

    runs: list[Run] = []
    for folder in folders:
        root = Path(folder)
        if not root.exists():
            raise FileNotFoundError(f"{folder!r}: no such folder")
        files = [root] if root.is_file() else sorted(root.rglob("*_results.json"))
        for path in files:
            data = json.loads(path.read_text())
            config = data.get("config", {})
            if config.get("model") != "visiondrop":
                continue
            args = _parse_model_args(str(config.get("model_args", "")))
            method = args.pop("method", "none").lower()
            budget_text = args.pop("budget", None)
            mode = args.pop("budget_mode", "average")
            model = args.pop("pretrained", "?")
            for key in _MODEL_ONLY:
                args.pop(key, None)
            label = method + "".join(f":{k}={v}" for k, v in sorted(args.items()))
            unpruned = method == "none"
            throughput = data.get("throughput", {}) or {}
            runs.append(
                Run(
                    path=path,
                    model=model,
                    method=label,
                    budget=None if unpruned else parse_budget(budget_text or "64"),
                    budget_mode=None if unpruned else mode,
                    scores=_scores(data.get("results", {})),
                    date=str(data.get("date", "")),
                    visual_tokens=throughput.get(_TOKENS_KEY),
                    prefill_tflops=throughput.get(_FLOPS_KEY),
                )
            )
    if not runs:
        raise ValueError(
            f"no lmms-eval results of --model visiondrop under {', '.join(map(str, folders))} (*_results.json)"
        )
    runs.sort(key=lambda r: (r.date, str(r.path)))
    return runs


def build_table(runs: Sequence[Run]) -> dict[str, Any]:
    """Merge runs into rows (one per model, method, budget; benchmarks from several files are merged, newest wins).

    Returns
    -------
    dict
        ``columns`` (benchmarks, in first-seen order) and ``rows``: ``model``, ``method``, ``budget``,
        ``budget_mode``, ``scores``, ``retention`` (per benchmark, vs. the same model's ``none`` run),
        ``average_retention`` (mean over the benchmarks with a retention, a benchmark's metrics averaged first;
        ``None`` without an unpruned run),
        ``visual_tokens`` (layer-average visual tokens, mean over the row's files) and ``files``.
    """
    merged: dict[tuple, dict[str, Any]] = {}
    columns: list[str] = []
    for run in runs:
        row = merged.setdefault(
            run.key,
            {
                "model": run.model,
                "method": run.method,
                "budget": run.budget,
                "budget_mode": run.budget_mode,
                "scores": {},
                "tokens": [],
                "tflops": [],
                "files": [],
            },
        )
        row["scores"].update(run.scores)
        row["files"].append(str(run.path))
        if run.visual_tokens is not None:
            row["tokens"].append(run.visual_tokens)
        if run.prefill_tflops is not None:
            row["tflops"].append(run.prefill_tflops)
        for column in run.scores:
            if column not in columns:
                columns.append(column)
    rows = []
    for row in merged.values():
        base = merged.get((row["model"], "none", None, None))
        retention: dict[str, float] = {}
        if base is not None:
            for column, score in row["scores"].items():
                reference = base["scores"].get(column)
                if reference:
                    retention[column] = score / reference
        tokens = row.pop("tokens")
        tflops = row.pop("tflops")
        row["retention"] = retention
        # Each benchmark counts once: a task with several metrics (MME perception and cognition) is averaged
        # over its metrics first.
        by_task: dict[str, list[float]] = {}
        for column, value in retention.items():
            by_task.setdefault(column.split(":", 1)[0], []).append(value)
        per_task = [sum(values) / len(values) for values in by_task.values()]
        row["average_retention"] = sum(per_task) / len(per_task) if per_task else None
        row["visual_tokens"] = sum(tokens) / len(tokens) if tokens else None
        row["prefill_tflops"] = sum(tflops) / len(tflops) if tflops else None
        rows.append(row)

    def order(row: dict[str, Any]) -> tuple:
        budget = row["budget"]
        return (
            row["model"],
            row["method"] != "none",
            row["method"],
            -(budget if budget is not None else math.inf),
        )

    rows.sort(key=order)
    return {"columns": columns, "rows": rows}


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"


def markdown(table: dict[str, Any]) -> str:
    """The table as markdown: scores per benchmark, average retention, layer-average visual tokens."""
    columns = table["columns"]
    models = list(dict.fromkeys(row["model"] for row in table["rows"]))
    lines = []
    for model in models:
        if len(models) > 1 or lines:
            lines.append(f"model: {model}\n")
        lines.append(
            "| method | budget | " + " | ".join(columns) + " | avg. retention | visual tokens (layer avg.) |"
        )
        lines.append("|---|---|" + "---|" * len(columns) + "---|---|")
        for row in table["rows"]:
            if row["model"] != model:
                continue
            budget = "-" if row["budget"] is None else f"{row['budget']} ({row['budget_mode']})"
            cells = [_number(row["scores"][c]) if c in row["scores"] else "" for c in columns]
            average = row["average_retention"]
            average_text = f"{100 * average:.1f}%" if average is not None else "n/a (no method=none run)"
            tokens = f"{row['visual_tokens']:.1f}" if row["visual_tokens"] is not None else ""
            lines.append(
                f"| {row['method']} | {budget} | " + " | ".join(cells) + f" | {average_text} | {tokens} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def cmd_table(args: argparse.Namespace) -> int:
    table = build_table(read_runs(args.folders))
    if args.json:
        print(json.dumps(table, indent=1))
    else:
        print(markdown(table), end="")
    return 0


def cmd_lmms_tasks(args: argparse.Namespace) -> int:
    from ..integrations.lmms_eval import TASKS_DIR

    print(TASKS_DIR)
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``visiondrop table`` and ``visiondrop lmms-tasks``."""
    table = subparsers.add_parser(
        "table", help="lmms-eval outputs as method x budget x benchmark, with retention vs. unpruned"
    )
    table.add_argument("folders", nargs="+", metavar="DIR", help="lmms-eval --output_path folders")
    table.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    table.set_defaults(func=cmd_table)

    tasks = subparsers.add_parser(
        "lmms-tasks", help="print the folder to pass to lmms-eval --include_path (task visiondrop_pocket)"
    )
    tasks.set_defaults(func=cmd_lmms_tasks)
