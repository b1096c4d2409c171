"""Every registered method x every family x a fraction and an int budget x both budget modes, in padded batches.

Each case runs ``generate`` on a left-padded batch of three rows (one image; two images of different sizes where the
family allows it; text only) and checks: exact per-stage counts per image as the method's schedule says (pooling's
schedule already gives whole grid cells, its documented deviation), the budget met, cached decode ==
``use_cache=False`` for methods that score without the text, a plain forward equal to ``generate``'s prefill, and the
model exactly restored. Combinations a method
refuses are skipped with the method's own one-line refusal, and must be the cells the README's per-family table marks
"refused". A method joins by registration, a family by an entry in ``FAMILIES``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import visiondrop as vd
from conftest import BOS, IMAGE_TOKEN, generate, make_batch, model_state
from visiondrop.models import get_adapter

LAYERS = 8
README = Path(__file__).resolve().parents[1] / "README.md"
BUDGETS = [
    "fraction",
    "int",
]  # 0.5 of each image; 60% of the batch's smallest image, the same for every image
MODES = ["average", "input"]


def _warm(model, batch, vision) -> None:
    """Install transformers' lazy output-capturing hooks before any state snapshot."""
    with torch.no_grad():
        model(**batch, output_hidden_states=True)
        vision()


def _llava():
    from conftest import N_TOKENS, tiny_llava

    model = tiny_llava()
    rows = [
        [BOS, 5, *[IMAGE_TOKEN] * N_TOKENS, 7, 8],
        [BOS, 5, 6, *[IMAGE_TOKEN] * N_TOKENS, 3, *[IMAGE_TOKEN] * N_TOKENS, 9],
        [BOS, 4, 4, 4],
    ]
    return model, make_batch(rows)


def _next(text: str):
    from conftest import next_batch
    from visiondrop.testing import tiny_llava_next

    model = tiny_llava_next(text=text)
    batch = next_batch(model)
    _warm(
        model, batch, lambda: model.model.vision_tower(torch.randn(1, 3, 56, 56), output_hidden_states=True)
    )
    return model, batch


def _qwen(version: str):
    from visiondrop.testing import qwen_inputs, tiny_qwen2_vl

    model = tiny_qwen2_vl(version=version)
    batch = qwen_inputs(
        [[1, 5, "image", 7, 8], [1, 5, 6, "image", 3, "image", 9], [1, 4, 4]], [(8, 10), (6, 8), (8, 8)]
    )
    _warm(
        model,
        batch,
        lambda: model.model.visual(
            batch["pixel_values"], grid_thw=batch["image_grid_thw"], output_hidden_states=True
        ),
    )
    return model, batch


def _qwen3():
    from visiondrop.testing import qwen3_vl_inputs, tiny_qwen3_vl

    model = tiny_qwen3_vl()
    batch = qwen3_vl_inputs(
        [[1, 5, "image", 7, 8], [1, 5, 6, "image", 3, "image", 9], [1, 4, 4]], [(8, 10), (6, 8), (8, 8)]
    )
    _warm(
        model,
        batch,
        lambda: model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]),
    )
    return model, batch


def _internvl():
    from visiondrop.testing import internvl_inputs, tiny_internvl

    model = tiny_internvl()
    # tiles per image: 3 x 1 + thumbnail, 2 x 1 + thumbnail, 2 x 2 + thumbnail (16 LLM tokens per tile)
    batch = internvl_inputs([[1, 5, "image", 7, 8], [1, 5, 6, "image", 3, "image", 9], [1, 4, 4]], [4, 3, 5])
    _warm(model, batch, lambda: model.model.vision_tower(batch["pixel_values"], output_hidden_states=True))
    return model, batch


def _video_llava():
    from visiondrop.testing import tiny_video_llava, video_llava_inputs

    model = tiny_video_llava()
    batch = video_llava_inputs([[BOS, 5, "image", 7, 8], [BOS, 5, 6, "image", 3, "image", 9], [BOS, 4, 4, 4]])
    _warm(model, batch, lambda: model.model.video_tower(torch.randn(1, 3, 56, 56), output_hidden_states=True))
    return model, batch


def _next_video():
    from conftest import next_batch
    from visiondrop.testing import tiny_llava_next_video

    model = tiny_llava_next_video()
    batch = next_batch(model)
    _warm(
        model, batch, lambda: model.model.vision_tower(torch.randn(1, 3, 56, 56), output_hidden_states=True)
    )
    return model, batch


