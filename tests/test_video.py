"""Videos: Qwen2-VL / Qwen2.5-VL / Qwen3-VL (temporal patches of two frames), Video-LLaVA (8 frames), LLaVA-NeXT-Video
and LLaVA-OneVision (frames pooled before the LLM; OneVision closes each video with one newline).

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
import transformers

import visiondrop as vd
from conftest import model_state
from visiondrop.compat import VIDEO_LLAVA_TAKES_PIXEL_VALUES
from visiondrop.layout import find_image_spans
from visiondrop.models import get_adapter

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


FRAMES = 4  # Video-LLaVA: frames per video (the released model takes 8; a call's videos share one count)


def _video_llava():
    from visiondrop.testing import tiny_video_llava, video_llava_inputs

    model = tiny_video_llava()
    batch = video_llava_inputs(ROWS, frames=FRAMES)
    with torch.no_grad():
        model(**batch, output_hidden_states=True)
    return model, batch


NEXT_SIZES = [(50, 100), (80, 80)]  # LLaVA-NeXT-Video's images (pixels): 52 and 88 placeholders


def _llava_next_video():
    from visiondrop.testing import llava_next_video_inputs, tiny_llava_next_video

    model = tiny_llava_next_video()
    batch = llava_next_video_inputs(model, ROWS, NEXT_SIZES, frames=FRAMES)
    with torch.no_grad():
        model(**batch, output_hidden_states=True)
    return model, batch


ONEVISION_SIZES = [(50, 100), (100, 100)]  # LLaVA-OneVision's images (pixels)


def _llava_onevision():
    from visiondrop.testing import llava_onevision_inputs, tiny_llava_onevision

    model = tiny_llava_onevision()
    batch = llava_onevision_inputs(model, ROWS, ONEVISION_SIZES, frames=FRAMES)
    with torch.no_grad():
        model(**batch, output_hidden_states=True)
    return model, batch


BUILDERS = {
    "qwen2-vl": lambda: _qwen("2"),
    "qwen2.5-vl": lambda: _qwen("2.5"),
    "qwen3-vl": lambda: _qwen("3"),
    "video-llava": _video_llava,
    "llava-next-video": _llava_next_video,
    "llava-onevision": _llava_onevision,
}
_BUILT: dict = {}


def _built(key: str):
    """One model and batch per family for the parametrised tests (every test checks the model is restored)."""
    if key == "video-llava" and not VIDEO_LLAVA_TAKES_PIXEL_VALUES:
        pytest.skip(
            f"Video-LLaVA needs transformers >= 5.23 (pixel_values); this is {transformers.__version__}"
        )
    if key not in _BUILT:
        _BUILT[key] = BUILDERS[key]()
    return _BUILT[key]


def _videos(key: str) -> list[tuple[int, int, tuple[int, int]]]:
    """Per video of ``ROWS``: (frames, tokens per frame, grid per frame)."""
    if key == "video-llava":  # 4 x 4 patches and the frame's [CLS]
        return [(FRAMES, 17, (4, 4))] * 2
    if key in ("llava-next-video", "llava-onevision"):  # 4 x 4 patches pooled 2 x 2
        return [(FRAMES, 4, (2, 2))] * 2
    return [(t, h * w // 4, (h // 2, w // 2)) for t, h, w in VIDEOS]


def _tail(key: str) -> int:
    """Placeholders a video has besides its frames' tokens (LLaVA-OneVision: one newline closing the video)."""
    return 1 if key == "llava-onevision" else 0


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    model, batch = _built(request.param)
    return request.param, model, batch


def _pools(key: str) -> list[str]:
    return ["frame"] if key == "qwen3-vl" else ["frame", "video"]  # Qwen3-VL: timestamps split a video's run


def generate(model, batch, **kwargs):
    kwargs.setdefault("max_new_tokens", 4)
    # A random model can emit a placeholder id as text, which would change a use_cache=False recomputation's count.
    kwargs.setdefault("suppress_tokens", [model.config.image_token_id, model.config.video_token_id])
    with torch.no_grad():
        return model.generate(**batch, do_sample=False, **kwargs)


