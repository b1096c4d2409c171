"""`visiondrop table`: lmms-eval results files -> method x budget x benchmark with retention (no lmms-eval needed).

The files are written in the layout lmms-eval 0.7.3 writes (checked end to end against real runs in
tests/integration/lmms); here the arithmetic and the errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from visiondrop.tools.cli import main
from visiondrop.tools.table import build_table, read_runs


def _write(folder, name, model_args, results, tokens=None, date="1"):
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "config": {"model": "visiondrop", "model_args": model_args},
        "results": {task: {f"{metric},none": value for metric, value in metrics.items()} for task, metrics in results.items()},
        "throughput": {"avg_visiondrop_visual_tokens_layer_average": tokens} if tokens is not None else {},
        "date": date,
    }  # fmt: skip
    for metrics in data["results"].values():
        metrics.update({f"{k.split(',')[0]}_stderr,none": 0.01 for k in list(metrics)})
    (folder / f"{name}_results.json").write_text(json.dumps(data))


def test_retention_per_benchmark_and_average(tmp_path):
    _write(tmp_path / "a", "x", "pretrained=m,method=none", {"gqa": {"exact_match": 0.60}, "mme": {"perception": 1500.0, "cognition": 300.0}}, 576)  # fmt: skip
    _write(tmp_path / "b", "y", "pretrained=m,method=visiondrop,budget=64", {"gqa": {"exact_match": 0.54}, "mme": {"perception": 1200.0, "cognition": 330.0}}, 64)  # fmt: skip
    table = build_table(read_runs([tmp_path]))
    rows = {row["method"]: row for row in table["rows"]}
    assert table["columns"] == ["gqa", "mme:perception", "mme:cognition"]
    pruned = rows["visiondrop"]
    assert pruned["budget"] == 64 and pruned["budget_mode"] == "average"
    assert pruned["retention"]["gqa"] == pytest.approx(0.9)
    # MME counts once: the mean of its two metrics' retentions (0.8 and 1.1), then the mean over benchmarks.
    assert pruned["average_retention"] == pytest.approx((0.9 + (0.8 + 1.1) / 2) / 2)
    assert rows["none"]["average_retention"] == pytest.approx(1.0)
    assert pruned["visual_tokens"] == 64


def test_method_fields_make_their_own_rows_and_models_are_kept_apart(tmp_path):
    _write(tmp_path, "a", "pretrained=m,method=none", {"pope": {"f1": 0.8}})
    _write(tmp_path, "b", "pretrained=m,method=visiondrop,budget=64,score=visual", {"pope": {"f1": 0.4}})
    _write(tmp_path, "c", "pretrained=other,method=visiondrop,budget=64", {"pope": {"f1": 0.7}})
    rows = build_table(read_runs([tmp_path]))["rows"]
    labelled = {(row["model"], row["method"]): row for row in rows}
    assert labelled[("m", "visiondrop:score=visual")]["average_retention"] == pytest.approx(0.5)
    assert labelled[("other", "visiondrop")]["average_retention"] is None  # no unpruned run of that model


def test_cli_markdown_json_and_errors(tmp_path, capsys):
    _write(tmp_path, "a", "pretrained=m,method=none", {"pope": {"f1": 0.8}})
    _write(tmp_path, "b", "pretrained=m,method=fastv,budget=128", {"pope": {"f1": 0.6}})
    assert main(["table", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fastv | 128 (average) | 0.6 | 75.0% |" in out
    assert main(["table", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["columns"] == ["pope"]
    assert main(["table", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["table", str(empty)]) == 2
    assert "no lmms-eval results" in capsys.readouterr().err


def test_lmms_tasks_prints_the_task_folder(capsys):
    assert main(["lmms-tasks"]) == 0
    folder = capsys.readouterr().out.strip()
    assert (Path(folder) / "visiondrop_pocket" / "visiondrop_pocket.yaml").is_file()