def _onevision():
    from conftest import onevision_batch
    from visiondrop.testing import tiny_llava_onevision

    model = tiny_llava_onevision()
    batch = onevision_batch(model)
    _warm(
        model, batch, lambda: model.model.vision_tower(torch.randn(1, 3, 56, 56), output_hidden_states=True)
    )
    return model, batch


#: family -> (builder, the README table's column)
FAMILIES = {
    "llava-1.5": (_llava, "LLaVA-1.5"),
    "llava-next-llama": (lambda: _next("llama"), "LLaVA-NeXT"),
    "llava-next-mistral": (lambda: _next("mistral"), "LLaVA-NeXT"),
    "qwen2-vl": (lambda: _qwen("2"), "Qwen2-VL / 2.5-VL"),
    "qwen2.5-vl": (lambda: _qwen("2.5"), "Qwen2-VL / 2.5-VL"),
    "qwen3-vl": (_qwen3, "Qwen3-VL"),
    "internvl": (_internvl, "InternVL"),
    "video-llava": (_video_llava, "Video-LLaVA"),  # images here; videos in tests/test_video.py
    "llava-next-video": (
        _next_video,
        "LLaVA-NeXT",
    ),  # its images are LLaVA-NeXT's; videos in tests/test_video.py
    "llava-onevision": (_onevision, "LLaVA-OneVision"),
}


def _readme_refusals() -> set[tuple[str, str]]:
    """(method, column) cells of the README's "What each method does per family" table that say "refused"."""
    text = README.read_text()
    table = text[text.index("| method | LLaVA-1.5 |") :].split("\n\n")[0].splitlines()
    columns = [c.strip() for c in table[0].strip("|").split("|")]
    refused = set()
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
            for column, cell in zip(columns[1:], cells[1:], strict=True):
                if cell.startswith("refused"):
                    refused.add((name, column))
    return refused


REFUSED = _readme_refusals()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, column = FAMILIES[request.param]
    model, batch = build()
    return request.param, column, model, batch


def test_the_readme_table_names_refusals():
    assert ("visionzip", "Qwen2-VL / 2.5-VL") in REFUSED


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", vd.available_methods())
def test_matrix(family, name, budget, mode):
    key, column, model, batch = family
    infos = get_adapter(model).image_infos(batch)
    budget = 0.5 if budget == "fraction" else round(0.6 * min(info.tokens for info in infos))
    method = vd.build(name, budget=budget, budget_mode=mode)
    before = model_state(model)
    try:  # refused when attached, or at the first call once an image's schedule is known (one line either way)
        with method.apply(model):
            generate(model, batch, max_new_tokens=1)
    except ValueError as err:
        assert model_state(model) == before
        assert "\n" not in str(err)
        assert (name, column) in REFUSED, f"{name} refused on {key} but the README says it runs: {err}"
        pytest.skip(str(err))
    assert (name, column) not in REFUSED, f"the README says {name} is refused on {key}, but it ran"

    with method.apply(model) as run:
        cached = generate(model, batch, max_new_tokens=4)
        report = run.report
        if method.info.signal != "text-guided":  # visual-only: pruning does not depend on the newest token
            assert torch.equal(generate(model, batch, max_new_tokens=4, use_cache=False), cached)
        if (
            mode == "average"
        ):  # a plain forward (log-likelihood) is pruned as generate's prefill (left padding)
            with torch.no_grad():
                forward = model(**batch).logits[:, -1]
                prefill = model.generate(
                    **batch,
                    max_new_tokens=1,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                ).logits[0]
            torch.testing.assert_close(forward, prefill, atol=2e-4, rtol=1e-4)
    assert model_state(model) == before
    assert [len(s.images) for s in report.samples] == [1, 2, 0]
    for im, info in zip(report.images, infos, strict=True):
        n = info.tokens
        schedule = method.schedule(n, LAYERS, im.grids)
        assert im.image_tokens == n
        assert im.counts() == schedule.counts(), (key, name, schedule.describe())
        assert [st.layer for st in im.stages] == [s.layer for s in schedule.stages]
        want = method.budget_tokens(n)
        if name == "none":
            assert schedule.layer_average == n
        elif name == "pooling":  # whole grid cells: at most the budget
            assert schedule.layer_average <= want
        elif mode == "input":
            pruning = next(s for s in schedule.stages if s.tokens < n)
            assert pruning.tokens == max(1, round(want)), schedule.describe()
        else:
            assert abs(schedule.layer_average - want) <= 1.5, schedule.describe()