def test_units_follow_the_placeholders(family):
    key, model, batch = family
    adapter = get_adapter(model)
    infos = adapter.image_infos(batch)
    if (
        key == "llava-onevision"
    ):  # frames: 2 x 2 bilinearly pooled windows; the last frame also holds the newline
        frames = [(v, (f,), 4 + (f == FRAMES - 1)) for v in (0, 1) for f in range(FRAMES)]
        images = [
            i.tokens for i in adapter.image_infos({k: v for k, v in batch.items() if "videos" not in k})
        ]
        assert [(i.video, i.frames, i.tokens) for i in infos] == [
            *frames[:FRAMES],
            (None, (), images[0]),
            (None, (), images[1]),
            *frames[FRAMES:],
        ]
        assert infos[FRAMES - 1].placeholder_patches() == [0, 1, 2, 3, -1]
        adapter.pool = "video"
        assert [(i.video, i.frames, i.tokens, i.grids) for i in adapter.image_infos(batch)][::3] == [
            (0, tuple(range(FRAMES)), 4 * FRAMES + 1, ((2, 2),) * FRAMES),
            (1, tuple(range(FRAMES)), 4 * FRAMES + 1, ((2, 2),) * FRAMES),
        ]
        return
    if key == "llava-next-video":  # images: LLaVA-NeXT's packing; video frames: 2 x 2 pooled windows
        frames = [(v, (f,), 4) for v in (0, 1) for f in range(FRAMES)]
        assert [(i.video, i.frames, i.tokens) for i in infos] == [
            *frames[:FRAMES],
            (None, (), 52),
            (None, (), 88),
            *frames[FRAMES:],
        ]
        adapter.pool = "video"
        assert [(i.video, i.frames, i.tokens, i.grids) for i in adapter.image_infos(batch)][::3] == [
            (0, tuple(range(FRAMES)), 4 * FRAMES, ((2, 2),) * FRAMES),
            (1, tuple(range(FRAMES)), 4 * FRAMES, ((2, 2),) * FRAMES),
        ]
        return
    if key == "video-llava":  # images: 16 patches, [CLS] dropped; video frames: [CLS] + 16 patches
        frames = [(v, (f,), 17) for v in (0, 1) for f in range(FRAMES)]
        assert [(i.video, i.frames, i.tokens) for i in infos] == [
            *frames[:FRAMES],
            (None, (), 16),
            (None, (), 16),
            *frames[FRAMES:],
        ]
        assert infos[0].placeholder_patches() == [-1, *range(16)]
        adapter.pool = "video"
        assert [(i.video, i.frames, i.tokens) for i in adapter.image_infos(batch)] == [
            (0, tuple(range(FRAMES)), 17 * FRAMES),
            (None, (), 16),
            (None, (), 16),
            (1, tuple(range(FRAMES)), 17 * FRAMES),
        ]
        return
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
        videos = _videos(key)
        assert [len(s.images) for s in report.samples] == [
            2 if pool == "video" else videos[0][0] + 1,
            0,
            2 if pool == "video" else videos[1][0] + 1,
        ]
        for im, info in zip(report.images, infos, strict=True):
            schedule = method.for_unit(info).schedule(info.tokens, LAYERS, info.grids)
            assert (im.video, im.frames, im.image_tokens) == (info.video, info.frames, info.tokens)
            assert im.counts() == schedule.counts(), (key, pool, info, schedule.describe())
        found = report.videos()
        assert [(v["sample"], v["video"], v["frames"]) for v in found] == [
            (0, 0, list(range(videos[0][0]))),
            (2, 1, list(range(videos[1][0]))),
        ]
        for v, (t, per_frame, _) in zip(found, videos, strict=True):
            assert v["video_tokens"] == t * per_frame + _tail(key)
            for total, frames in zip(v["counts"], v["frame_counts"], strict=True):
                assert sum(frames) == total and len(frames) == t
            if (
                pool == "frame"
            ):  # every frame met its own schedule (OneVision's last frame holds the newline too)
                units = [i for i in infos if i.video == v["video"]]
                frame = [method.schedule(i.tokens, LAYERS, i.grids).counts() for i in units]
                assert v["frame_counts"] == [list(stage) for stage in zip(*frame, strict=True)]
            else:  # the video's total met the video's schedule (budget x frames)
                info = next(i for i in infos if i.video == v["video"])
                assert v["counts"] == method.for_unit(info).schedule(info.tokens, LAYERS, info.grids).counts()


