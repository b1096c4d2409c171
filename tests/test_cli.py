"""The command line on the shipped testbed model: the README's main job, its picture, and its errors."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from visiondrop import VisionDrop
from visiondrop.testbed import DEFAULT_MODEL_PATH
from visiondrop.tools.cli import main, methods_table


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    assert capsys.readouterr().out.strip() == methods_table()


def test_run_answers_unpruned_and_pruned_and_draws_what_was_kept(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--budget", "64"]) == 0
    out = capsys.readouterr().out
    assert "unpruned:" in out and "visiondrop (budget 64, average):" in out and "prefill FLOPs" in out
    report = json.loads((tmp_path / "report.json").read_text())
    image = report["samples"][0]["images"][0]
    assert image["image_tokens"] == 576 and image["layer_average"] == pytest.approx(64, abs=0.5)
    layers = json.loads((DEFAULT_MODEL_PATH / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert image["counts"] == VisionDrop(budget=64).schedule(576, layers).counts()
    picture = Image.open(tmp_path / "kept.png")
    assert picture.width > 4 * 336 and picture.height > 336


def test_run_on_a_user_image_with_another_method(tmp_path, capsys):
    path = tmp_path / "scene.png"
    Image.new("RGB", (400, 300), (200, 40, 40)).save(path)
    assert (
        main(["run", "--image", str(path), "--question", "what color is the square?", "--method", "pooling"])
        == 0
    )
    assert "pooling (budget 64, average):" in capsys.readouterr().out


def test_words_outside_the_vocabulary_are_warned_about(caplog, capsys):
    with caplog.at_level(logging.WARNING):
        assert main(["run", "--question", "what colour is the zeppelin?"]) == 0
    assert "colour" in caplog.text and "zeppelin" in caplog.text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--image", "no/such/file.png"], "--image 'no/such/file.png': no such file"),
        (["run", "--budget", "577"], "budget=577 is more than the 576 visual tokens"),
        (["run", "--budget", "0"], "budget must be > 0"),
        (["run", "--budget", "abc"], "--budget 'abc': give a token count (e.g. 64) or a fraction"),
        (["run", "--method", "fastvv"], "unknown method 'fastvv'"),
        (["run", "--set", "positions"], "--set 'positions': use key=value"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_an_unreadable_image_is_refused(tmp_path, capsys):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image at all")
    assert main(["run", "--image", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--image '{path}': not a readable image" in err and "\n" not in err


def test_eval_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "eval.json"
    argv = [
        "eval",
        "--methods",
        "visiondrop,fastv",
        "--budgets",
        "192,64",
        "--n",
        "12",
        "--json",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert results[0]["method"] == "none" and results[0]["n"] == 12
    keys = {"method", "budget", "budget_mode", "accuracy", "n", "per_type"}
    assert all(keys <= set(r) for r in results if "error" not in r)
    assert {(r["method"], r["budget"]) for r in results[1:]} == {
        (m, b) for m in ("visiondrop", "fastv") for b in (192, 64)
    }
    assert "retention vs. unpruned" in table
    # per-sample correctness for paired comparisons: it adds up to each accuracy
    from visiondrop.tools.evaluation import paired_difference

    rows = [r for r in results if "error" not in r]
    for r in rows:
        assert len(r["correct"]) == 12 and set(r["correct"]) <= {0, 1}
        assert sum(r["correct"]) / 12 == pytest.approx(r["accuracy"])
    base, pruned = rows[0], rows[-1]
    diff, se = paired_difference(base, pruned)
    assert diff == pytest.approx(pruned["accuracy"] - base["accuracy"])
    assert paired_difference(base, base) == (0.0, 0.0)
    assert se >= 0
