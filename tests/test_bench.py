"""``visiondrop bench`` (``visiondrop.tools.bench``) on tiny LLaVA, LLaVA-NeXT and Qwen2-VL configs: the code path, the JSON it writes, what its
hooks count and the errors users get. Nothing here depends on how fast anything ran."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pytest
import torch

from visiondrop import build
from visiondrop import flops as vf
from visiondrop.testing import tiny_llava_config
from visiondrop.tools import bench

LAYERS = 4
TEXT = 16


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaVA config.json of the tiny test shape: 8 x 8 = 64 patches, 4 LLM layers, GQA."""
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(tiny_llava_config(image_size=112, layers=LAYERS).to_dict()))
    return path


def bench_command(*argv: str) -> argparse.Namespace:
    """Parse ``visiondrop bench ARGV`` with the parser ``bench.add_parser`` registers."""
    parser = argparse.ArgumentParser(prog="visiondrop")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def quick(config: Path, *argv: str) -> list[str]:
    return [
        "--model",
        str(config),
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--new-tokens",
        "3",
        "--text-tokens",
        str(TEXT),
        "--device",
        "cpu",
        "--quiet",
        *argv,
    ]


@pytest.fixture(scope="module")
def result(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One bench run over three methods at batch 2, read back from the JSON file it writes."""
    out = tmp_path_factory.mktemp("bench") / "sub" / "bench.json"
    args = bench_command(
        *quick(tiny_config, "--methods", "visiondrop,fastv,visionzip", "--budget", "40", "--batch", "2"),
        "--json",
        str(out),
    )
    assert args.func(args) == 0
    return json.loads(out.read_text())


def test_json_schema(result: dict) -> None:
    assert [r["method"] for r in result["results"]] == ["visiondrop", "fastv", "visionzip"]
    for r in [result["unpruned"], *result["results"]]:
        for key in ("prefill_speedup", "flops_ratio", "ttft_s", "tflops", "decode_tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["method"], key, r[key])
        assert r["overhead_share"] >= 0 and math.isfinite(r["overhead_share"])
        assert len(r["ttft_s_rounds"]) == 2 and len(r["decode_s_rounds"]) == 2
        assert r["peak_memory_bytes"] >= 0
    for r in result["results"]:
        assert r["budget"] == 40 and r["budget_mode"] == "average"
        assert r["flops_ratio"] > 1  # every method removes tokens
        assert r["overhead_s"] > 0  # timed under apply(profile=True)
    base = result["unpruned"]
    assert base["method"] == "none" and base["prefill_speedup"] == 1 and base["flops_ratio"] == 1
    assert base["overhead_share"] == 0
    assert (result["layers"], result["full_layers"], result["batch"]) == (LAYERS, LAYERS, 2)
    assert result["dtype"] == "bfloat16" and result["device"] == "cpu"
    assert result["image_tokens"] == 64 and result["text_tokens"] == TEXT
    assert any("batch ~4" in note for note in result["notes"])  # the CPU caveat
    assert result["other_load_cores"] is None or result["other_load_cores"] >= 0
    assert any("other processes kept" in note for note in result["notes"]) == (
        result["other_load_cores"] is not None
    )


def test_counts_match_the_schedules(result: dict) -> None:
    """The hooks saw exactly the shapes the schedules promise; the cache holds what the accounting says."""
    arch = vf.ArchSpec.from_config(tiny_llava_config(image_size=112, layers=LAYERS))
    for r in [result["unpruned"], *result["results"]]:
        schedule = build(r["method"], budget=40).schedule(64, LAYERS, ((8, 8),))
        assert r["sequence_per_layer"] == [TEXT + n for n in schedule.tokens_per_layer()]
        assert r["kv_bytes"] == r["kv_bytes_analytic"] > 0
        assert r["schedule"] == schedule.describe()
    base = vf.prefill_flops(
        arch, visual_tokens_per_layer=64, text_tokens=TEXT, lm_head_tokens=1, batch_size=2
    ).tflops
    assert result["unpruned"]["tflops"] == pytest.approx(base)
    assert result["results"][1]["unpruned_tflops"] == pytest.approx(base)


def test_text_output(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = bench_command(
        *quick(tiny_config, "--methods", "dart", "--budget", "16", "--budget-mode", "input", "--layers", "3")
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "LLM truncated to 3 of 4 layers" in text
    assert "| unpruned" in text and "| dart" in text and "16 (input)" in text
    assert "prefill speed-up" in text and "FLOPs ratio" in text and "scoring+merging" in text
    assert "on CPU, prefill time tracks FLOPs only from batch ~4" in text


def test_random_model_and_inputs(tiny_config: Path) -> None:
    config = bench.bench_config(str(tiny_config))
    model = bench.random_model(config, dtype=torch.float32, device=torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    norm = model.model.language_model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    weight = model.model.language_model.layers[0].mlp.up_proj.weight.detach()
    std = config.text_config.initializer_range
    assert 0.9 * std < float(weight.std()) < 1.1 * std
    inputs = bench.make_inputs(config, batch=3, text_tokens=10, dtype=torch.float32)
    ids = inputs["input_ids"]
    assert ids.shape == (3, 10 + 64) and inputs["pixel_values"].shape == (3, 3, 112, 112)
    assert int((ids == config.image_token_id).sum()) == 3 * 64
    assert torch.equal(ids[:, 5 : 5 + 64], torch.full((3, 64), config.image_token_id))
    assert not bool(torch.isin(ids, torch.tensor([0, 1, 2])).any())  # no pad/BOS/EOS
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_bench_config_truncates_without_building() -> None:
    start = time.perf_counter()
    config = bench.bench_config("llava-1.5-7b", 4)
    assert config.text_config.num_hidden_layers == 4
    assert config.text_config.hidden_size == 4096 and config.vision_config.image_size == 336
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "int8"], "--dtype 'int8'"),
        (["--methods", "visiondrop,nope"], "unknown method 'nope'"),
        (["--methods", "none"], "always measured"),
        (["--methods", ","], "at least one method"),
        (["--batch", "0"], "--batch must be an integer >= 1"),
        (["--repeats", "0"], "--repeats must be"),
        (["--new-tokens", "0"], "--new-tokens must be"),
        (["--layers", "0"], "--layers must be an integer in 1..4"),
        (["--layers", "5"], "--layers must be an integer in 1..4"),
        (["--budget", "many"], "--budget 'many'"),
        (["--methods", "fastv", "--budget", "8"], "out of reach"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--set", "colour=red"], "--set colour"),
    ],
)
def test_bad_input_is_one_line_value_error(tiny_config: Path, argv: list[str], message: str) -> None:
    args = bench_command(*quick(tiny_config, *argv))
    with pytest.raises(ValueError, match=message.replace(".", r"\.")) as info:
        args.func(args)
    assert "\n" not in str(info.value)


def test_unsupported_models(tmp_path: Path) -> None:
    llama = tmp_path / "config.json"
    llama.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    for model, message in (
        (str(llama), "unsupported model_type 'llama'"),
        ("llava-9b", "--model 'llava-9b'"),
    ):
        args = bench_command("--model", model, "--quiet")
        with pytest.raises(ValueError, match=message) as info:
            args.func(args)
        assert "\n" not in str(info.value)


def test_every_shipped_family_builds_a_config() -> None:
    """The paper's LLaVA-NeXT-7B and Qwen2-VL-7B shapes, truncated, without building a model."""
    from visiondrop.models.family import family_of

    for model, classes in (
        ("llava-next-7b", "LlavaNextForConditionalGeneration"),
        ("qwen2-vl-7b", "Qwen2VL"),
    ):
        config = bench.bench_config(model, 2)
        assert config.text_config.num_hidden_layers == 2
        assert family_of(config.model_type).model_class(config.model_type).startswith(classes)
    next_image = family_of("llava_next").bench_image(
        bench.bench_config("llava-next-7b", 2), 1, torch.Generator()
    )
    assert next_image.tokens == 2928 and next_image.grids == (
        (24, 24),
        (48, 48),
    )  # the 672 x 672 grid, newlines in
    qwen_image = family_of("qwen2_vl").bench_image(bench.bench_config("qwen2-vl-7b", 2), 1, torch.Generator())
    assert qwen_image.tokens == 576 and qwen_image.vit_tokens == 48 * 48


def _tiny_family_config(family: str) -> object:
    from visiondrop.testing import tiny_llava_next_config, tiny_qwen2_vl_config

    if family == "llava_next":
        return tiny_llava_next_config(layers=LAYERS)
    return tiny_qwen2_vl_config(version="2" if family == "qwen2_vl" else "2.5", layers=LAYERS)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_other_families(family: str, tmp_path: Path) -> None:
    """LLaVA-NeXT and Qwen2-VL / 2.5-VL: the same code path and JSON, counts exactly as the schedules say."""
    from visiondrop.models.family import family_of

    config = _tiny_family_config(family)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "bench.json"
    args = bench_command(
        *quick(path, "--methods", "visiondrop,random,fastv", "--budget", "0.3", "--budget-mode", "input"),
        "--repeats",
        "1",
        "--new-tokens",
        "2",
        "--batch",
        "2",
        "--json",
        str(out),
    )
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    image = family_of(family).bench_image(bench.bench_config(str(path)), 1, torch.Generator())
    assert result["image_tokens"] == image.tokens == (88 if family == "llava_next" else 576)
    assert [r["method"] for r in result["results"]] == ["visiondrop", "random", "fastv"]
    arch = vf.ArchSpec.from_config(config)
    assert arch.family == family
    for r in [result["unpruned"], *result["results"]]:
        schedule = build(r["method"], budget=0.3, budget_mode="input").schedule(
            image.tokens, LAYERS, image.grids
        )
        assert r["sequence_per_layer"] == [TEXT + n for n in schedule.tokens_per_layer()]
        assert r["kv_bytes"] == r["kv_bytes_analytic"] > 0
        assert r["schedule"] == schedule.describe()
        for key in ("prefill_speedup", "flops_ratio", "ttft_s", "tflops"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["method"], key, r[key])
    for r in result["results"]:
        assert r["flops_ratio"] > 1
    # The unpruned FLOPs the hooks counted are the analytic ones of this shape (the LM head over one position).
    crops = image.inputs["pixel_values"].shape[1] if family == "llava_next" else 1  # ViT passes per image
    base = vf.prefill_flops(
        arch,
        visual_tokens_per_layer=image.tokens,
        text_tokens=TEXT,
        vision_tokens=[image.vit_tokens] * crops,
        lm_head_tokens=1,
        batch_size=2,
    )
    assert result["unpruned"]["tflops"] == pytest.approx(base.tflops)


def test_budget_checked_before_the_model_is_built() -> None:
    """A 7B-shaped model takes seconds to build: an impossible budget must fail first."""
    args = bench_command("--layers", "8", "--methods", "fastv", "--budget", "64", "--quiet")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="out of reach"):
        args.func(args)
    assert time.perf_counter() - start < 5