@pytest.mark.parametrize("key", ["qwen2-vl", "video-llava", "llava-next-video", "llava-onevision"])
@pytest.mark.parametrize("pool", ["frame", "video"])
def test_int_budget_is_tokens_per_frame(key, pool):
    model, batch = _built(key)
    method = vd.build("random", budget=3, pool=pool)
    with method.apply(model) as run:
        generate(model, batch, max_new_tokens=1)
    videos = run.report.videos()
    frames = [t for t, _, _ in _videos(key)]
    assert [v["counts"] for v in videos] == [[3 * t] for t in frames]
    if pool == "frame":
        assert [v["frame_counts"] for v in videos] == [[[3] * t] for t in frames]
    else:  # one pool: frames may keep different counts, the video keeps budget x frames
        assert all(sum(v["frame_counts"][0]) == v["counts"][0] for v in videos)
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
        positions = get_adapter(model).positions(batch, generate=False)  # M-RoPE: (3, B, L)
        if positions is None:  # 1-D RoPE: a plain forward numbers the columns
            positions = torch.arange(batch["input_ids"].shape[1]).expand(batch["input_ids"].shape[0], -1)
        seen["positions"] = positions
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
    # Dropped, never merged: every token is a kept one; preserve: each keeps its own position (1-D RoPE too).
    methods = [
        vd.build("divprune", budget=2, pool=pool, positions="preserve")
    ]  # selects in the projected space
    if (
        key == "llava-onevision"
    ):  # a vision-space selection: kept windows still carry their exact (pooled) features
        methods.append(vd.VisionDrop(stages=[(2, 0)], pool=pool, positions="preserve"))
    for method in methods:
        _check_kept_features(model, batch, pool, full, method)


def _check_kept_features(model, batch, pool: str, full: dict, method) -> None:
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
    for unit, (im, info) in enumerate(zip(report.images, infos, strict=True)):
        b, start = old_at[unit]
        b2, start2 = new_at[unit]
        assert b == b2
        placeholder = {
            p: i for i, p in enumerate(info.placeholder_patches()) if p >= 0
        }  # [CLS] first in a frame
        for j, patch in enumerate(im.stages[0].token_patch):
            col = start + placeholder[patch]
            torch.testing.assert_close(
                pruned["embeds"][b, start2 + j], full["embeds"][b, col], rtol=1e-5, atol=1e-5
            )
            assert torch.equal(pruned["positions"][..., b, start2 + j], full["positions"][..., b, col])
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
    smallest = min(per_frame for _, per_frame, _ in _videos(key))
    over = smallest + 1
    cases = [(vd.build("random", budget=over), f"budget={over} is more than the \\d+ visual tokens")]
    if key in ("qwen2-vl", "qwen2.5-vl"):  # images have more tokens than a frame: the frame refuses
        method = vd.build("random", budget=over, pool="video")
        cases.append(
            (method, f"budget={over} is more than the {smallest} visual tokens per frame of video 0")
        )
    if key == "qwen3-vl":
        cases.append((vd.build("visiondrop", budget=2, pool="video"), "pool='video'"))
    for method, text in cases:
        with pytest.raises(ValueError, match=text) as err, method.apply(model):
            generate(model, batch, max_new_tokens=1)
        assert "\n" not in str(err.value)
        assert model_state(model) == before
    with pytest.raises(ValueError, match="pool must be one of 'frame', 'video', got 'clip'"):
        vd.build("visiondrop", pool="clip")


