"""The vLLM plugin on LLaVA-NeXT, in vLLM's CPU engine, against our HF path on the same checkpoint.

The checkpoint is the shipped pocket model saved as LLaVA-NeXT (:func:`visiondrop.testing.pocket_llava_next`: its
trained CLIP, projector and LLM, AnyRes crops of 336 px); the images are pocket scenes resized to five aspect
ratios, so the AnyRes grid, its unpadding and the newline count differ between requests. Needs ``.venv-vllm``
(``bash scripts/setup.sh vllm``); skipped where vLLM is not installed.
"""

from __future__ import annotations

import gc
import os

import pytest

for _key, _value in {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_key, _value)

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import visiondrop as vd  # noqa: E402
from visiondrop.models.llava_next import next_image_info  # noqa: E402
from visiondrop.testbed import build_prompt, make_split  # noqa: E402
from visiondrop.testing import pocket_llava_next  # noqa: E402
from visiondrop.vllm import ARCHITECTURES, CONFIG_KEY, hf_overrides  # noqa: E402

ARCHITECTURE = "LlavaNextForConditionalGeneration"
N_SAMPLES = 30
NEW_TOKENS = 2
#: (width, height) the scenes are resized to: square, wide, tall and two wider ratios (1 x 2 and 2 x 1 crop grids,
#: unpadded columns or rows: 1,176 / 1,464 / 1,476 / 1,654 / 1,680 placeholders).
SIZES = [(336, 336), (504, 336), (336, 504), (600, 280), (280, 600)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(pocket_llava_next(tmp_path_factory.mktemp("pocket_llava_next")))


@pytest.fixture(scope="module")
def samples():
    out = []
    for i, sample in enumerate(make_split("test", N_SAMPLES)):
        out.append((sample.image.resize(SIZES[i % len(SIZES)]), sample.question))
    return out


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


def _engine(model: str, **kwargs):
    return vllm.LLM(
        model=model,
        enforce_eager=True,
        dtype="float32",
        max_model_len=4096,
        limit_mm_per_prompt={"image": 1},
        **kwargs,
    )


def _run_vllm(model: str, samples, **kwargs) -> list[tuple[list[int], int]]:
    """(greedy ids, prompt token count) per sample from a fresh in-process engine."""
    llm = _engine(model, **kwargs)
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
        requests = [{"prompt": build_prompt(q), "multi_modal_data": {"image": image}} for image, q in samples]
        outs = llm.generate(requests, params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids), len(o.prompt_token_ids)) for o in outs]
    finally:
        del llm
        gc.collect()


