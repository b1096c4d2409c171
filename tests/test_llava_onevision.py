"""LLaVA-OneVision images (SigLIP without [CLS], AnyRes-Max, Qwen2 LLM): the core's proofs on a tiny random model, in a
padded batch of three images of different sizes (one grid as it is, two that AnyRes-Max downscales, one of them
unpadded) and a text-only row."""

from __future__ import annotations

import argparse
import copy
import json
from types import SimpleNamespace

import pytest
import torch

import visiondrop as vd
from conftest import IMAGE_TOKEN, ONEVISION_SIZES, generate, model_state, onevision_batch
from visiondrop.models.llava_onevision import LlavaOnevisionAdapter

LAYERS = 8
GRIDS = [(4, 8), (6, 6), (7, 6)]  # the high-resolution grid of each image as the LLM sees it
DOWNSCALED = [False, True, True]


@pytest.fixture(scope="module")
def ov():
    from visiondrop.testing import tiny_llava_onevision

    model = tiny_llava_onevision()
    batch = onevision_batch(model)
    with torch.no_grad():  # install transformers' lazy output-capturing hooks before any state snapshot
        model(**batch, output_hidden_states=True)
        model.model.vision_tower(torch.randn(1, 3, 56, 56), output_hidden_states=True)
    return model


def _infos(model):
    return LlavaOnevisionAdapter(model).image_infos(onevision_batch(model))


def _capture_llm(model):
    """The token ids the inner model receives (shrunk when pruned) and the input embeddings of the language model."""
    seen: dict = {}

    def ids_hook(module, args, kwargs):
        seen["input_ids"] = kwargs.get("input_ids")

    def embeds_hook(module, args, kwargs):
        seen["inputs_embeds"] = kwargs.get("inputs_embeds")

    handles = [
        model.model.register_forward_pre_hook(ids_hook, with_kwargs=True),
        model.model.language_model.register_forward_pre_hook(embeds_hook, with_kwargs=True),
    ]
    return seen, handles


def test_onevision_layout_is_what_transformers_packs(ov):
    """Placeholder counts and grids per image equal what transformers packs, downscaled where AnyRes-Max says."""
    batch = onevision_batch(ov)
    infos = _infos(ov)
    with torch.no_grad():
        packed = ov.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    assert [p.shape[0] for p in packed] == [info.tokens for info in infos]
    assert [info.grids for info in infos] == [((4, 4), g) for g in GRIDS]
    assert [info.vit_tokens for info in infos] == [(16,) * 3, (16,) * 5, (16,) * 10]
    groups = LlavaOnevisionAdapter(ov).encode(dict(batch))
    assert [tokens.downscaled for _, tokens in groups] == DOWNSCALED
    assert all(not tokens.has_cls and tokens.patch_mask.all() for _, tokens in groups)