@pytest.mark.parametrize(
    "key", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "video-llava", "llava-next-video", "llava-onevision"]
)
@pytest.mark.parametrize("pool", ["frame", "video"])
@pytest.mark.parametrize("name", vd.available_methods())
def test_every_method_runs_on_video_or_refuses(name, pool, key):
    model, batch = _built(key)
    method = vd.build(name, budget=0.5, pool=pool)
    before = model_state(model)
    try:
        with method.apply(model) as run:
            generate(model, batch, max_new_tokens=2)
    except ValueError as err:
        assert "\n" not in str(err)
        assert model_state(model) == before
        # Only the README's documented refusals may skip: [CLS]-ranked methods without a [CLS] to rank by; on
        # Qwen3-VL one pool per video (its timestamps split a video's placeholders) and an in-LLM boundary before
        # its DeepStack layers end (SparseVLM's first layer in the tiny model), as for its images.
        cls_refusal = name in ("visionzip", "vispruner") and "[CLS]" in str(err)
        qwen3_pool = key == "qwen3-vl" and pool == "video" and "pool='video'" in str(err)
        qwen3_deepstack = key == "qwen3-vl" and name == "sparsevlm" and "DeepStack" in str(err)
        assert cls_refusal or qwen3_pool or qwen3_deepstack, str(err)
        pytest.skip(str(err))
    assert model_state(model) == before
    adapter = get_adapter(model)
    adapter.pool = pool
    for im, info in zip(run.report.images, adapter.image_infos(batch), strict=True):
        assert im.counts() == method.for_unit(info).schedule(info.tokens, LAYERS, info.grids).counts()


def test_video_llava_scores_each_frame_by_its_own_cls():
    """``pool="video"`` lays the frames end to end; each frame is still scored by its own [CLS] (CLIP attends within
    a frame), exactly as the frame alone scores; ``score="cls"`` runs."""
    model, batch = _built("video-llava")
    adapter = get_adapter(model)
    adapter.pool = "frame"
    frames = {tuple(i): t for i, t in adapter.encode(batch)}
    adapter.pool = "video"
    whole = {tuple(i): t for i, t in adapter.encode(batch)}
    frame_group = next(t for i, t in frames.items() if len(i) == 2 * FRAMES)  # both videos' frames
    video_group = next(t for t in whole.values() if t.num_tokens == 17 * FRAMES)  # the two whole videos
    torch.testing.assert_close(
        video_group.cls_attention(), frame_group.cls_attention().reshape(2, -1), rtol=1e-5, atol=1e-6
    )
    per_frame = 17
    cls_columns = torch.arange(FRAMES) * per_frame
    assert torch.equal(video_group.patch_index[cls_columns], torch.full((FRAMES,), -1))
    assert video_group.patch_index.max() == FRAMES * 16 - 1
    with vd.build("visiondrop", budget=4, score="cls", pool="video").apply(model) as run:
        generate(model, batch, max_new_tokens=1)
    assert [v["counts"][0] for v in run.report.videos()] == [
        vd.build("visiondrop", budget=4 * FRAMES).schedule(per_frame * FRAMES, LAYERS).vision.tokens
    ] * 2


def test_video_llava_7b_config_and_flops_cost_8_frames():
    """The shipped config is Video-LLaVA-7B's published shape (transformers 5.24's VideoLlavaConfig defaults for the
    tower, token ids and sequence lengths; Vicuna-7B v1.5 for the LLM); ``visiondrop flops`` costs 8 frames, and
    pool="frame" vs pool="video" cost the same FLOPs up to rounding (only which frames keep the tokens differs)."""
    from transformers import VideoLlavaConfig

    from visiondrop import flops
    from visiondrop.tools.flops_cmd import estimate_costs

    defaults = VideoLlavaConfig()
    data, _ = flops.read_config("video-llava-7b")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size"):
        assert data["vision_config"][key] == getattr(defaults.vision_config, key), key
    assert data["vision_config"]["patch_size"] == defaults.vision_config.patch_size == 14
    for key in ("image_token_index", "video_token_index", "image_seq_length", "video_seq_length"):
        assert data[key] == getattr(defaults, key), key
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert data["text_config"][key] == getattr(defaults.text_config, key), key
    arch = flops.load_arch("video-llava-7b")
    assert (arch.video_frames, arch.vit_tokens_per_crop) == (8, 257)
    assert flops.load_arch("LanguageBind/Video-LLaVA-7B-hf") == arch
    shape = flops.image_shape(arch)
    assert (shape.tokens, shape.vit_tokens, shape.frames) == (8 * 257, (257,) * 8, 8)

    frame = estimate_costs("video-llava-7b", "visiondrop", budget=64)
    video = estimate_costs("video-llava-7b", "visiondrop", budget=64, settings={"pool": "video"})
    one = flops.prefill_flops(arch, visual_tokens_per_layer=257, vision_tokens=[257], text_tokens=64)
    assert frame.parts[0].unpruned_flops == pytest.approx(8 * one.vision)  # 8 ViT passes
    assert frame.schedule.layer_average == video.schedule.layer_average == 64 * 8  # budget 64 per frame
    assert frame.schedule.counts() == [
        8 * c for c in vd.build("visiondrop", budget=64).schedule(257, 32).counts()
    ]
    assert abs(frame.tflops - video.tflops) / frame.tflops < 0.01
    assert frame.unpruned_tflops == video.unpruned_tflops