def test_wired_into_the_cli(tiny_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from visiondrop.tools import cli

    try:
        status = cli.main(["bench", *quick(tiny_config, "--batch", "0")])
    except SystemExit:
        pytest.skip("visiondrop.tools.cli does not register the bench command yet")
    assert status == 2
    assert "--batch must be" in capsys.readouterr().err


def test_position_policy_and_fields_are_recorded(result: dict) -> None:
    """Each result says its position policy on this model (``auto`` resolved) and the fields set on it."""
    policies = {r["method"]: r["positions"] for r in result["results"]}
    # VisionDrop's default is preserve; fastv's and visionzip's "auto" is compact on LLaVA's 1-D RoPE
    assert policies == {"visiondrop": "preserve", "fastv": "compact", "visionzip": "compact"}
    assert all(r["fields"] == {} for r in result["results"])
    assert result["unpruned"]["positions"] is None and result["unpruned"]["fields"] == {}


def test_method_specs_with_fields(tiny_config: Path, tmp_path: Path) -> None:
    """``--methods name:key=value`` measures variants side by side; a spec's fields win over ``--set``."""
    out = tmp_path / "b.json"
    args = bench_command(
        *quick(
            tiny_config,
            "--methods",
            "visiondrop,visiondrop:anchors=farthest,visiondrop:positions=compact:boundaries=,visionzip",
            "--budget",
            "24",
            "--set",
            "positions=preserve",
        ),
        "--json",
        str(out),
    )
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    got = [(r["method"], r["positions"], r["fields"]) for r in data["results"]]
    assert got == [
        ("visiondrop", "preserve", {"positions": "preserve"}),
        ("visiondrop:anchors=farthest", "preserve", {"positions": "preserve", "anchors": "farthest"}),
        ("visiondrop:positions=compact:boundaries=", "compact", {"positions": "compact", "boundaries": []}),
        ("visionzip", "preserve", {"positions": "preserve"}),
    ]
    # the variant ran its own schedule: no in-LLM stage, so 24 tokens at every layer
    no_stages = data["results"][2]
    assert no_stages["sequence_per_layer"] == [TEXT + 24] * LAYERS
    assert data["results"][0]["sequence_per_layer"] != no_stages["sequence_per_layer"]
    # a field the method lacks: one line naming it, before any model is built
    args = bench_command(*quick(tiny_config, "--methods", "visiondrop:colour=red"))
    with pytest.raises(TypeError, match=r"visiondrop has no field.*colour") as info:
        args.func(args)
    assert "\n" not in str(info.value)


def test_video_llava_images_through_the_shared_clip_bench_image(tmp_path: Path) -> None:
    """Video-LLaVA's bench images go through its image tower with LLaVA-1.5's ``clip_bench_image`` (one [CLS] + 16
    patches at 56 px on the tiny config); the counts are the schedule's."""
    from visiondrop.models.family import family_of
    from visiondrop.testing import tiny_video_llava_config

    config = tiny_video_llava_config(layers=LAYERS)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    out = tmp_path / "bench.json"
    args = bench_command(
        *quick(path, "--methods", "visiondrop", "--budget", "0.5"), "--repeats", "1", "--json", str(out)
    )
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    image = family_of("video_llava").bench_image(bench.bench_config(str(path)), 1, torch.Generator())
    assert (image.tokens, image.vit_tokens) == (16, 17)
    assert result["image_tokens"] == 16
    (pruned,) = result["results"]
    schedule = build("visiondrop", budget=0.5).schedule(16, LAYERS, image.grids)
    assert pruned["sequence_per_layer"] == [TEXT + n for n in schedule.tokens_per_layer()]
