"""``visiondrop serve-bench``'s parts that run without vLLM: percentiles, refusals before any engine starts, the CLI.

The benchmark itself runs two vLLM engines (minutes); ``results/serve_bench_pocket_cpu.json`` is its output.
"""

from __future__ import annotations

import numpy as np
import pytest

import visiondrop as vd
from visiondrop.tools import cli
from visiondrop.tools.serve_bench import percentile, run_serve_bench


@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_is_numpys_linear(q):
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.05]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"method": vd.build("fastv", budget=64)}, "method='fastv'"),
        ({"method": vd.build("visiondrop", budget=64)}, "boundaries=None"),
        ({"method": vd.build("vscan", budget=64)}, "method='vscan'"),
        ({"method": vd.build("visionzip", budget=64), "n": 0}, "n=0"),
        ({"method": vd.build("visionzip", budget=64), "concurrency": (4, 0)}, "concurrency=(4, 0)"),
        ({"method": vd.build("visionzip", budget=64), "model": "/nonexistent"}, "model='/nonexistent'"),
    ],
)
def test_bad_settings_refused_before_any_engine(kwargs, named):
    with pytest.raises(ValueError) as caught:
        run_serve_bench(**kwargs)
    assert named in str(caught.value) and "\n" not in str(caught.value)


def test_cli_registers_serve_bench(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["serve-bench", "--help"])
    assert done.value.code == 0
    assert "--concurrency" in capsys.readouterr().out


def test_cli_refuses_in_llm_method_with_one_line(capsys):
    assert cli.main(["serve-bench", "--method", "pyramiddrop", "--set", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("visiondrop serve-bench: error:") and "pyramiddrop" in err and "\n" not in err


def test_an_architecture_the_plugin_does_not_run_is_refused_before_any_engine(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["InternVLForConditionalGeneration"]}')
    with pytest.raises(ValueError) as caught:
        run_serve_bench(tmp_path, vd.build("visionzip", budget=64))
    assert "architecture='InternVLForConditionalGeneration'" in str(caught.value)
    assert "\n" not in str(caught.value)