def test_onevision_tokens_are_the_llm_granularity(ov):
    """Each token's exact feature is the LLM input of its placeholder (newlines skipped), downscaled cells included;
    on the grid that is not downscaled every cell is one patch of one tile, with that patch's own visual score."""
    from visiondrop import ops

    batch = onevision_batch(ov)
    adapter = LlavaOnevisionAdapter(ov)
    with torch.no_grad():
        packed = ov.model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
        groups = adapter.encode(dict(batch))
        for (_, tokens), want in zip(groups, packed, strict=True):
            exact = tokens.projected()[0]
            torch.testing.assert_close(exact, want[tokens.placeholder_offset], rtol=1e-5, atol=1e-6)
            assert torch.equal(
                adapter.features(tokens, None)[0], want
            )  # identity path: transformers' packing
        # image 0: 1 x 2 tiles of 4 x 4 patches, nothing unpadded or downscaled (crops 0 = base, 1 and 2 = tiles)
        _, tokens = groups[0]
        crops = batch["pixel_values"][0, :3]
        from visiondrop.compat import selected_hidden_states

        layer_input, hidden = selected_hidden_states(
            ov.model.vision_tower, crops, [adapter.feature_index - 1, adapter.feature_index]
        )
        attn = adapter.scoring_layer.self_attn
        normed = adapter.scoring_layer.layer_norm1(layer_input)
        shape = (*normed.shape[:-1], attn.num_heads, attn.head_dim)
        q = attn.q_proj(normed).view(shape).transpose(1, 2)
        k = attn.k_proj(normed).view(shape).transpose(1, 2)
        scores = ops.visual_attention(
            q, k, None, torch.arange(16).expand(3, -1), causal=False, scale=attn.scale
        )
        for row in range(4):
            for col in range(8):
                cell = 16 + row * 8 + col
                crop, patch = 1 + col // 4, row * 4 + col % 4
                torch.testing.assert_close(tokens.hidden[0, cell], hidden[crop, patch], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(
                    tokens.visual_attention()[0, cell], scores[crop, patch], rtol=1e-5, atol=1e-7
                )
        torch.testing.assert_close(tokens.visual_attention()[0, :16], scores[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "make",
    [
        lambda: vd.build("none"),
        lambda: vd.VisionDrop(budget=1.0),
        lambda: vd.FastV(budget=1.0),
        lambda: vd.DART(budget=1.0),
    ],
    ids=["none", "visiondrop", "fastv", "dart"],
)
def test_onevision_nothing_pruned_is_bit_identical(ov, make):
    batch = onevision_batch(ov)
    with torch.no_grad():
        reference = ov(**batch).logits
        tokens = generate(ov, batch)
        with make().apply(ov):
            assert torch.equal(ov(**batch).logits, reference)
            assert torch.equal(generate(ov, batch), tokens)


@pytest.mark.parametrize("budget", [0.25, 0.5, 12])
@pytest.mark.parametrize("positions", ["compact", "preserve"])
def test_onevision_cached_decode_equals_recomputation_with_exact_counts(ov, budget, positions):
    batch = onevision_batch(ov)
    method = vd.VisionDrop(budget=budget, positions=positions)
    before = model_state(ov)
    with method.apply(ov) as run:
        cached = generate(ov, batch, max_new_tokens=8)
        full = generate(ov, batch, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, full)
    assert model_state(ov) == before
    assert [len(s.images) for s in run.report.samples] == [1, 2, 0]
    for im, info in zip(run.report.images, _infos(ov), strict=True):
        n = info.tokens
        schedule = method.schedule(n, LAYERS, im.grids)
        assert im.image_tokens == n and im.grids == info.grids
        assert im.counts() == schedule.counts(), schedule.describe()
        assert [st.layer for st in im.stages] == [s.layer for s in schedule.stages]
        assert -1 not in im.stages[0].token_patch  # no [CLS], and the pruned stage drops the newlines
        assert abs(schedule.layer_average - method.budget_tokens(n)) <= 1.5


def test_onevision_processor_batch_num_images_of_ones_changes_nothing(ov):
    """The processor passes ``batch_num_images`` (one image per prompt: ones); pruning takes it and drops it."""
    batch = onevision_batch(ov)
    with vd.VisionDrop(budget=0.3).apply(ov):
        plain = generate(ov, batch, max_new_tokens=4)
        ones = generate(ov, {**batch, "batch_num_images": torch.tensor([1, 1, 1])}, max_new_tokens=4)
    assert torch.equal(plain, ones)


def test_onevision_several_images_per_prompt(ov):
    """``batch_num_images`` [1, 2, 0] (the processor's multi-image prompt): the second prompt's images are their base
    view and one newline, as transformers packs them; nothing pruned is bit-identical; VisionDrop's cached decode
    equals recomputation with exact counts per image (the newline is the image's tail, dropped when pruned)."""
    batch = onevision_batch(ov, several=True)
    infos = LlavaOnevisionAdapter(ov).image_infos(batch)
    with torch.no_grad():
        packed = ov.model.get_image_features(
            batch["pixel_values"], batch["image_sizes"], batch_num_images=batch["batch_num_images"]
        )
    packed = packed.pooler_output if hasattr(packed, "pooler_output") else packed
    assert [f.shape[0] for f in packed] == [i.tokens for i in infos] == [infos[0].tokens, 17, 17]
    assert [i.tail for i in infos] == [0, 1, 1] and infos[1].grids == ((4, 4),)
    before = model_state(ov)
    with torch.no_grad():
        reference = ov(**batch).logits
        tokens = generate(ov, batch)
        for method in (vd.build("none"), vd.VisionDrop(budget=1.0)):
            with method.apply(ov):
                assert torch.equal(ov(**batch).logits, reference)
                assert torch.equal(generate(ov, batch), tokens)
    for budget in (0.5, 6):
        method = vd.VisionDrop(budget=budget)
        with method.apply(ov) as run:
            cached = generate(ov, batch, max_new_tokens=8)
            full = generate(ov, batch, max_new_tokens=8, use_cache=False)
        assert torch.equal(cached, full)
        assert [len(s.images) for s in run.report.samples] == [1, 2, 0]
        for im, info in zip(run.report.images, infos, strict=True):
            assert im.image_tokens == info.tokens
            assert im.counts() == method.schedule(info.tokens, LAYERS, info.grids).counts()
            assert -1 not in im.stages[0].token_patch  # the pruned stage dropped the newline
    assert model_state(ov) == before


@pytest.mark.parametrize("several", [False, True], ids=["one-per-prompt", "several-per-prompt"])
def test_onevision_kept_tokens_carry_their_own_features(ov, several):
    """Dominant-only vision stage: what the LLM receives for each kept token (captured at the language model's input)
    is what the unpruned model gives that token's placeholder — a downscaled cell's downscaled projected feature; with
    several images per prompt, a base-view patch's."""
    batch = onevision_batch(ov, several=several)
    method = vd.VisionDrop(stages=[(12, 0)])
    with torch.no_grad():
        full, handles = _capture_llm(ov)
        try:
            ov(**batch)
        finally:
            [h.remove() for h in handles]
        pruned, handles = _capture_llm(ov)
        try:
            with method.apply(ov) as run:
                ov(**batch)
        finally:
            [h.remove() for h in handles]
    image_rows = [0, 1, 1]
    infos = LlavaOnevisionAdapter(ov).image_infos(batch)
    for image, (im, info) in enumerate(zip(run.report.images, infos, strict=True)):
        assert im.counts() == [12]
        kept = im.stages[0].kept_patches()
        assert len(kept) == 12
        row = image_rows[image]
        before = [i for i in range(image) if image_rows[i] == row]  # images earlier in the same row
        columns = (full["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
        first = sum(infos[i].tokens for i in before)
        patch_of = info.placeholder_patches()
        unpruned = [int(columns[first + patch_of.index(p)]) for p in kept]
        pruned_cols = (pruned["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
        assert len(pruned_cols) == 12 * image_rows.count(row)
        ours = pruned_cols[12 * len(before) : 12 * (len(before) + 1)]
        torch.testing.assert_close(
            pruned["inputs_embeds"][row][ours], full["inputs_embeds"][row][unpruned], rtol=1e-5, atol=1e-6
        )


def test_onevision_contextual_tokens_merge_the_reported_members(ov):
    """What the LLM receives (captured at its input) for a merged token = projector(anchor + mean(members)) of the
    tokens' pre-projector vectors (a downscaled cell's: the bilinear mix of its patches), with the anchor and members
    the report gives; for a dominant token, its exact feature."""
    batch = onevision_batch(ov)
    method = vd.VisionDrop(stages=[(8, 4)])
    image_rows = [0, 1, 1]
    with torch.no_grad():
        groups = LlavaOnevisionAdapter(ov).encode(dict(batch))
        pruned, handles = _capture_llm(ov)
        try:
            with method.apply(ov) as run:
                ov(**batch)
        finally:
            [h.remove() for h in handles]
        for image, ((_, tokens), im) in enumerate(zip(groups, run.report.images, strict=True)):
            view = im.stages[0]
            assert view.tokens == 12 and view.contextual == 4
            row = image_rows[image]
            earlier = len([i for i in range(image) if image_rows[i] == row])
            columns = (pruned["input_ids"][row] == IMAGE_TOKEN).nonzero().flatten()
            got = pruned["inputs_embeds"][row][columns[12 * earlier : 12 * (earlier + 1)]]
            owner = torch.tensor(view.patch_owner)
            exact = tokens.projected()[0]
            for slot in range(12):
                anchor = view.token_patch[slot]
                if slot < 8:
                    torch.testing.assert_close(got[slot], exact[anchor], rtol=1e-5, atol=1e-5)
                else:
                    members = [p for p in (owner == slot).nonzero().flatten().tolist() if p != anchor]
                    vector = tokens.hidden[0, anchor] + (tokens.hidden[0, members].mean(0) if members else 0)
                    want = ov.model.multi_modal_projector(vector)
                    torch.testing.assert_close(got[slot], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fastv", "pyramiddrop", "sparsevlm", "holov", "pooling", "divprune"])
def test_onevision_other_methods_keep_exact_counts(ov, name):
    batch = onevision_batch(ov)
    method = vd.build(name, budget=0.4)
    with method.apply(ov) as run:
        generate(ov, batch, max_new_tokens=2)
    for im, info in zip(run.report.images, _infos(ov), strict=True):
        assert im.counts() == method.schedule(info.tokens, LAYERS, im.grids).counts()


def test_onevision_refusals(ov):
    before = model_state(ov)
    for method, needle in (
        (
            vd.VisionDrop(budget=0.5, score="cls"),
            "score='cls' needs a vision encoder with [CLS] and LLaVA-OneVision's",
        ),
        (vd.VisionZip(budget=8), "visionzip ranks patches by [CLS] attention and LLaVA-OneVision's"),
        (vd.build("vispruner", budget=8), "vispruner ranks patches by [CLS] attention and LLaVA-OneVision's"),
    ):
        with pytest.raises(ValueError) as err, method.apply(ov):
            pass
        assert needle in str(err.value) and "\n" not in str(err.value)
    cases = [
        (
            {"pixel_values_videos": torch.zeros(2, 3, 56, 56)},
            "pixel_values_videos of shape (2, 3, 56, 56): LLaVA-OneVision takes (videos, frames, 3, H, W)",
        ),
        (
            {"batch_num_images": torch.tensor([2, 2])},
            "batch_num_images=[2, 2] does not add up to 3 images",
        ),
        ({"vision_aspect_ratio": "anyres_max_1"}, "vision_aspect_ratio='anyres_max_1' differs"),
        ({"image_sizes": None}, "image_sizes is missing"),
    ]
    for extra, needle in cases:
        batch = {**onevision_batch(ov), **extra}
        with vd.VisionDrop(budget=0.5).apply(ov), pytest.raises(ValueError) as err:
            generate(ov, batch, max_new_tokens=1)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert model_state(ov) == before


def test_onevision_config_refusals():
    from visiondrop.testing import tiny_llava_onevision

    model = tiny_llava_onevision(layers=2)
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(
        ValueError, match="vision_feature_select_strategy='default': visiondrop supports 'full'"
    ):
        vd.VisionDrop(budget=0.5).apply(model).__enter__()
    model.config.vision_feature_select_strategy = "full"
    model.config.vision_aspect_ratio = "anyres"
    with pytest.raises(ValueError, match="vision_aspect_ratio='anyres'"):
        vd.VisionDrop(budget=0.5).apply(model).__enter__()


def test_onevision_restored_after_use_and_after_an_exception(ov):
    batch = onevision_batch(ov)
    with torch.no_grad():
        reference = ov(**batch).logits
    before = model_state(ov)
    with vd.VisionDrop(budget=0.25).apply(ov):
        generate(ov, batch)
    assert model_state(ov) == before
    with pytest.raises(RuntimeError, match="boom"), vd.VisionDrop(budget=0.25).apply(ov):
        generate(ov, batch)
        raise RuntimeError("boom")
    assert model_state(ov) == before
    with torch.no_grad():
        assert torch.equal(ov(**batch).logits, reference)


def test_onevision_costs_from_the_tiny_model(ov):
    """The FLOPs description of the tiny model is its weights' shapes; a pruned call reports its savings."""
    from visiondrop import flops
    from visiondrop.models.llava_onevision import llava_onevision_image_tokens

    arch = flops.ArchSpec.from_config(ov.config)
    projector = ov.model.multi_modal_projector
    assert (arch.vit_tokens_per_crop, arch.vit_cls_tokens, arch.image_features_per_crop) == (16, 0, 16)
    assert arch.anyres_max_patches == 3 and arch.max_crops == 10 and arch.num_layers == LAYERS
    weights = projector.linear_1.weight.numel() + projector.linear_2.weight.numel()
    assert flops.projector_flops(arch, 10) == 2 * 10 * weights
    assert [llava_onevision_image_tokens(arch, *size) for size in ONEVISION_SIZES] == [
        (len(info.vit_tokens), info.tokens) for info in _infos(ov)
    ]
    with vd.VisionDrop(budget=0.5).apply(ov) as run:
        generate(ov, onevision_batch(ov), max_new_tokens=1)
    assert run.report.flops is not None and run.report.flops["ratio"] > 1


def test_llava_onevision_7b_shipped_config_is_what_transformers_reads():
    """The shipped config's dimensions are what transformers' LlavaOnevisionConfig reads from it, its SigLIP tower is
    transformers' default one (384 px / 14 = 27 x 27 = 729 tokens, 26 layers), and its image token counts are the
    processor's for any size."""
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    from visiondrop import flops
    from visiondrop.models.llava_onevision import DEFAULT_PINPOINTS, llava_onevision_image_tokens

    data, _ = flops.read_config("llava-onevision-7b")
    fields = copy.deepcopy({k: v for k, v in data.items() if k not in ("architectures", "model_type")})
    config = LlavaOnevisionConfig(**fields)
    default = LlavaOnevisionConfig()
    arch = flops.ArchSpec.from_config(data)
    text, vision = config.text_config, config.vision_config
    assert (
        arch.num_layers,
        arch.hidden_size,
        arch.num_heads,
        arch.kv_width,
        arch.ffn_size,
        arch.vocab_size,
    ) == (
        text.num_hidden_layers,
        text.hidden_size,
        text.num_attention_heads,
        text.num_key_value_heads * (text.hidden_size // text.num_attention_heads),
        text.intermediate_size,
        text.vocab_size,
    )
    assert (arch.num_layers, arch.hidden_size, arch.kv_width, arch.ffn_size) == (28, 3584, 512, 18944)
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "patch_size",
    ):
        assert getattr(vision, name) == getattr(default.vision_config, name), name
    assert (vision.image_size, arch.vit_tokens_per_crop, arch.vit_cls_tokens, arch.vit_layers) == (
        384,
        729,
        0,
        26,
    )
    assert (
        [tuple(p) for p in default.image_grid_pinpoints]
        == list(DEFAULT_PINPOINTS)
        == list(arch.image_grid_pinpoints)
    )
    assert config.vision_aspect_ratio == default.vision_aspect_ratio == "anyres_max_9"
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    assert arch.max_crops == 37 and arch.anyres_max_patches == 9
    # the processor's own count (unbound: it needs only these attributes)
    processor = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=[list(p) for p in DEFAULT_PINPOINTS]),
        num_image_tokens=729,
        vision_aspect_ratio="anyres_max_9",
    )
    processor._get_unpadded_features = lambda *a: LlavaOnevisionProcessor._get_unpadded_features(
        processor, *a
    )
    for height in range(150, 2600, 311):
        for width in range(120, 2600, 277):
            want = LlavaOnevisionProcessor._get_number_of_features(processor, height, width, 384, 384)
            assert llava_onevision_image_tokens(arch, height, width)[1] == want, (height, width)
    assert llava_onevision_image_tokens(arch, 672, 672) == (5, 3699)
    assert llava_onevision_image_tokens(arch, 2304, 2304) == (37, 7371)
    assert json.loads(json.dumps(data)) == data


def test_onevision_flops_command_costs_it(capsys):
    from visiondrop.tools.cli import main

    assert main(["flops", "--model", "llava-onevision-7b", "--method", "visiondrop", "--budget", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "llava_onevision" in out and "3699 visual tokens for a 672x672 image" in out


def test_onevision_bench_builds_the_7b_shape_and_runs_the_tiny_one(tmp_path):
    """``visiondrop bench`` builds LLaVA-OneVision-7B's config (1 LLM layer, no weights here) and its 672 x 672 image,
    and runs the tiny shape end to end with exact per-layer counts and the analytic unpruned FLOPs."""
    import math

    from visiondrop import build
    from visiondrop import flops as vf
    from visiondrop.models.family import family_of
    from visiondrop.testing import tiny_llava_onevision_config
    from visiondrop.tools import bench

    config = bench.bench_config("llava-onevision-7b", 1)
    assert config.text_config.num_hidden_layers == 1 and config.model_type == "llava_onevision"
    image = family_of("llava_onevision").bench_image(config, 1, torch.Generator())
    assert image.tokens == 3699 and image.grids == ((27, 27), (54, 54)) and image.vit_tokens == 729
    assert tuple(image.inputs["pixel_values"].shape) == (1, 5, 3, 384, 384)

    layers, text = 4, 16
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_llava_onevision_config(layers=layers).to_dict()))
    out = tmp_path / "bench.json"
    parser = argparse.ArgumentParser(prog="visiondrop")
    bench.add_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["--model", str(path), "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--batch", "2"]
    argv += ["--text-tokens", str(text), "--device", "cpu", "--quiet", "--json", str(out)]
    argv += ["--methods", "visiondrop,random,fastv", "--budget", "0.3", "--budget-mode", "input"]
    args = parser.parse_args(["bench", *argv])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    image = family_of("llava_onevision").bench_image(bench.bench_config(str(path)), 1, torch.Generator())
    # 672 x 672 on the tiny pinpoints: a 3 x 3 grid of 12 x 12 cells, downscaled (anyres_max_3) to 6 x 6
    assert result["image_tokens"] == image.tokens == 16 + 6 * 7
    for r in [result["unpruned"], *result["results"]]:
        schedule = build(r["method"], budget=0.3, budget_mode="input").schedule(
            image.tokens, layers, image.grids
        )
        assert r["sequence_per_layer"] == [text + n for n in schedule.tokens_per_layer()]
        assert r["kv_bytes"] == r["kv_bytes_analytic"] > 0
        for key in ("prefill_speedup", "flops_ratio", "ttft_s", "tflops"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["method"], key, r[key])
    arch = vf.ArchSpec.from_config(tiny_llava_onevision_config(layers=layers))
    crops = image.inputs["pixel_values"].shape[1]
    base = vf.prefill_flops(
        arch,
        visual_tokens_per_layer=image.tokens,
        text_tokens=text,
        vision_tokens=[image.vit_tokens] * crops,
        lm_head_tokens=1,
        batch_size=2,
    )
    assert result["unpruned"]["tflops"] == pytest.approx(base.tflops)
