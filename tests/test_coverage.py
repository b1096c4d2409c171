"""Object coverage: which scene objects keep a dominant patch after each stage (visiondrop.testbed.coverage)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from visiondrop import VisionDrop
from visiondrop.testbed import load_testbed
from visiondrop.testbed import scenes as S
from visiondrop.testbed.coverage import main, measure, object_coverage


def _stage(patches: list[int]) -> SimpleNamespace:
    return SimpleNamespace(name="vision", tokens=len(patches), kept_patches=lambda: list(patches))


def _colour_patches(sample: S.Sample) -> dict[int, list[int]]:
    labels = S.patch_labels(sample.scene)["color"].reshape(-1)
    return {int(c): np.flatnonzero(labels == c).tolist() for c in np.unique(labels[labels > 0])}


def test_object_coverage_counts_objects_with_a_kept_patch() -> None:
    sample = next(s for s in S.make_split("test", 60) if len(_colour_patches(s)) >= 3)
    by_colour = _colour_patches(sample)
    n = len(by_colour)
    first, second = list(by_colour.values())[:2]
    background = [p for p in range(576) if all(p not in v for v in by_colour.values())][:5]
    report = SimpleNamespace(
        stages=[
            _stage(list(range(576))),  # everything kept
            _stage(first[:1] + second + background),  # one patch of one object, all of another, background
            _stage(background),  # no object
            _stage([]),
        ]
    )
    assert object_coverage(sample, report) == [(n, n), (2, n), (0, n), (0, n)]


@pytest.fixture(scope="module")
def shipped() -> tuple[object, object]:
    torch.set_num_threads(2)
    return load_testbed()


def test_nothing_pruned_covers_every_object_and_changes_no_answer(shipped: tuple[object, object]) -> None:
    model, processor = shipped
    samples = [s for s in S.make_split("test", 48) if s.qtype == "count"]
    assert len(samples) == 8
    result = measure(model, processor, samples, VisionDrop(budget=576), batch_size=4)
    assert [s["coverage"] for s in result["stages"]] == [1.0] * 4  # four stages that keep everything
    assert {s["tokens"] for s in result["stages"]} == {576}
    assert result["accuracy"]["pruned"] == result["accuracy"]["unpruned"]
    assert result["answers"]["pruned"] == result["answers"]["unpruned"]
    assert sum(result["answers"]["unpruned"].values()) == 8


def test_cli_reports_every_stage_and_writes_json(tmp_path, capsys, shipped) -> None:
    out = tmp_path / "cov.json"
    result = main(["--budget", "64", "--type", "where", "--n", "24", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [s["name"] for s in result["stages"]] == ["vision", "after L2", "after L4", "after L6"]
    assert [s["tokens"] for s in result["stages"]] == [97, 71, 52, 36]  # the published 64-token schedule
    coverage = [s["coverage"] for s in result["stages"]]
    assert all(0 < c <= 1 for c in coverage)
    assert coverage == sorted(coverage, reverse=True)  # a later stage only removes patches
    printed = capsys.readouterr().out
    assert "4 'where' questions" in printed and "after L6 (36 tokens)" in printed


def test_cli_refuses_an_empty_selection() -> None:
    with pytest.raises(SystemExit, match="no 'count' questions among the first 2 samples"):
        main(["--n", "2"])
