"""The eval harness: method specs, result rows and tables (the runs themselves are exercised in test_testbed)."""

from __future__ import annotations

import pytest

import visiondrop as vd
from visiondrop.tools.evaluation import MethodSpec, markdown_tables, parse_method_spec, parse_value


def test_values_and_specs_parse():
    assert parse_value("true") is True and parse_value("12") == 12 and parse_value("0.5") == 0.5
    assert parse_value("") == () and parse_value("8/16") == (8, 16) and parse_value("mean") == "mean"
    spec = parse_method_spec("visiondrop:score=visual:boundaries=")
    assert spec == MethodSpec("visiondrop", (("score", "visual"), ("boundaries", ())))
    assert spec.label == "visiondrop:score=visual:boundaries="
    method = spec.build(64, "average")
    assert isinstance(method, vd.VisionDrop) and method.score == "visual" and method.boundaries == ()
    assert method.schedule(576, 32).counts() == [64]  # vision stage only: the average is the input count
    assert parse_method_spec("FastV:layer=1").build(64, "input").layer == 1


@pytest.mark.parametrize(
    ("text", "needle"), [("fastvv", "unknown method 'fastvv'"), ("fastv:layer", "key=value")]
)
def test_bad_specs_name_the_problem(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_method_spec(text)


def test_tables_show_retention_and_explain_missing_cells():
    base = {
        "method": "none",
        "budget": None,
        "budget_mode": None,
        "accuracy": 0.8,
        "n": 10,
        "per_type": {"color": 0.9, "count": 0.7},
        "retention": 1.0,
    }
    rows = [
        base,
        {
            "method": "visiondrop",
            "budget": 64,
            "budget_mode": "average",
            "accuracy": 0.76,
            "n": 10,
            "per_type": {"color": 0.9, "count": 0.62},
            "retention": 0.95,
            "schedule": {"layer_average": 64.0},
        },
        {"method": "fastv", "budget": 64, "budget_mode": "average", "error": "out of reach (lowest: 144.0)"},
    ]
    table = markdown_tables(rows)
    assert "| visiondrop | 0.760 ± 0.135 (95.0%, avg 64) |" in table  # sqrt(0.76 * 0.24 / 10)
    assert "| fastv | n/a [1] |" in table and "[1] fastv at 64: out of reach (lowest: 144.0)" in table
    assert "| none | - | 0.900 | 0.700 |" in table


def test_eval_compares_every_method_under_each_position_policy(tmp_path, capsys):
    import json

    from visiondrop.tools.cli import main

    out = tmp_path / "eval.json"
    argv = ["eval", "--methods", "divprune,visiondrop:positions=compact", "--budgets", "64", "--n", "6"]
    assert main([*argv, "--positions", "preserve,compact", "--json", str(out), "--quiet"]) == 0
    capsys.readouterr()
    rows = json.loads(out.read_text())["results"][1:]
    got = [(r["method"], r["positions"]) for r in rows]
    assert got == [
        ("divprune:positions=preserve", "preserve"),
        ("visiondrop:positions=compact", "compact"),  # a spec that fixes its policy runs once, as given
        ("divprune:positions=compact", "compact"),
    ]
    for r in rows:
        assert r["stderr"] == pytest.approx((r["accuracy"] * (1 - r["accuracy"]) / 6) ** 0.5)
    assert main([*argv, "--positions", "preserve,shifted"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--positions 'preserve,shifted': use a comma-separated list of auto, compact, preserve" in err
