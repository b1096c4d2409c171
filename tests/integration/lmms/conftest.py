"""Fixtures of the lmms-eval integration tests: offline environment, real ``python -m lmms_eval`` runs, cached.

These tests run only in ``.venv-lmms`` (``bash scripts/setup.sh lmms``); in any other environment the test module
skips on ``pytest.importorskip("lmms_eval")``. Nothing here imports lmms-eval, so the main suite collects this folder
without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass
class LmmsRun:
    """One finished ``python -m lmms_eval`` run."""

    returncode: int
    stdout: str
    stderr: str
    output: Path
    seconds: float

    @property
    def results(self) -> dict[str, Any]:
        files = sorted(self.output.rglob("*_results.json"))
        assert len(files) == 1, (
            f"expected one results file under {self.output}, found {files}\n{self.stderr[-3000:]}"
        )
        return json.loads(files[0].read_text())

    @property
    def samples(self) -> list[dict[str, Any]]:
        files = sorted(self.output.rglob("*_samples_visiondrop_pocket.jsonl"))
        assert len(files) == 1, f"expected one samples file under {self.output}, found {files}"
        rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
        return sorted(rows, key=lambda row: row["doc_id"])


@pytest.fixture(scope="session")
def lmms_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The process environment of every run: offline, HF_HOME in a temporary folder (else `datasets` tries the
    network once), one thread per process (two processes share the 2 cores in the multi-rank test)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path_factory.mktemp("hf_home")),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("LMMS_EVAL_PLUGINS", None)
    return env


@pytest.fixture(scope="session")
def testbed_path() -> Path:
    from visiondrop.testbed import DEFAULT_MODEL_PATH

    return DEFAULT_MODEL_PATH


@pytest.fixture(scope="session")
def run_lmms(
    lmms_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, testbed_path: Path
) -> Callable[..., LmmsRun]:
    """``run_lmms(model_args, batch_size, limit, ranks=1)``: run lmms-eval once per distinct call.

    ``model_args`` is appended to ``pretrained=<shipped testbed model>`` (or ``pretrained``); ``ranks > 1`` launches through
    ``torchrun --standalone --nproc_per_node ranks`` (CPU: gloo). Results are cached for the session, so tests that
    compare the same runs share them.
    """
    import time

    from visiondrop.integrations.lmms_eval import TASKS_DIR

    cache: dict[tuple, LmmsRun] = {}

    def run(
        model_args: str, batch_size: int, limit: int, ranks: int = 1, pretrained: Path | None = None
    ) -> LmmsRun:
        key = (model_args, batch_size, limit, ranks, pretrained)
        if key in cache:
            return cache[key]
        output = tmp_path_factory.mktemp("lmms_out")
        launcher = [sys.executable]
        if ranks > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        command = [
            *launcher,
            "-m",
            "lmms_eval",
            "--model",
            "visiondrop",
            "--model_args",
            f"pretrained={pretrained or testbed_path},{model_args}",
            "--include_path",
            str(TASKS_DIR),
            "--tasks",
            "visiondrop_pocket",
            "--limit",
            str(limit),
            "--batch_size",
            str(batch_size),
            "--output_path",
            str(output),
            "--log_samples",
        ]
        start = time.time()
        proc = subprocess.run(command, env=lmms_env, capture_output=True, text=True, timeout=600)
        result = LmmsRun(proc.returncode, proc.stdout, proc.stderr, output, time.time() - start)
        cache[key] = result
        return result

    return run


@pytest.fixture(scope="session")
def visiondrop_cli(lmms_env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess]:
    """``visiondrop_cli(*args)``: the ``visiondrop`` command of this environment, in a subprocess."""

    def run(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "visiondrop.tools.cli", *args]
        return subprocess.run(command, env=lmms_env, capture_output=True, text=True, timeout=600)

    return run


@pytest.fixture(scope="session")
def testbed(testbed_path: Path) -> tuple[Any, Any]:
    """The shipped model and processor, loaded once (our own code path's side of the comparisons)."""
    import torch

    from visiondrop.testbed import load_testbed

    torch.set_num_threads(2)
    return load_testbed(path=testbed_path)
