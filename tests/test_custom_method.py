"""docs/custom_method.md: its method, taken from the page and run end to end (library, shared tests, CLI)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import test_methods
import test_positions
import visiondrop as vd
from conftest import N_TOKENS, RAGGED, generate, make_batch, model_state
from visiondrop.methods import base
from visiondrop.tools.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "custom_method.md"


def _method_source() -> str:
    """The page's first Python block: the complete method."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert blocks and "@register" in blocks[0]
    return blocks[0]


@pytest.fixture
def normprune(monkeypatch):
    """Run the page's code in a fresh module; the registry is restored afterwards."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    module = types.ModuleType("custom_method_doc")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(_method_source(), str(DOC), "exec"), module.__dict__)
    return module.NormPrune


def test_the_page_method_is_about_30_lines():
    lines = [line for line in _method_source().splitlines() if line.strip()]
    assert 20 <= len(lines) <= 40


def test_the_documented_method_builds_applies_generates_and_reports(normprune, llava):
    assert "normprune" in vd.available_methods()
    method = vd.build("normprune", budget=24, p=1.0)
    assert isinstance(method, normprune) and method.positions == "auto"
    batch = make_batch(RAGGED)
    before = model_state(llava)
    with method.apply(llava) as run:
        cached = generate(llava, batch)
        assert torch.equal(generate(llava, batch, use_cache=False), cached)
    assert model_state(llava) == before
    assert [len(s.images) for s in run.report.samples] == [1, 2, 0]
    with torch.no_grad():
        states = llava.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states
    features = states[llava.config.vision_feature_layer][:, 1:]  # the feature layer, [CLS] left out
    for im, image in zip(run.report.images, features, strict=True):
        assert im.counts() == [24]
        assert im.stages[0].kept_patches() == sorted(image.norm(p=1.0, dim=-1).topk(24).indices.tolist())
    with pytest.raises(ValueError, match="p must be > 0, got 0"):
        vd.build("normprune", p=0)
    with (
        pytest.raises(ValueError, match="budget=99 is more than the 64 visual tokens"),
        vd.build("normprune", budget=99).apply(llava),
    ):
        pass
    assert model_state(llava) == before


def test_keeping_everything_is_bit_identical(normprune, llava):
    batch = make_batch(RAGGED)
    with torch.no_grad():
        reference = llava(**batch).logits
        with vd.build("normprune", budget=1.0).apply(llava):
            assert torch.equal(llava(**batch).logits, reference)


def test_the_shared_tests_run_it_by_name(normprune, llava):
    """The matrix and the position tests take any registered name."""
    test_methods.test_every_method_in_a_padded_batch(llava, "normprune", 24)
    test_methods.test_input_budget_mode_fixes_the_count_at_the_first_pruning_point("normprune")
    for policy in ("preserve", "compact"):
        test_positions.test_every_method_passes_the_positions_its_policy_says(llava, "normprune", policy)
    assert N_TOKENS == 64


def test_the_cli_runs_it_on_the_shipped_model(normprune, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--method", "normprune", "--budget", "64", "--set", "p=1.5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "normprune (budget 64, average)" in text and (out / "kept.png").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "normprune" and report["settings"]["p"] == 1.5
    assert report["samples"][0]["images"][0]["counts"] == [64]


def test_the_cli_loads_it_as_a_plugin_file_for_eval(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    plugin = tmp_path / "normprune.py"
    plugin.write_text(_method_source())
    out = tmp_path / "eval.json"
    argv = ["--plugin", str(plugin), "eval", "--methods", "normprune", "--budgets", "64", "--n", "4"]
    assert main([*argv, "--json", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["none", "normprune"] and rows[1]["schedule"]["input"] == 64
    capsys.readouterr()
    assert main(["--plugin", str(tmp_path / "missing.py"), "methods"]) == 2
    assert "--plugin" in capsys.readouterr().err