def test_llava_next_video_scores_the_pooled_windows_the_llm_sees():
    """A LLaVA-NeXT-Video video token is one pooled 2 x 2 window: its score is the sum of its patches' [CLS]
    attention in its own frame, its features the resampler's output for that window (what the model projects)."""
    from visiondrop.compat import selected_hidden_states
    from visiondrop.models.llava import ClipVisionTokens

    model, batch = _built("llava-next-video")
    adapter = get_adapter(model)
    adapter.pool = "frame"
    videos = next(t for _, t in adapter.encode(batch) if t.num_tokens == 4)  # the frame units: 2 x 2 windows
    frames = batch["pixel_values_videos"].flatten(0, 1)
    layer_input, hidden = selected_hidden_states(
        model.model.vision_tower, frames, [adapter.feature_index - 1, adapter.feature_index]
    )
    alone = ClipVisionTokens(
        hidden, layer_input, adapter.scoring_layer, has_cls=True, grids=((4, 4),), project=lambda x: x
    )
    patch = alone.cls_attention()[:, 1:].reshape(-1, 2, 2, 2, 2)  # (frames, window row, r, window col, c)
    torch.testing.assert_close(videos.cls_attention(), patch.sum((2, 4)).flatten(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(videos.hidden, model.model.vision_resampler(hidden[:, 1:]))


def test_caller_encoded_video_features_are_refused_in_one_line():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, batch = _built("qwen2-vl")
    text_only = {k: batch[k][1:2] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    features = {"video": BaseModelOutputWithPooling(pooler_output=[torch.zeros(4, 64)])}
    before = model_state(model)
    with (
        vd.build("visiondrop", budget=2).apply(model),
        pytest.raises(
            ValueError, match=r"mm_encoder_outputs\['video'\]: videos must come as pixel_values_videos"
        ) as err,
    ):
        model(**text_only, mm_encoder_outputs=features)
    assert "\n" not in str(err.value)
    assert model_state(model) == before


def test_llava_onevision_scores_the_pooled_windows_the_llm_sees():
    """A LLaVA-OneVision video token is one bilinearly pooled window (2 x 2 patches on the tiny model, where the
    bilinear weights are a plain mean): its score is the mean of its patches' received visual attention in its own
    frame, its key the mean of theirs; kept windows carry exactly what ``get_video_features`` gives them, and the
    video's one newline follows its last frame."""
    from visiondrop import ops
    from visiondrop.compat import selected_hidden_states
    from visiondrop.models.llava_onevision import OnevisionVideoTokens

    model, batch = _built("llava-onevision")
    adapter = get_adapter(model)
    adapter.pool = "frame"
    units = [t for _, t in adapter.encode(batch) if isinstance(t, OnevisionVideoTokens)]
    assert len(units) == 2 * FRAMES and all(t.num_tokens == 4 for t in units)
    assert [t.newline is not None for t in units] == [f == FRAMES - 1 for f in range(FRAMES)] * 2
    videos = batch["pixel_values_videos"]
    with torch.no_grad():
        reference = model.model.get_video_features(videos).pooler_output  # (V, T * 4 + 1, D)
        layer_input, hidden = selected_hidden_states(
            model.model.vision_tower, videos.flatten(0, 1), [adapter.feature_index - 1, adapter.feature_index]
        )
        attn = adapter.scoring_layer.self_attn
        normed = adapter.scoring_layer.layer_norm1(layer_input)
        shape = (*normed.shape[:-1], attn.num_heads, attn.head_dim)
        q = attn.q_proj(normed).view(shape).transpose(1, 2)
        k = attn.k_proj(normed).view(shape).transpose(1, 2)
        patch = ops.visual_attention(
            q, k, None, torch.arange(16).expand(q.shape[0], -1), causal=False, scale=attn.scale
        )
        for unit, tokens in enumerate(units):
            video, frame = divmod(unit, FRAMES)
            windows = patch[unit].reshape(2, 2, 2, 2).mean((1, 3)).flatten()  # (window row, r, window col, c)
            torch.testing.assert_close(tokens.visual_attention()[0], windows, rtol=1e-5, atol=1e-7)
            pooled = hidden[unit].reshape(2, 2, 2, 2, -1).mean((1, 3)).flatten(0, 1)  # pre-projector windows
            torch.testing.assert_close(tokens.hidden[0], pooled, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                tokens.projected()[0], reference[video, frame * 4 : frame * 4 + 4], rtol=1e-5, atol=1e-6
            )
            with_newline = adapter.features(tokens, None)[0]
            expected = reference[video, frame * 4 : frame * 4 + 4 + (frame == FRAMES - 1)]
            torch.testing.assert_close(with_newline, expected, rtol=1e-5, atol=1e-6)


def test_llava_onevision_contextual_video_tokens_merge_pooled_vectors():
    """A merged OneVision video token (captured at the LLM input) = projector(anchor + mean(members)) of the pooled
    windows' pre-projector vectors, with the anchor and members the report gives; a dominant one is its exact
    (projected, then pooled) feature; the pruned unit that ends a video drops the video's newline."""
    from visiondrop.models.llava_onevision import OnevisionVideoTokens

    model, batch = _built("llava-onevision")
    adapter = get_adapter(model)
    adapter.pool = "frame"
    with torch.no_grad():
        units = [t for _, t in adapter.encode(batch) if isinstance(t, OnevisionVideoTokens)]
    seen, report = _llm_inputs(model, batch, vd.VisionDrop(stages=[(2, 1)], pool="frame"))
    frames = [im for im in report.images if im.video is not None]
    assert [im.stages[0].tokens for im in frames] == [3] * (2 * FRAMES)
    video_rows = [0, 2]  # ROWS: video 0 in row 0, video 1 in row 2
    checked = 0
    for unit, (tokens, im) in enumerate(zip(units, frames, strict=True)):
        video, frame = divmod(unit, FRAMES)
        row = video_rows[video]
        columns = (seen["ids"][row] == model.config.video_token_id).nonzero().flatten()
        assert len(columns) == 3 * FRAMES  # no newline survives a pruned last frame
        got = seen["embeds"][row][columns[3 * frame : 3 * frame + 3]]
        view = im.stages[0]
        owner = torch.tensor(view.patch_owner)
        for slot in range(3):
            anchor = view.token_patch[slot]
            if slot < 2:
                want = tokens.projected()[0, anchor]
            else:
                members = [p for p in (owner == slot).nonzero().flatten().tolist() if p != anchor]
                vector = tokens.hidden[0, anchor] + (tokens.hidden[0, members].mean(0) if members else 0)
                with torch.no_grad():
                    want = model.model.multi_modal_projector(vector)
            torch.testing.assert_close(got[slot], want, rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == 3 * 2 * FRAMES


@pytest.mark.skipif(VIDEO_LLAVA_TAKES_PIXEL_VALUES, reason="transformers >= 5.23 supports Video-LLaVA")
def test_video_llava_before_5_23_is_refused_in_one_line():
    """transformers < 5.23 calls Video-LLaVA's images pixel_values_images: refused before anything is installed."""
    from visiondrop.testing import tiny_video_llava

    model = tiny_video_llava()
    before = model_state(model)
    with (
        pytest.raises(ValueError, match=r"from transformers 5\.23") as err,
        vd.build("visiondrop").apply(model),
    ):
        pass
    assert "\n" not in str(err.value)
    assert model_state(model) == before