@torch.no_grad()
def _run_hf(hf, samples, method=None) -> list[tuple[list[int], int]]:
    """(greedy ids, prompt tokens the LLM saw) per sample, one sample per call."""
    model, processor = hf
    results = []
    for image, question in samples:
        inputs = processor(images=[image], text=[build_prompt(question)], return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        placeholders = next_image_info(model.config, (image.height, image.width)).tokens
        if method is None:
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            kept = placeholders
        else:
            with method.apply(model) as run:
                out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
            kept = run.report.images[0].stages[0].tokens
        results.append((out[0, length:].tolist(), length - placeholders + kept))
    return results


@pytest.fixture(scope="module")
def stock(checkpoint, samples, tmp_path_factory):
    """Stock vLLM's results on the checkpoint (no plugin)."""
    from pathlib import Path

    from visiondrop.tools.serve_bench import stock_model_dir

    # stock vLLM 0.32 wants the CLIP tower under vision_tower.vision_model.*: a renamed copy of the same tensors
    folder = stock_model_dir(Path(checkpoint), tmp_path_factory.mktemp("stock"))
    assert folder != Path(checkpoint)
    return _run_vllm(str(folder), samples)


def test_sizes_cover_several_grids(hf, samples):
    """The five sizes give both crop grids and five unpadded windows (so placeholder counts differ)."""
    model, _ = hf
    infos = [next_image_info(model.config, (image.height, image.width)) for image, _ in samples]
    assert {info.tokens for info in infos} == {1176, 1464, 1476, 1654, 1680}
    assert {len(info.vit_tokens) for info in infos} == {3}  # base view + 2 crops, as 1 x 2 or 2 x 1


def test_stock_vllm_equals_transformers(stock, hf, samples):
    want = _run_hf(hf, samples)
    assert [n for _, n in stock] == [n for _, n in want]
    assert [ids for ids, _ in stock] == [ids for ids, _ in want]


def test_keep_all_equals_stock(checkpoint, stock, samples):
    """A method that keeps every token (budget 1.0) takes vLLM's own packing: stock vLLM's ids and counts."""
    method = vd.build("visiondrop", budget=1.0, boundaries=(), positions="compact")
    got = _run_vllm(checkpoint, samples, hf_overrides=hf_overrides(method, ARCHITECTURE))
    assert got == stock


#: Every registered method that prunes before the LLM only, and VisionDrop's vision stage.
METHODS = ["visiondrop"] + [
    name for name in vd.available_methods() if vd.method_class(name).info.stages == "vision"
]


@pytest.mark.parametrize("name", METHODS)
def test_plugin_equals_hf_path(checkpoint, hf, samples, name):
    """Each pre-LLM method (and VisionDrop with ``boundaries=()``) at budget 64 inside vLLM: prompt token counts are
    the text plus the schedule's kept count for each image's own size, and greedy ids equal the HF path's."""
    fields = {"boundaries": ()} if name == "visiondrop" else {}
    method = vd.build(name, budget=64, positions="compact", **fields)
    got = _run_vllm(checkpoint, samples, hf_overrides=hf_overrides(method, ARCHITECTURE))
    want = _run_hf(hf, samples, method)
    model, processor = hf
    expected = []
    for image, question in samples:
        info = next_image_info(model.config, (image.height, image.width))
        inputs = processor(images=[image], text=[build_prompt(question)], return_tensors="pt")
        kept = method.schedule(
            info.tokens, model.config.text_config.num_hidden_layers, info.grids
        ).vision.tokens
        expected.append(inputs["input_ids"].shape[1] - info.tokens + kept)
    assert [n for _, n in want] == expected
    assert [n for _, n in got] == expected
    assert [ids for ids, _ in got] == [ids for ids, _ in want]


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"method": "visiondrop", "budget": 64, "boundaries": [2]}, "boundaries=(2,)"),
        ({"method": "visiondrop", "budget": 5000, "boundaries": []}, "budget=5000"),
        ({"method": "sparsevlm", "budget": 64}, "method='sparsevlm'"),
    ],
)
def test_bad_settings_fail_at_engine_start(checkpoint, settings, named):
    overrides = {"architectures": [ARCHITECTURES[ARCHITECTURE]], CONFIG_KEY: settings}
    with pytest.raises(Exception) as caught:
        _engine(checkpoint, hf_overrides=overrides)
    error = caught.value
    while not isinstance(error, ValueError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, ValueError), repr(caught.value)
    assert named in str(error) and "\n" not in str(error)


def test_an_image_too_small_for_the_budget_is_refused_and_the_engine_serves_on(checkpoint, samples):
    """An int budget that fits the engine's check (every pinpoint) but not a very wide image's placeholders: that
    request fails with one line naming the budget, and the engine answers the next request."""
    method = vd.build("visiondrop", budget=700, boundaries=(), positions="compact")
    llm = _engine(checkpoint, hf_overrides=hf_overrides(method, ARCHITECTURE))
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
        image, question = samples[0]
        wide = image.resize((2000, 100))
        message = _refusal(
            llm, {"prompt": build_prompt(question), "multi_modal_data": {"image": wide}}, params
        )
        assert message.startswith("ValueError") and "budget=700" in message and "\n" not in message
        out = llm.generate([{"prompt": build_prompt(question), "multi_modal_data": {"image": image}}], params)
        assert len(out[0].outputs[0].token_ids) > 0
    finally:
        del llm
        gc.collect()


def _refusal(llm, request, params) -> str:
    """The ValueError message ``request`` fails with. Only the message leaves this function: a traceback kept alive
    holds the engine, whose late teardown would take vLLM's process groups from the next engine in this process."""
    try:
        llm.generate([request], params)
    except Exception as exc:  # vLLM may wrap the plugin's ValueError
        error = exc
        while not isinstance(error, ValueError) and error.__cause__ is not None:
            error = error.__cause__
        message = f"{type(error).__name__}: {error}" if isinstance(error, ValueError) else repr(exc)
        del exc, error
    else:
        pytest.fail("the request was not refused")
    return message
