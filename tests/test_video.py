"""Videos: Qwen2-VL / Qwen2.5-VL / Qwen3-VL (temporal patches of two frames) and Video-LLaVA (8 frames).

Every batch is left-padded and mixes, per row, a video and an image (in either order, in one prompt), videos of
different sizes and temporal-patch counts, and a text-only row. A video's pruning unit is one frame (Qwen: one
temporal patch) with ``pool="frame"`` and the whole video with ``pool="video"``; an int budget is tokens per frame.
Proven here: nothing pruned is ``torch.equal`` to the unpatched model; VisionDrop's cached decode equals
``use_cache=False``; exact counts per stage for every frame (``pool="frame"``) and every video (``pool="video"``);
kept tokens reach the LLM with their own features and 3-D positions; the model is restored after use and after an
exception; what makes no sense is refused in one line; every registered method runs on video or refuses in one line.
"""

from __future__ import annotations

import pytest
import torch

import visiondrop as vd
from conftest import model_state
from visiondrop.layout import find_image_spans
from visiondrop.models import get_adapter
from visiondrop.testing import QWEN_VIDEO

LAYERS = 8
TIMESTAMP = 11  # the text token Qwen3-VL's processor puts before each temporal patch (a timestamp)
ROWS = [[1, 5, "video", 7, "image", 8], [1, 9, 10], [1, "image", 3, "video", 4, 6]]
GRIDS = [(4, 4), (4, 6)]  # images, in patches
VIDEOS = [
    (2, 4, 4),
    (3, 4, 8),
]  # videos: (temporal patches, h, w) in patches: 4 and 8 tokens per temporal patch


def _qwen(version: str):
    from visiondrop.testing import qwen3_vl_inputs, qwen_inputs, tiny_qwen2_vl, tiny_qwen3_vl

    if version == "3":
        model = tiny_qwen3_vl()
        batch = qwen3_vl_inputs(ROWS, GRIDS, videos=VIDEOS, frame_text=TIMESTAMP)
    else:
        model = tiny_qwen2_vl(version=version)
        batch = qwen_inputs(ROWS, GRIDS, videos=VIDEOS)
    with torch.no_grad():  # transformers' lazy output-capturing hooks, installed before any state snapshot
        model(**batch, output_hidden_states=True)
    return model, batch


