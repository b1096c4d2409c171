"""Qwen3-VL (DeepStack, interleaved M-RoPE): the core's proofs on a tiny random model, in a padded batch of images of
different sizes and a text-only row."""

from __future__ import annotations

import copy

import pytest
import torch

import visiondrop as vd
from conftest import generate, model_state

GRIDS = [(8, 12), (6, 6), (10, 8)]  # patches (h, w); units are 2x2 patches
ROWS = [[1, 5, "image", 7, 8], [1, 5, 6, "image", 3, "image", 9], [1, 4, 4]]
UNITS = [h * w // 4 for h, w in GRIDS]
LAYERS = 8
DEEPSTACK = 2  # tiny config: ViT blocks 0 and 1 feed LLM layers 0 and 1


def _batch(**kwargs):
    from visiondrop.testing import qwen3_vl_inputs

    return qwen3_vl_inputs(ROWS, GRIDS, **kwargs)


@pytest.fixture(scope="module")
def qwen3():
    from visiondrop.testing import tiny_qwen3_vl

    model = tiny_qwen3_vl()
    batch = _batch()
    with torch.no_grad():  # install transformers' lazy output-capturing hooks before any state snapshot
        model(**batch, output_hidden_states=True)
        model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"], output_hidden_states=True)
    assert len(model.config.vision_config.deepstack_visual_indexes) == DEEPSTACK
    return model


def _capture_llm(model):
    """What the language model receives: input embeddings, DeepStack embeddings, their mask, the 3-D positions."""
    seen: dict = {}

    def hook(module, args, kwargs):
        for key in ("deepstack_visual_embeds", "visual_pos_masks", "position_ids", "inputs_embeds"):
            seen[key] = kwargs.get(key)

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


def test_qwen3_nothing_pruned_is_bit_identical(qwen3):
    batch = _batch()
    with torch.no_grad():
        reference = qwen3(**batch).logits
        tokens = generate(qwen3, batch)
        for method in (
            vd.build("none"),
            vd.VisionDrop(budget=1.0),
            vd.DART(budget=1.0),
            vd.FastV(budget=1.0),
        ):
            with method.apply(qwen3):
                assert torch.equal(qwen3(**batch).logits, reference)
                assert torch.equal(generate(qwen3, batch), tokens)


@pytest.mark.parametrize("budget", [0.25, 0.5, 6])
def test_qwen3_cached_decode_equals_recomputation_with_exact_counts(qwen3, budget):
    batch = _batch()
    method = vd.VisionDrop(budget=budget)
    before = model_state(qwen3)
    with method.apply(qwen3) as run:
        cached = generate(qwen3, batch, max_new_tokens=8)
        full = generate(qwen3, batch, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, full)
    assert model_state(qwen3) == before
    assert [len(s.images) for s in run.report.samples] == [1, 2, 0]
    for im, (h, w) in zip(run.report.images, GRIDS, strict=True):
        n = h * w // 4
        assert im.image_tokens == n and im.grids == ((h // 2, w // 2),)
        schedule = method.schedule(n, LAYERS, im.grids)
        assert im.counts() == schedule.counts()
        assert [st.layer for st in im.stages] == [s.layer for s in schedule.stages]
        assert all(s.layer >= DEEPSTACK for s in schedule.boundaries)  # default boundaries 2, 4, 6
        assert -1 not in im.stages[0].token_patch  # no [CLS] in a Qwen ViT


def test_qwen3_kept_units_get_their_own_deepstack_features_and_mrope_positions(qwen3):
    """Dominant-only vision stage: what the LLM receives for each kept unit — its main feature, every DeepStack level
    (captured at the language model's input) and its 3-D position — is what the unpruned model gives that unit."""
    batch = _batch()
    method = vd.VisionDrop(stages=[(6, 0)])
    with torch.no_grad():
        full, handle = _capture_llm(qwen3)
        try:
            qwen3(**batch)
        finally:
            handle.remove()
        merged = qwen3.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        pruned, handle = _capture_llm(qwen3)
        try:
            with method.apply(qwen3) as run:
                qwen3(**batch)
        finally:
            handle.remove()
    assert len(full["deepstack_visual_embeds"]) == len(pruned["deepstack_visual_embeds"]) == DEEPSTACK
    assert int(pruned["visual_pos_masks"].sum()) == 6 * len(GRIDS)
    image_cols = (
        (batch["input_ids"] == 99).nonzero().tolist()
    )  # unpruned (row, column) of every unit, in order
    offsets = [sum(UNITS[:i]) for i in range(len(UNITS))]
    for image, im in enumerate(run.report.images):
        kept = im.stages[0].kept_patches()
        assert len(kept) == 6 and im.counts() == [6]
        rows = [offsets[image] + k for k in kept]  # rows of the unpruned DeepStack tensors
        for level in range(DEEPSTACK):
            got = pruned["deepstack_visual_embeds"][level][6 * image : 6 * (image + 1)]
            torch.testing.assert_close(
                got, full["deepstack_visual_embeds"][level][rows], rtol=1e-5, atol=1e-5
            )
        cols = [image_cols[offsets[image] + k] for k in kept]
        # the main features: the pruned call's input embeddings at this image's visual columns
        row = cols[0][0]
        visual = pruned["inputs_embeds"][row][pruned["visual_pos_masks"][row]]
        first = sum(
            1 for i in range(image) if image_cols[offsets[i]][0] == row
        )  # images before it in the row
        torch.testing.assert_close(
            visual[6 * first : 6 * (first + 1)], merged[image][kept], rtol=1e-5, atol=1e-5
        )
        expected = torch.stack([full["position_ids"][:, r, c] for r, c in cols], dim=1)  # (3 or 4, kept)
        got_pos = pruned["position_ids"][:, row][
            :, pruned["visual_pos_masks"][row]
        ]  # this row's visual columns
        assert torch.equal(got_pos[:, 6 * first : 6 * (first + 1)], expected)


def test_qwen3_contextual_tokens_merge_every_deepstack_level_with_the_same_members(qwen3):
    """A merged token's DeepStack level = that level's merger MLP on anchor + mean(members) of its normalised units,
    with the anchor and members the report gives for the main features."""
    from visiondrop.models.qwen3_vl import Qwen3VLAdapter

    batch = _batch()
    method = vd.VisionDrop(stages=[(4, 3)])
    with torch.no_grad():
        groups = Qwen3VLAdapter(qwen3).encode(dict(batch))
        pruned, handle = _capture_llm(qwen3)
        try:
            with method.apply(qwen3) as run:
                qwen3(**batch)
        finally:
            handle.remove()
        mergers = qwen3.model.visual.deepstack_merger_list
        for image, ((_, tokens), im) in enumerate(zip(groups, run.report.images, strict=True)):
            view = im.stages[0]
            assert view.tokens == 7 and view.contextual == 3
            owner = torch.tensor(view.patch_owner)
            for level, merger in enumerate(mergers):
                units = tokens.deepstack[level][0]  # (n, 4 * Dv) normalised
                got = pruned["deepstack_visual_embeds"][level][7 * image : 7 * (image + 1)]
                for slot in range(7):
                    anchor = view.token_patch[slot]
                    if slot < 4:  # dominant: the unit itself
                        expected_units = units[anchor]
                    else:
                        members = [p for p in (owner == slot).nonzero().flatten().tolist() if p != anchor]
                        expected_units = units[anchor] + (units[members].mean(0) if members else 0)
                    expected = merger.linear_fc2(merger.act_fn(merger.linear_fc1(expected_units)))
                    torch.testing.assert_close(got[slot], expected, rtol=1e-5, atol=1e-5)


#: Methods that cannot run on Qwen3-VL, with the start of their one-line refusal.
REFUSED = {
    "visionzip": "visionzip ranks patches by [CLS] attention",
    "vispruner": "[CLS]",
    # SparseVLM's first scoring layer (the paper's 2 of 32, scaled to depth) falls inside the DeepStack layers.
    "sparsevlm": "DeepStack",
}


@pytest.mark.parametrize("name", vd.available_methods())
def test_qwen3_every_registered_method_runs_with_exact_counts(qwen3, name):
    batch = _batch()
    method = vd.build(name, budget=0.5)
    before = model_state(qwen3)
    if name in REFUSED:
        # Refused when attached, or at the first call once the image's schedule is known; one line either way.
        with pytest.raises(ValueError) as err, method.apply(qwen3):
            generate(qwen3, batch)
        assert REFUSED[name] in str(err.value) and "\n" not in str(err.value)
        assert model_state(qwen3) == before
        pytest.skip(str(err.value))
    with method.apply(qwen3) as run:
        first = generate(qwen3, batch)
        assert torch.equal(generate(qwen3, batch), first)
    assert model_state(qwen3) == before
    assert [len(s.images) for s in run.report.samples] == [1, 2, 0]
    for im, n in zip(run.report.images, UNITS, strict=True):
        schedule = method.schedule(n, LAYERS, im.grids)
        assert im.counts() == schedule.counts()
        assert [st.layer for st in im.stages] == [s.layer for s in schedule.stages]


@pytest.mark.parametrize(
    "method",
    [
        vd.FastV(budget=0.5, layer=1),
        vd.VisionDrop(stages=[(8, 0), (1, 4, 0)]),
        vd.PyramidDrop(budget=0.5, boundaries=[1, 4, 6]),
    ],
    ids=["fastv", "visiondrop", "pyramiddrop"],
)
def test_qwen3_boundary_before_deepstack_ends_is_refused(qwen3, method):
    batch = _batch()
    before = model_state(qwen3)
    with method.apply(qwen3), pytest.raises(ValueError) as err:
        generate(qwen3, batch)
    message = str(err.value)
    assert (
        message.startswith("boundary after layer 1: Qwen3-VL adds DeepStack features") and "\n" not in message
    )
    assert "must be at layer >= 2" in message
    assert model_state(qwen3) == before


def test_qwen3_boundary_right_after_deepstack_is_consistent(qwen3):
    batch = _batch()
    method = vd.DART(budget=0.5, layer=DEEPSTACK)  # visual-only: decode-consistent
    with method.apply(qwen3) as run:
        cached = generate(qwen3, batch, max_new_tokens=8)
        full = generate(qwen3, batch, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, full)
    for im, n in zip(run.report.images, UNITS, strict=True):
        assert im.counts() == method.schedule(n, LAYERS, im.grids).counts()
        assert im.tokens_per_layer()[:DEEPSTACK] == [n] * DEEPSTACK


def test_qwen3_refusals(qwen3):
    before = model_state(qwen3)
    for method, needle in (
        (vd.VisionDrop(budget=0.5, positions="compact"), "positions='compact' has no meaning for Qwen3-VL"),
        (vd.VisionDrop(budget=0.5, score="cls"), "score='cls' needs a vision encoder with [CLS]"),
        (vd.VisionZip(budget=8), "visionzip ranks patches by [CLS] attention and Qwen3-VL's"),
    ):
        with pytest.raises(ValueError) as err, method.apply(qwen3):
            pass
        assert needle in str(err.value) and "\n" not in str(err.value)
    batch = _batch()
    batch["pixel_values_videos"] = torch.zeros(4, 3 * 2 * 16 * 16)
    with (
        vd.VisionDrop(budget=0.5).apply(qwen3),
        pytest.raises(ValueError, match="video_grid_thw is missing"),  # videos need their grids
    ):
        qwen3(**batch)
    assert model_state(qwen3) == before


def test_qwen3_restored_after_an_exception(qwen3):
    batch = _batch()
    with torch.no_grad():
        reference = qwen3(**batch).logits
    before = model_state(qwen3)
    with pytest.raises(RuntimeError, match="boom"), vd.VisionDrop(budget=0.25).apply(qwen3):
        generate(qwen3, batch)
        raise RuntimeError("boom")
    assert model_state(qwen3) == before
    with torch.no_grad():
        assert torch.equal(qwen3(**batch).logits, reference)


def test_qwen3_projector_cost_counts_the_deepstack_mergers(qwen3):
    """Qwen3-VL's projector cost = the main merger plus one merger per DeepStack level, from the model's weights."""
    from visiondrop import flops

    arch = flops.ArchSpec.from_config(qwen3.config)
    visual = qwen3.model.visual
    mergers = [visual.merger, *visual.deepstack_merger_list]
    weights = sum(m.linear_fc1.weight.numel() + m.linear_fc2.weight.numel() for m in mergers)
    assert flops.projector_flops(arch, 10) == 2 * 10 * weights
    assert arch.patch_size == 16 and arch.vit_layers == 3 and arch.num_layers == LAYERS
    with vd.VisionDrop(budget=0.5).apply(qwen3) as run:
        generate(qwen3, _batch())
    assert run.report.flops is not None and run.report.flops["ratio"] > 1


def test_qwen3_vl_8b_shipped_config_is_what_transformers_reads():
    from transformers import Qwen3VLConfig

    from visiondrop import flops

    data, _ = flops.read_config("qwen3-vl-8b")
    fields = copy.deepcopy({k: v for k, v in data.items() if k not in ("architectures", "model_type")})
    config = Qwen3VLConfig(**fields)  # (it rewrites the nested dicts it is given)
    arch = flops.ArchSpec.from_config(data)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.kv_width, arch.ffn_size) == (
        config.text_config.num_hidden_layers,
        config.text_config.hidden_size,
        config.text_config.num_attention_heads,
        config.text_config.num_key_value_heads * config.text_config.head_dim,
        config.text_config.intermediate_size,
    )
    assert list(config.vision_config.deepstack_visual_indexes) == [8, 16, 24]
    assert arch.projector_hidden == 4 * (4 * config.vision_config.hidden_size)  # main + 3 DeepStack mergers
    assert flops.read_config("Qwen/Qwen3-VL-8B-Instruct")[0] == data
