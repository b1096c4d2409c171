"""Issue 15, the API and CLI surface: every refusal is one line naming the value, exit status 2 from the CLI, no
traceback, checked before any model loads; pickle weights are never opened; every field of every registered method
is checked by type and value at construction and on assignment, and a refused assignment leaves the method as it was."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import visiondrop as vd
from conftest import BOS, make_batch
from conftest import image as image_tokens
from visiondrop.methods import available_methods, method_class
from visiondrop.testbed import DEFAULT_MODEL_PATH, load_testbed
from visiondrop.tools import cli
from visiondrop.tools.common import CLIError, parse_settings, parse_value


class _ModelLoaded(AssertionError):
    """Raised by the patched loader: the command got as far as loading a model."""


@pytest.fixture
def no_model(monkeypatch):
    """Errors must be found before the model loads: loading one fails the test."""

    def refuse(*args, **kwargs):
        raise _ModelLoaded("the model was loaded before the error was found")

    monkeypatch.setattr(cli, "load_model", refuse)


def _refused(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with one line on stderr and no traceback. Returns that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"visiondrop {argv[0]}: error: ")
    return err


# ---------------------------------------------------------------------------------------------------------------
# finding 3: safetensors only, a pickle is never opened
# ---------------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker``: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "model"
    folder.mkdir()
    for item in DEFAULT_MODEL_PATH.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    marker = tmp_path / "payload-ran"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Payload(marker)}, f)
    return folder, marker


def test_pickle_weights_are_refused_by_the_cli_in_one_line_and_never_run(tmp_path, capsys):
    folder, marker = _pickle_folder(tmp_path)
    err = _refused(["run", "--model", str(folder)], capsys)
    assert "pytorch_model.bin" in err and "safetensors" in err
    assert not marker.exists()


def test_pickle_weights_are_refused_by_load_testbed_and_never_run(tmp_path):
    folder, marker = _pickle_folder(tmp_path)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin") as err:
        load_testbed(path=folder)
    assert "\n" not in str(err.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# finding 4: CLI errors, one line, exit 2, before the model runs
# ---------------------------------------------------------------------------------------------------------------


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` (a few hundred bytes on disk)."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def test_an_image_claiming_20000_by_20000_is_refused_before_decoding(tmp_path, capsys, no_model):
    bomb = _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 1000
    err = _refused(["run", "--image", str(bomb)], capsys)
    assert "bomb.png" in err and "400000000 pixels" in err


@pytest.mark.parametrize("case", ["existing file", "under a file", "unwritable"])
def test_out_that_cannot_be_written_is_refused_before_the_model_loads(case, tmp_path, capsys, no_model):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = {"existing file": afile, "under a file": afile / "sub", "unwritable": Path("/proc/visiondrop-out")}[
        case
    ]
    err = _refused(["run", "--out", str(out)], capsys)
    assert f"--out '{out}'" in err
    assert afile.read_text() == "keep me" and not Path("/proc/visiondrop-out").exists()


@pytest.mark.parametrize("command", [["eval"], ["bench", "--layers", "1"]])
def test_json_naming_a_folder_is_refused_before_anything_runs(
    command, tmp_path, capsys, no_model, monkeypatch
):
    from visiondrop.tools import bench

    monkeypatch.setattr(
        bench, "run_bench", lambda *a, **k: pytest.fail("bench ran before --json was checked")
    )
    err = _refused([*command, "--json", str(tmp_path)], capsys)
    assert f"--json '{tmp_path}': is a folder" in err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--method", "fastv", "--set", "layer=abc"], ["FastV.layer", "'abc'"]),
        (["--method", "fastv", "--set", "layer=true"], ["FastV.layer", "True"]),
        (["--set", "keep_cls=1"], ["VisionDrop.keep_cls", "1"]),
        (["--set", "budget=32"], ["budget=32", "--budget"]),
        (["--set", "budget_mode=input"], ["budget_mode=input", "--budget-mode"]),
        (["--method", "pyramiddrop", "--set", "ratio=abc"], ["PyramidDrop.ratio", "'abc'"]),
        (["--set", "stages=5"], ["VisionDrop.stages", "got 5"]),
        (["--set", "boundaries=3"], ["VisionDrop.boundaries", "got 3"]),
        (["--question", ""], ["--question ''"]),
        (["--dtype", "int8"], ["--dtype 'int8'"]),
    ],
)
def test_run_refuses_bad_values_naming_them_before_the_model_loads(argv, needles, capsys, no_model):
    err = _refused(["run", *argv], capsys)
    assert all(n in err for n in needles), err


def test_eval_refuses_an_empty_budget_list(capsys, no_model):
    assert "--budgets ','" in _refused(["eval", "--budgets", ","], capsys)


def test_a_schedule_message_never_prints_the_internal_placeholder_size():
    with pytest.raises(ValueError) as err:
        vd.build("visiondrop", stages=[(54, 10), (8, 100, 5)])
    message = str(err.value)
    assert "1073741824" not in message and "after L8: 105 (100+5)" in message and "\n" not in message


def test_a_malformed_stage_is_named():
    with pytest.raises(TypeError, match=r"stages\[1\]=5") as err:
        vd.build("visiondrop", stages=[(54, 10), 5])
    assert "not iterable" not in str(err.value)


def test_the_assisted_decoding_refusal_is_one_short_line(llava):
    batch = make_batch([[BOS, *image_tokens(), 5]])
    method = vd.build("fastv", budget=16, budget_mode="input")
    refusal = pytest.raises(ValueError, match="assistant_model=<LlavaForConditionalGeneration>")
    with torch.no_grad(), method.apply(llava), refusal as err:
        llava.generate(**batch, assistant_model=llava, max_new_tokens=2, do_sample=False)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


def test_the_default_question_on_a_user_image_is_in_the_testbed_vocabulary(tmp_path, capsys, caplog):
    path = tmp_path / "scene.png"
    Image.new("RGB", (64, 48), (20, 90, 200)).save(path)
    with caplog.at_level(logging.WARNING):
        assert cli.main(["run", "--image", str(path), "--max-new-tokens", "2"]) == 0
    assert "outside the testbed vocabulary" not in caplog.text
    assert f"question: {cli.DEFAULT_QUESTION}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# finding 5: every field of every method, at construction and on assignment
# ---------------------------------------------------------------------------------------------------------------


def _bad_values(method: vd.PruningMethod, field: dataclasses.Field) -> list[object]:
    """Values of the wrong type (or, for choices, the wrong value) for ``field``, from its default."""
    default = getattr(method, field.name)
    bad: list[object] = [object(), b"bytes"]
    if isinstance(default, bool):
        bad += [1, "true", None]
    elif isinstance(default, int) or field.name == "budget":
        bad += [True, "3", None]
    elif isinstance(default, str):
        bad += [1, None, "no-such-choice"]
    elif default is None:
        bad += ["no-such-value"]
    return bad


def _fields():
    for name in available_methods():
        cls = method_class(name)
        for field in dataclasses.fields(cls):
            yield pytest.param(name, field.name, id=f"{name}.{field.name}")


@pytest.mark.parametrize(("name", "field_name"), list(_fields()))
def test_every_field_is_checked_at_construction_and_on_assignment(name, field_name):
    method = vd.build(name)
    cls = type(method)
    field = next(f for f in dataclasses.fields(cls) if f.name == field_name)
    before = dataclasses.asdict(method)
    for value in _bad_values(method, field):
        if field.init:
            with pytest.raises((TypeError, ValueError)) as err:
                vd.build(name, **{field_name: value})
            message = str(err.value)
            assert "\n" not in message and cls.__name__ in message and repr(value) in message, message
        with pytest.raises((TypeError, ValueError)) as err:
            setattr(method, field_name, value)
        message = str(err.value)
        assert "\n" not in message and cls.__name__ in message and repr(value) in message, message
        assert dataclasses.asdict(method) == before  # a refused assignment changes nothing


def _init_fields():
    for name in available_methods():
        for field in dataclasses.fields(method_class(name)):
            if field.init and field.name not in ("budget", "budget_mode"):  # those two have their own flags
                yield pytest.param(name, field.name, id=f"{name}.{field.name}")


@pytest.mark.parametrize(("name", "field_name"), list(_init_fields()))
def test_every_field_given_a_wrong_value_through_set_is_refused_naming_it(name, field_name, capsys, no_model):
    err = _refused(["run", "--method", name, "--set", f"{field_name}=no-such-value"], capsys)
    assert field_name in err and "no-such-value" in err


def test_booleans_are_not_ints_and_sequences_are_stored_as_tuples():
    with pytest.raises(TypeError, match=r"FastV\.layer .*True"):
        vd.build("fastv", layer=True)
    method = vd.build("visiondrop", boundaries=[2, 4])
    assert method.boundaries == (2, 4)
    method.boundaries = [3, 5]
    assert method.boundaries == (3, 5)
    with pytest.raises(TypeError, match=r"VisionDrop\.boundaries .*'8'"):
        method.boundaries = ["8"]
    assert method.boundaries == (3, 5)


def test_a_valid_assignment_takes_effect():
    method = vd.build("fastv", budget=32)
    method.layer = 3
    method.budget = 0.5
    assert (method.layer, method.budget) == (3, 0.5)
    assert method.schedule(576, 32).stages[1].layer == 3


# ---------------------------------------------------------------------------------------------------------------
# the one key=value parser
# ---------------------------------------------------------------------------------------------------------------


def test_one_set_of_key_value_rules():
    assert parse_settings("layer=3,merge=mean,debias=TRUE,ratio=0.5,boundaries=8,16,24") == {
        "layer": 3,
        "merge": "mean",
        "debias": True,
        "ratio": 0.5,
        "boundaries": (8, 16, 24),
    }
    assert parse_settings("boundaries=") == {"boundaries": ()}
    assert parse_settings("stages=54/10,8/30/5") == {"stages": ((54, 10), (8, 30, 5))}
    assert parse_settings("score=visual:boundaries=8/16", separator=":") == {
        "score": "visual",
        "boundaries": (8, 16),
    }
    assert parse_value("none") is None and parse_value("1e-3") == 0.001 and parse_value("-2") == -2
    for bad in ["layer", "=3", "score=a,score=b", "budget=3"]:
        with pytest.raises(CLIError):
            parse_settings(bad)


def test_eval_specs_and_run_set_give_the_same_method():
    from visiondrop.tools.evaluation import parse_method_spec

    spec = parse_method_spec("visiondrop:boundaries=8/16:merge=mean")
    assert spec.build(64, "average") == vd.build(
        "visiondrop", budget=64, **parse_settings("boundaries=8,16,merge=mean")
    )


# ---------------------------------------------------------------------------------------------------------------
# README "Guarantees": no network at run time, same answer in another process, one line from a real process
# ---------------------------------------------------------------------------------------------------------------


def test_the_cli_opens_no_network_connection(monkeypatch, capsys):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access at run time: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert cli.main(["run", "--method", "visiondrop", "--max-new-tokens", "2"]) == 0
    assert "visiondrop (budget 64, average):" in capsys.readouterr().out


def _cli_process(*argv: str, threads: str = "1") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    env.pop("VISIONDROP_DEBUG", None)
    code = "import sys; from visiondrop.tools.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300, check=False
    )


def test_another_process_with_other_threads_gives_the_same_pruned_answer_and_report(capsys):
    argv = ["run", "--method", "random", "--seed", "3", "--max-new-tokens", "3"]
    assert cli.main(argv) == 0
    here = capsys.readouterr().out
    there = _cli_process(*argv, threads="2")
    assert there.returncode == 0, there.stderr
    assert there.stdout == here


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    bomb = _png_claiming(tmp_path / "bomb.png", 20000, 20000)
    done = _cli_process("run", "--image", str(bomb))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if line.startswith("visiondrop run: error: --image")
    ]
    assert len(done.stderr.strip().splitlines()) == 1