BUILDERS = {
    "qwen2-vl": lambda: _qwen("2"),
    "qwen2.5-vl": lambda: _qwen("2.5"),
    "qwen3-vl": lambda: _qwen("3"),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    model, batch = BUILDERS[request.param]()
    return request.param, model, batch


def _pools(key: str) -> list[str]:
    return ["frame"] if key == "qwen3-vl" else ["frame", "video"]  # Qwen3-VL: timestamps split a video's run


def generate(model, batch, **kwargs):
    kwargs.setdefault("max_new_tokens", 4)
    # A random model can emit a placeholder id as text, which would change a use_cache=False recomputation's count.
    kwargs.setdefault("suppress_tokens", [get_adapter(model).image_token_id, QWEN_VIDEO])
    with torch.no_grad():
        return model.generate(**batch, do_sample=False, **kwargs)


def test_units_follow_the_placeholders(family):
    key, model, batch = family
    adapter = get_adapter(model)
    infos = adapter.image_infos(batch)
    # row 0: video 0 (2 temporal patches), image 0; row 2: image 1, video 1 (3 temporal patches)
    assert [(i.video, i.frames, i.tokens) for i in infos] == [
        (0, (0,), 4),
        (0, (1,), 4),
        (None, (), 4),
        (None, (), 6),
        (1, (0,), 8),
        (1, (1,), 8),
        (1, (2,), 8),
    ]
    if key != "qwen3-vl":
        adapter.pool = "video"
        assert [(i.video, i.frames, i.tokens, i.grids) for i in adapter.image_infos(batch)] == [
            (0, (0, 1), 8, ((2, 2), (2, 2))),
            (None, (), 4, ((2, 2),)),
            (None, (), 6, ((2, 3),)),
            (1, (0, 1, 2), 24, ((2, 4),) * 3),
        ]


def test_nothing_pruned_is_identical(family):
    key, model, batch = family
    with torch.no_grad():
        logits = model(**batch).logits
    reference = generate(model, batch)
    for pool in _pools(key):
        for method in (vd.build("none", pool=pool), vd.build("random", budget=1.0, pool=pool)):
            with method.apply(model):
                with torch.no_grad():
                    assert torch.equal(model(**batch).logits, logits), (key, method)
                assert torch.equal(generate(model, batch), reference), (key, method)


@pytest.mark.parametrize("budget", [3, 0.5])
def test_visiondrop_cached_equals_full_and_counts(family, budget):
    key, model, batch = family
    adapter = get_adapter(model)
    for pool in _pools(key):
        method = vd.build("visiondrop", budget=budget, pool=pool)
        before = model_state(model)
        with method.apply(model) as run:
            cached = generate(model, batch, max_new_tokens=6)
            report = run.report
            assert torch.equal(generate(model, batch, max_new_tokens=6, use_cache=False), cached), (key, pool)
        assert model_state(model) == before
        adapter.pool = pool
        infos = adapter.image_infos(batch)
        assert [len(s.images) for s in report.samples] == [
            2 if pool == "video" else 3,
            0,
            2 if pool == "video" else 4,
        ]
        for im, info in zip(report.images, infos, strict=True):
            schedule = method.for_unit(info).schedule(info.tokens, LAYERS, info.grids)
            assert (im.video, im.frames, im.image_tokens) == (info.video, info.frames, info.tokens)
            assert im.counts() == schedule.counts(), (key, pool, info, schedule.describe())
        videos = report.videos()
        assert [(v["sample"], v["video"], v["frames"]) for v in videos] == [(0, 0, [0, 1]), (2, 1, [0, 1, 2])]
        for v, (t, h, w) in zip(videos, VIDEOS, strict=True):
            per_frame = h * w // 4
            assert v["video_tokens"] == t * per_frame
            for total, frames in zip(v["counts"], v["frame_counts"], strict=True):
                assert sum(frames) == total and len(frames) == t
            if pool == "frame":  # every frame met its own schedule
                frame = method.schedule(per_frame, LAYERS, ((h // 2, w // 2),)).counts()
                assert v["frame_counts"] == [[c] * t for c in frame]
            else:  # the video's total met the video's schedule (budget x frames)
                info = next(i for i in infos if i.video == v["video"])
                assert v["counts"] == method.for_unit(info).schedule(info.tokens, LAYERS, info.grids).counts()


@pytest.mark.parametrize("pool", ["frame", "video"])
def test_int_budget_is_tokens_per_frame(pool):
    model, batch = BUILDERS["qwen2-vl"]()
    method = vd.build("random", budget=3, pool=pool)
    with method.apply(model) as run:
        generate(model, batch, max_new_tokens=1)
    videos = run.report.videos()
    if pool == "frame":
        assert [v["counts"] for v in videos] == [[3 * 2], [3 * 3]]
        assert [v["frame_counts"] for v in videos] == [[[3, 3]], [[3, 3, 3]]]
    else:
        assert [v["counts"] for v in videos] == [[3 * 2], [3 * 3]]  # one pool: frames may differ
    images = [im for im in run.report.images if im.video is None]
    assert [im.counts() for im in images] == [[3], [3]]


def _llm_inputs(model, batch, method=None):
    """The outer call's (shrunk) ``input_ids`` and ``position_ids`` and the LLM's ``inputs_embeds``."""
    seen = {}

    def outer(module, args, kwargs):
        seen["ids"] = kwargs["input_ids"]
        seen["positions"] = kwargs.get("position_ids")

    def llm(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    def run():
        handles = [
            model.register_forward_pre_hook(outer, with_kwargs=True),
            model.model.language_model.register_forward_pre_hook(llm, with_kwargs=True),
        ]
        try:
            with torch.no_grad():
                model(**batch)
        finally:
            for h in handles:
                h.remove()

    if method is None:
        run()
        adapter = get_adapter(model)
        seen["positions"] = adapter.positions(batch, generate=False)
        return seen, None
    with method.apply(model) as r:
        run()
    return seen, r.report


@pytest.mark.parametrize("pool", ["frame", "video"])
def test_kept_tokens_carry_their_features_and_positions(family, pool):
    key, model, batch = family
    if pool not in _pools(key):
        pytest.skip("Qwen3-VL's timestamps split a video's placeholders: pool='video' is refused there")
    full, _ = _llm_inputs(model, batch)
    method = vd.build("divprune", budget=2, pool=pool)  # dropped, never merged: every token is a kept one
    pruned, report = _llm_inputs(model, batch, method)
    adapter = get_adapter(model)
    adapter.pool = pool
    infos = adapter.image_infos(batch)
    ids = adapter.placeholder_ids(infos)
    old = find_image_spans(batch["input_ids"], ids, [i.tokens for i in infos])
    new = find_image_spans(pruned["ids"], ids, [im.stages[0].tokens for im in report.images])
    old_at = {s.image: (b, s.start) for b, row in enumerate(old) for s in row}
    new_at = {s.image: (b, s.start) for b, row in enumerate(new) for s in row}
    checked = 0
    for unit, im in enumerate(report.images):
        b, start = old_at[unit]
        b2, start2 = new_at[unit]
        assert b == b2
        for j, patch in enumerate(im.stages[0].token_patch):
            torch.testing.assert_close(
                pruned["embeds"][b, start2 + j], full["embeds"][b, start + patch], rtol=1e-5, atol=1e-5
            )
            assert torch.equal(pruned["positions"][:, b, start2 + j], full["positions"][:, b, start + patch])
            checked += 1
    assert checked == sum(im.stages[0].tokens for im in report.images) > 0


def test_restored_after_an_exception(family):
    _, model, batch = family
    before = model_state(model)
    with pytest.raises(KeyError), vd.build("visiondrop", budget=2).apply(model):
        generate(model, batch, max_new_tokens=1)
        raise KeyError("inside")
    assert model_state(model) == before
    assert "generate" not in model.__dict__


def test_refusals_are_one_line(family):
    key, model, batch = family
    before = model_state(model)
    cases = [(vd.build("visiondrop", budget=5), "budget=5 is more than the 4 visual tokens")]
    if key == "qwen3-vl":
        cases.append((vd.build("visiondrop", budget=2, pool="video"), "pool='video'"))
    for method, text in cases:
        with pytest.raises(ValueError, match=text) as err, method.apply(model):
            generate(model, batch, max_new_tokens=1)
        assert "\n" not in str(err.value)
        assert model_state(model) == before
    with pytest.raises(ValueError, match="pool must be one of 'frame', 'video', got 'clip'"):
        vd.build("visiondrop", pool="clip")


@pytest.mark.parametrize("pool", ["frame", "video"])
@pytest.mark.parametrize("name", vd.available_methods())
def test_every_method_runs_on_video_or_refuses(name, pool):
    model, batch = BUILDERS["qwen2-vl"]()
    method = vd.build(name, budget=0.5, pool=pool)
    before = model_state(model)
    try:
        with method.apply(model) as run:
            generate(model, batch, max_new_tokens=2)
    except ValueError as err:
        assert "\n" not in str(err)
        assert model_state(model) == before
        pytest.skip(str(err))
    assert model_state(model) == before
    adapter = get_adapter(model)
    adapter.pool = pool
    for im, info in zip(run.report.images, adapter.image_infos(batch), strict=True):
        assert im.counts() == method.for_unit(info).schedule(info.tokens, LAYERS, info.grids).counts()
