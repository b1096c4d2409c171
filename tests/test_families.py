"""LLaVA-NeXT and Qwen2-VL / Qwen2.5-VL: the core's proofs on tiny random models, in padded batches of mixed sizes."""

from __future__ import annotations

import pytest
import torch

import visiondrop as vd
from conftest import NEXT_SIZES, generate, model_state, next_batch
from visiondrop.models.llava_next import LlavaNextAdapter
from visiondrop.testing import tiny_llava_next


@pytest.fixture(scope="module", params=["llama", "mistral"])
def next_model(request):
    model = tiny_llava_next(text=request.param)
    with torch.no_grad():  # install transformers' lazy output-capturing hooks before any state snapshot
        model(**next_batch(model), output_hidden_states=True)
        model.model.vision_tower(torch.randn(1, 3, 56, 56), output_hidden_states=True)
    return model


def _counts(model) -> list[int]:
    return [info.tokens for info in LlavaNextAdapter(model).image_infos(next_batch(model))]


def test_next_placeholder_counts_are_what_transformers_packs(next_model):
    batch = next_batch(next_model)
    with torch.no_grad():
        packed = next_model.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"]
        ).pooler_output
    assert [p.shape[0] for p in packed] == _counts(next_model)


@pytest.mark.parametrize(
    "make", [lambda: vd.build("none"), lambda: vd.VisionDrop(budget=1.0), lambda: vd.FastV(budget=1.0)]
)
def test_next_keeping_everything_is_bit_identical(next_model, make):
    batch = next_batch(next_model)
    with torch.no_grad():
        reference = next_model(**batch).logits
        tokens = generate(next_model, batch)
        with make().apply(next_model):
            assert torch.equal(next_model(**batch).logits, reference)
            assert torch.equal(generate(next_model, batch), tokens)


@pytest.mark.parametrize("budget", [0.25, 0.5, 30])
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_next_cached_decode_equals_recomputation_with_exact_counts(next_model, budget, positions):
    batch = next_batch(next_model)
    method = vd.VisionDrop(budget=budget, positions=positions)
    before = model_state(next_model)
    with method.apply(next_model) as run:
        cached = generate(next_model, batch, max_new_tokens=8)
        full = generate(next_model, batch, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, full)
    assert model_state(next_model) == before
    counts = _counts(next_model)
    assert [len(s.images) for s in run.report.samples] == [1, 2, 0]
    for im, n in zip(run.report.images, counts, strict=True):
        schedule = method.schedule(n, 8, im.grids)
        assert im.image_tokens == n and im.counts() == schedule.counts()
        if isinstance(budget, float):  # a fraction of each image's own count
            assert schedule.layer_average == pytest.approx(budget * n, abs=1)


def _crop_cls_scores(model, batch) -> list[torch.Tensor]:
    """Per image, each patch's score from its own crop's [CLS] (base view then unpadded cells), by hand."""
    adapter = LlavaNextAdapter(model)
    out = []
    pixel = batch["pixel_values"]
    for image, size in enumerate(NEXT_SIZES):
        nh, nw, (r0, r1, c0, c1) = adapter._layout(size)
        crops = pixel[image, : 1 + nh * nw]
        tower = model.model.vision_tower
        hs = tower(crops, output_hidden_states=True).hidden_states
        idx = len(hs) - 1 + model.config.vision_feature_layer
        layer = tower.encoder.layers[idx]
        attn = layer.self_attn
        x = layer.layer_norm1(hs[idx])
        q = attn.q_proj(x).view(x.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(x.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2)
        cls = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)[:, 0, 1:]  # (crops, 16)
        side = 4
        grid = cls[1:].view(nh, nw, side, side).permute(0, 2, 1, 3).reshape(nh * side, nw * side)
        out.append(torch.cat([cls[0], grid[r0:r1, c0:c1].flatten()]))
    return out


