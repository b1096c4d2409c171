"""``visiondrop demo``'s work without the page (no gradio needed): answers as ``visiondrop run`` gives them, errors.

The page itself is tested in a real browser in ``tests/integration/demo/`` (``bash scripts/setup.sh demo``).
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from PIL import Image

from conftest import model_state
from visiondrop.testbed import make_sample
from visiondrop.tools.cli import CLIError, load_model, main
from visiondrop.tools.demo import INSTALL_HINT, NO_METHOD, DemoSession


@pytest.fixture(scope="module")
def session():
    model, processor = load_model(None)
    return DemoSession(model, processor, testbed=True)


def _run_answers(capsys, argv: list[str]) -> tuple[str, str]:
    """``visiondrop run``'s unpruned and pruned answers, read from its printout."""
    assert main(["run", *argv]) == 0
    out = capsys.readouterr().out
    unpruned = re.search(r"^unpruned: (.*)$", out, re.M).group(1).strip()
    pruned = re.search(r"^\w+ \(budget [^)]*\): (.*)$", out, re.M).group(1).strip()
    return unpruned, pruned


def test_a_scene_is_answered_as_visiondrop_run_answers_it(session, capsys):
    image, question, answer = session.scene(2)
    sample = make_sample("test", 2)
    assert question == sample.question and answer == sample.answer
    outcome = session.ask(
        image, question, [("visiondrop", "64", "average", ""), ("fastv", "0.5", "input", "layer=3")]
    )
    assert (outcome.unpruned, outcome.methods[0].answer) == _run_answers(
        capsys, ["--seed", "2", "--budget", "64"]
    )
    fastv = _run_answers(
        capsys,
        ["--seed", "2", "--method", "fastv", "--budget", "0.5", "--budget-mode", "input", "--set", "layer=3"],
    )
    assert (outcome.unpruned, outcome.methods[1].answer) == fastv
    # The report is the run's: VisionDrop at an average budget of 64 averages 64 tokens over the layers; FastV at
    # input 0.5 keeps 288 of 576 tokens after layer 3.
    first, second = (m.report.images[0] for m in outcome.methods)
    assert first.image_tokens == 576 and first.layer_average == pytest.approx(64, abs=0.5)
    assert second.final_count == 288 and second.stages[-1].layer == 3
    # The picture has one panel per stage plus the input's.
    assert outcome.methods[0].picture.width > (len(first.stages) + 1) * 336
    text = outcome.summary()
    assert "| **visiondrop** (budget 64, average) |" in text and "fewer" in text and "schedule (576" in text


def test_an_uploaded_file_is_read_like_visiondrop_run_reads_it(session, capsys, tmp_path):
    path = tmp_path / "scene.png"
    sample = make_sample("test", 5)
    sample.image.save(path)
    outcome = session.ask(session.open_image(str(path)), sample.question, [("pooling", "64", "average", "")])
    run = _run_answers(capsys, ["--image", str(path), "--question", sample.question, "--method", "pooling"])
    assert (outcome.unpruned, outcome.methods[0].answer) == run


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"image": None}, "no image: upload one or pick a generated scene"),
        ({"image": "not_an_image.png"}, "image 'not_an_image.png': not a readable image"),
        ({"question": "  "}, "no question: type one"),
        ({"budget": "577"}, "budget=577 is more than the 576 visual tokens"),
        ({"budget": "0"}, "budget must be > 0"),
        ({"budget": "lots"}, "--budget 'lots': give a token count"),
        ({"fields": "colour=red"}, "visiondrop has no field(s) colour"),
        ({"fields": "positions"}, "--set 'positions': use key=value"),
        ({"method": "fastvv"}, "method 'fastvv': not in the registry"),
        ({"method": NO_METHOD}, "method '(none)': not in the registry"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_model_as_it_was(session, tmp_path, change, needle):
    (tmp_path / "not_an_image.png").write_text("this is text")
    request = {
        "image": "scene",
        "question": "what color is the star?",
        "method": "visiondrop",
        "budget": "64",
    }
    request["fields"] = ""
    request.update(change)
    before = model_state(session.model)
    with pytest.raises((ValueError, TypeError, CLIError)) as err:
        if request["image"] == "scene":
            image = session.scene(0)[0]
        else:
            image = session.open_image(None if request["image"] is None else str(tmp_path / request["image"]))
        session.ask(
            image, request["question"], [(request["method"], request["budget"], "average", request["fields"])]
        )
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert model_state(session.model) == before
    # The next request is served as usual.
    image, question, _ = session.scene(0)
    assert session.ask(image, question, [("visiondrop", "64", "average", "")]).methods[0].answer


@pytest.mark.parametrize("seed", [-1, 1.5, None])
def test_a_scene_seed_must_be_a_whole_number(seed):
    with pytest.raises(ValueError, match="scene seed"):
        DemoSession.scene(seed)


@pytest.mark.skipif(importlib.util.find_spec("gradio") is not None, reason="gradio is installed here")
def test_without_gradio_the_command_says_how_to_install_it(capsys):
    assert main(["demo", "--port", "1"]) == 2
    assert INSTALL_HINT in capsys.readouterr().err


def test_a_picture_of_an_odd_sized_upload(session, tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (500, 200), (30, 90, 200)).save(path)
    outcome = session.ask(
        session.open_image(str(path)), "what color is the square?", [("divprune", "32", "input", "")]
    )
    assert outcome.methods[0].report.images[0].final_count == 32
    assert outcome.methods[0].picture.height > 336
