"""lmms-eval end to end: the real ``python -m lmms_eval`` CLI, offline, on the shipped pocket model and task.

Every run is compared with visiondrop's own code path on the same samples (``visiondrop.testbed.evaluate`` under
``vd.build(...).apply(model)``, and the ``visiondrop eval`` command for retention).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lmms_eval")

import visiondrop as vd
from visiondrop.testbed import evaluate, first_word, make_split

# The first N test samples of seed 0, at batch size 4: 20-45 s per run on the shared 2-core machine.
N_SAMPLES = 20
BATCH = 4
PRUNED = "method=visiondrop,budget=64"


def _ok(run) -> None:
    assert run.returncode == 0, f"lmms_eval failed ({run.returncode}):\n{run.stderr[-4000:]}"


def _answers(run) -> list[str]:
    samples = run.samples
    assert [s["doc_id"] for s in samples] == list(range(N_SAMPLES))
    return [
        first_word(s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0])
        for s in samples
    ]


@pytest.fixture(scope="module")
def ours(testbed):
    """Our code path on the same samples, at the same batch size: unpruned and visiondrop at 64."""
    model, processor = testbed
    samples = make_split("test", N_SAMPLES, seed=0)
    unpruned = evaluate(model, processor, samples, batch_size=BATCH, progress=False)
    with vd.build("visiondrop", budget=64).apply(model) as run:
        pruned = evaluate(model, processor, samples, batch_size=BATCH, progress=False)
    return {"samples": samples, "none": unpruned, "visiondrop": pruned, "last_report": run.report}


def test_unpruned_answers_equal_our_evaluation(run_lmms, ours):
    run = run_lmms("method=none", BATCH, N_SAMPLES)
    _ok(run)
    assert _answers(run) == ours["none"]["predictions"]
    accuracy = run.results["results"]["visiondrop_pocket"]["accuracy,none"]
    assert accuracy == pytest.approx(ours["none"]["accuracy"])
    # method=none prunes nothing: every sample keeps all 576 visual tokens at every layer.
    for sample in run.samples:
        counts = sample["token_counts"][0]
        assert counts["visual_tokens_input"] == counts["visual_tokens_final"] == 576


def test_pruned_answers_counts_and_flops_equal_our_evaluation(run_lmms, ours):
    run = run_lmms(PRUNED, BATCH, N_SAMPLES)
    _ok(run)
    assert _answers(run) == ours["visiondrop"]["predictions"]
    # The last chunk (samples N-4..N-1) is the last call our run made: same kept counts per sample, and the
    # per-sample FLOPs add up to the report's batch total.
    report = ours["last_report"]
    logged = [s["token_counts"][0] for s in run.samples[-BATCH:]]
    for mine, row in zip(report.samples, logged, strict=True):
        assert row["visual_tokens_input"] == mine.input_count
        assert row["visual_tokens_layer_average"] == pytest.approx(mine.layer_average)
        assert row["visual_tokens_final"] == mine.final_count
    assert sum(row["prefill_tflops"] for row in logged) == pytest.approx(report.flops["tflops"], rel=1e-9)
    # Means over the run go into the results file.
    throughput = run.results["throughput"]
    every = [s["token_counts"][0] for s in run.samples]
    for key in (
        "visual_tokens_input",
        "visual_tokens_layer_average",
        "visual_tokens_final",
        "prefill_tflops",
    ):
        assert throughput[f"avg_visiondrop_{key}"] == pytest.approx(sum(r[key] for r in every) / len(every))
    assert throughput["avg_visiondrop_visual_tokens_layer_average"] < 576


def test_batch_size_one_agrees_with_four(run_lmms):
    one, four = run_lmms(PRUNED, 1, N_SAMPLES), run_lmms(PRUNED, BATCH, N_SAMPLES)
    _ok(one)
    _ok(four)
    assert _answers(one) == _answers(four)
    for a, b in zip(one.samples, four.samples, strict=True):
        ca, cb = a["token_counts"][0], b["token_counts"][0]
        assert ca["visual_tokens_layer_average"] == pytest.approx(cb["visual_tokens_layer_average"])
        assert ca["prefill_tflops"] == pytest.approx(cb["prefill_tflops"], rel=1e-9)


def test_two_ranks_with_torchrun_agree(run_lmms):
    single, double = run_lmms(PRUNED, BATCH, N_SAMPLES), run_lmms(PRUNED, BATCH, N_SAMPLES, ranks=2)
    _ok(double)
    assert double.results["throughput"]["avg_visiondrop_ranks"] == 2  # really two processes
    assert _answers(double) == _answers(single)
    # The means in the results cover both ranks' samples, not rank 0's half.
    assert double.results["throughput"]["avg_visiondrop_samples"] == N_SAMPLES
    assert double.results["throughput"]["avg_visiondrop_prefill_tflops"] == pytest.approx(
        single.results["throughput"]["avg_visiondrop_prefill_tflops"], rel=1e-9
    )


def test_table_gives_the_retention_visiondrop_eval_prints(run_lmms, visiondrop_cli, tmp_path):
    none, pruned = run_lmms("method=none", BATCH, N_SAMPLES), run_lmms(PRUNED, BATCH, N_SAMPLES)
    _ok(none)
    _ok(pruned)
    report = tmp_path / "eval.json"
    evaluated = visiondrop_cli(
        "eval", "--methods", "visiondrop", "--budgets", "64", "--n", str(N_SAMPLES),
        "--batch-size", str(BATCH), "--quiet", "--json", str(report),
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    rows = {row["method"]: row for row in json.loads(report.read_text())["results"]}
    shown = visiondrop_cli("table", str(none.output), str(pruned.output), "--json")
    assert shown.returncode == 0, shown.stderr
    table = {row["method"]: row for row in json.loads(shown.stdout)["rows"]}
    assert table["none"]["scores"]["visiondrop_pocket"] == pytest.approx(rows["none"]["accuracy"])
    assert table["visiondrop"]["scores"]["visiondrop_pocket"] == pytest.approx(rows["visiondrop"]["accuracy"])
    assert table["visiondrop"]["average_retention"] == pytest.approx(rows["visiondrop"]["retention"])
    assert table["visiondrop"]["budget"] == 64
    # The markdown shows the same retention, as `visiondrop eval` rounds it (one decimal, percent).
    markdown = visiondrop_cli("table", str(none.output), str(pruned.output)).stdout
    assert f"{100 * rows['visiondrop']['retention']:.1f}%" in markdown.splitlines()[-1]


@pytest.mark.parametrize(
    ("model_args", "named"),
    [("method=nosuchmethod", "method='nosuchmethod'"), ("method=visiondrop,budget=0", "budget=0")],
)
def test_bad_model_args_stop_the_run_with_one_line(run_lmms, model_args, named):
    run = run_lmms(model_args, 1, 2)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("visiondrop (lmms-eval): ") and named in last, run.stderr[-2000:]
    assert not list(run.output.rglob("*_results.json"))


def test_llava_next_checkpoint_equals_our_evaluation(run_lmms, tmp_path_factory):
    """A LLaVA-NeXT checkpoint (the pocket model saved as LLaVA-NeXT, AnyRes crops) through the same lmms-eval model:
    the class comes from its config, the prompt from its chat template; answers and kept counts equal our code path's
    on the same samples, unpruned and at VisionDrop 64."""
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from visiondrop.testing import pocket_llava_next

    checkpoint = pocket_llava_next(tmp_path_factory.mktemp("pocket_llava_next"))
    torch.set_num_threads(2)
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    samples = make_split("test", N_SAMPLES, seed=0)
    unpruned = evaluate(model, processor, samples, batch_size=BATCH, progress=False)
    with vd.build("visiondrop", budget=64).apply(model) as run:
        pruned = evaluate(model, processor, samples, batch_size=BATCH, progress=False)
    for model_args, ours in (("method=none", unpruned), (PRUNED, pruned)):
        lmms = run_lmms(model_args, BATCH, N_SAMPLES, pretrained=checkpoint)
        _ok(lmms)
        assert _answers(lmms) == ours["predictions"]
    logged = [s["token_counts"][0] for s in lmms.samples[-BATCH:]]
    for mine, row in zip(run.report.samples, logged, strict=True):
        assert mine.images[0].image_tokens == 1176  # base view + two crops, unpadded, with newlines
        assert row["visual_tokens_input"] == mine.input_count < 1176
        assert row["visual_tokens_final"] == mine.final_count