def test_next_vision_stage_ranks_every_patch_by_its_own_crops_cls_and_drops_newlines(next_model):
    batch = next_batch(next_model)
    method = vd.VisionDrop(budget=0.5, keep_cls=False)
    with torch.no_grad():
        scores = _crop_cls_scores(next_model, batch)
        with method.apply(next_model) as run:
            next_model(**batch)
    for im, s in zip(run.report.images, scores, strict=True):
        view = im.stages[0]
        dominant = view.tokens - view.contextual
        assert view.kept_patches() == sorted(s.topk(dominant).indices.tolist())
        assert (
            -1 not in view.token_patch
        )  # no newline token survives a pruned vision stage (and no [CLS] here)
        assert all(o >= 0 for o in view.patch_owner)  # every patch kept or merged
        assert len(view.patch_owner) == 16 + im.grids[1][0] * im.grids[1][1]


def test_next_identity_stage_keeps_newlines_for_in_llm_methods(next_model):
    batch = next_batch(next_model)
    with vd.FastV(budget=0.5).apply(next_model) as run:
        generate(next_model, batch)
    first = run.report.images[0].stages[0]
    rows = run.report.images[0].grids[1][0]
    assert first.token_patch.count(-1) == rows  # one newline per high-resolution row


def test_next_errors(next_model):
    batch = next_batch(next_model)
    smallest = min(_counts(next_model))
    before = model_state(next_model)
    with vd.VisionDrop(budget=smallest + 1).apply(next_model), pytest.raises(ValueError) as err:
        generate(next_model, batch)
    assert f"budget={smallest + 1} is more than the {smallest} visual tokens" in str(err.value)
    del batch["image_sizes"]
    with (
        vd.VisionDrop(budget=0.5).apply(next_model),
        pytest.raises(ValueError, match="image_sizes is missing"),
    ):
        generate(next_model, batch)
    assert model_state(next_model) == before


# ---------------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL
# ---------------------------------------------------------------------------------------------------------------

QWEN_GRIDS = [(8, 12), (6, 6), (10, 8)]
QWEN_ROWS = [[1, 5, "image", 7, 8], [1, 5, 6, "image", 3, "image", 9], [1, 4, 4]]


@pytest.fixture(scope="module", params=["2", "2.5"])
def qwen(request):
    from visiondrop.testing import tiny_qwen2_vl

    model = tiny_qwen2_vl(version=request.param)
    with torch.no_grad():
        model(**_qwen_batch(), output_hidden_states=True)
        model.model.visual(
            _qwen_batch()["pixel_values"], grid_thw=_qwen_batch()["image_grid_thw"], output_hidden_states=True
        )
    return model


def _qwen_batch(**kwargs):
    from visiondrop.testing import qwen_inputs

    return qwen_inputs(QWEN_ROWS, QWEN_GRIDS, **kwargs)


def test_qwen_nothing_pruned_is_bit_identical(qwen):
    batch = _qwen_batch()
    with torch.no_grad():
        reference = qwen(**batch).logits
        tokens = generate(qwen, batch)
        for method in (vd.build("none"), vd.VisionDrop(budget=1.0), vd.DART(budget=1.0)):
            with method.apply(qwen):
                assert torch.equal(qwen(**batch).logits, reference)
                assert torch.equal(generate(qwen, batch), tokens)


@pytest.mark.parametrize("budget", [0.25, 0.5, 6])
def test_qwen_cached_decode_equals_recomputation_with_exact_counts(qwen, budget):
    batch = _qwen_batch()
    method = vd.VisionDrop(budget=budget)
    before = model_state(qwen)
    with method.apply(qwen) as run:
        cached = generate(qwen, batch, max_new_tokens=8)
        full = generate(qwen, batch, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, full)
    assert model_state(qwen) == before
    assert [len(s.images) for s in run.report.samples] == [1, 2, 0]
    for im, (h, w) in zip(run.report.images, QWEN_GRIDS, strict=True):
        n = h * w // 4
        assert im.image_tokens == n and im.grids == ((h // 2, w // 2),)
        assert im.counts() == method.schedule(n, 8, im.grids).counts()
        assert -1 not in im.stages[0].token_patch  # no [CLS] in a Qwen ViT


def _capture(module, key):
    seen = {}

    def hook(mod, args, kwargs):
        seen[key] = kwargs.get(key)

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def test_qwen_kept_units_are_raster_units_with_their_original_mrope_positions(qwen):
    """Dominant-only selection: the features given to the LLM are the unpruned merger outputs of the kept units, and
    their 3-D positions are the unpruned model's, gathered (so the window permutation of 2.5 is undone)."""
    batch = _qwen_batch()
    method = vd.VisionDrop(stages=[(6, 0)], positions="preserve")
    with torch.no_grad():
        merged = qwen.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        positions, _ = qwen.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        features, handle = _capture(qwen.model, "mm_encoder_outputs")
        given, handle2 = _capture(qwen.model.language_model, "position_ids")
        try:
            with method.apply(qwen) as run:
                qwen(**batch)
        finally:
            handle.remove()
            handle2.remove()
    feats = features["mm_encoder_outputs"]["image"].pooler_output
    image_cols = (batch["input_ids"] == 99).nonzero().tolist()
    cursor = 0
    for image, im in enumerate(run.report.images):
        kept = im.stages[0].kept_patches()
        torch.testing.assert_close(feats[image], merged[image][kept])
        n = im.image_tokens
        cols = [image_cols[cursor + k] for k in kept]  # (row, column) of each kept unit in the unpruned input
        cursor += n
        expected = torch.stack([positions[:, r, c] for r, c in cols], dim=1)  # (3, kept)
        got = given["position_ids"][:, cols[0][0]]  # (3, pruned length) of this image's row
        for i in range(len(kept)):
            assert any(torch.equal(got[:, j], expected[:, i]) for j in range(got.shape[-1]))


def test_qwen_refusals(qwen):
    before = model_state(qwen)
    for method, needle in (
        (vd.VisionDrop(budget=0.5, positions="compact"), "positions='compact' has no meaning"),
        (vd.VisionDrop(budget=0.5, score="cls"), "score='cls' needs a vision encoder with [CLS]"),
        (vd.VisionZip(budget=8), "visionzip ranks patches by [CLS] attention"),
    ):
        with pytest.raises(ValueError) as err, method.apply(qwen):
            pass
        assert needle in str(err.value) and "\n" not in str(err.value)
    batch = _qwen_batch()
    batch["pixel_values_videos"] = torch.zeros(4, 3 * 2 * 14 * 14)
    with (
        vd.VisionDrop(budget=0.5).apply(qwen),
        pytest.raises(ValueError, match="video_grid_thw is missing"),  # videos need their grids
    ):
        qwen(**batch)
    assert model_state(qwen) == before


def test_qwen_second_generate_continues_the_conversation(qwen):
    batch = _qwen_batch()
    turn = torch.tensor([[11, 12], [13, 14], [15, 16]])
    with vd.VisionDrop(budget=0.5).apply(qwen):
        first = generate(qwen, batch, max_new_tokens=4, return_dict_in_generate=True, eos_token_id=None)
        ids = torch.cat([first.sequences, turn], dim=1)
        grow = ids.shape[1] - batch["input_ids"].shape[1]
        mask = torch.cat([batch["attention_mask"], torch.ones(3, grow, dtype=torch.long)], dim=1)
        types = torch.cat([batch["mm_token_type_ids"], torch.zeros(3, grow, dtype=torch.long)], dim=1)
        follow = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
        second = generate(
            qwen, follow, past_key_values=first.past_key_values, max_new_tokens=5, eos_token_id=None
        )
        whole = {**follow, "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
        reference = generate(qwen, whole, max_new_tokens=5, use_cache=False, eos_token_id=None)
    assert torch.equal(second, reference)
