"""InternVL 3.x images (tiles + thumbnail, InternViT with [CLS], pixel shuffle): the core's proofs on a tiny random
model, in a padded batch of images of different tile counts and a text-only row, and the proof that every kept LLM
token carries exactly the 2x2 ViT patches the report says it does."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import visiondrop as vd
from conftest import generate, model_state

ROWS = [[1, 5, "image", 7, 8], [1, 5, 6, "image", 3, "image", 9], [1, 4, 4]]
TILES = [3, 1, 5]  # 2 x 1 tiles + thumbnail, one tile, 2 x 2 tiles + thumbnail
SIDE = 8  # ViT patches per tile side (112 px / 14)
UNITS = 4  # LLM tokens per tile side after pixel shuffle 0.5
PER_TILE = UNITS * UNITS
LAYERS = 8


def _batch(**kwargs):
    from visiondrop.testing import internvl_inputs

    return internvl_inputs(ROWS, TILES, **kwargs)


def _build(**kwargs):
    from visiondrop.testing import tiny_internvl

    model = tiny_internvl(**kwargs)
    batch = _batch()
    with torch.no_grad():  # install transformers' lazy output-capturing hooks before any state snapshot
        model(**batch, output_hidden_states=True)
        model.model.vision_tower(batch["pixel_values"], output_hidden_states=True)
    return model


@pytest.fixture(scope="module")
def internvl():
    return _build()


def _token_patches(token: int) -> tuple[int, list[int]]:
    """Written here from the pixel-shuffle definition, independently of the adapter: LLM token ``token`` of an image is
    cell ``(i, j)`` of tile ``token // 16``'s 4 x 4 grid and concatenates ViT patches (2i, 2j), (2i, 2j+1),
    (2i+1, 2j), (2i+1, 2j+1) of that tile's 8 x 8 grid."""
    tile, cell = divmod(token, PER_TILE)
    i, j = divmod(cell, UNITS)
    return tile, [
        (2 * i) * SIDE + 2 * j,
        (2 * i) * SIDE + 2 * j + 1,
        (2 * i + 1) * SIDE + 2 * j,
        (2 * i + 1) * SIDE + 2 * j + 1,
    ]


def test_token_patches_helper_is_the_documented_rule():
    from visiondrop.models.internvl import internvl_token_patches

    for token in range(3 * PER_TILE):
        assert internvl_token_patches(token, SIDE) == _token_patches(token)
    assert internvl_token_patches(257, 32) == (1, [0 * 32 + 2, 0 * 32 + 3, 1 * 32 + 2, 1 * 32 + 3])


def test_image_infos_count_tiles_from_the_placeholder_runs(internvl):
    from visiondrop.models import get_adapter

    infos = get_adapter(internvl).image_infos(_batch())
    assert [info.tokens for info in infos] == [PER_TILE * t for t in TILES]
    assert [info.grids for info in infos] == [((UNITS, UNITS),) * t for t in TILES]
    assert [info.vit_tokens for info in infos] == [
        (SIDE * SIDE + 1,) * t for t in TILES
    ]  # [CLS] + 64 per tile


def test_internvl_nothing_pruned_is_bit_identical(internvl):
    batch = _batch()
    with torch.no_grad():
        reference = internvl(**batch).logits
        tokens = generate(internvl, batch)
        for method in (
            vd.build("none"),
            vd.VisionDrop(budget=1.0),
            vd.DART(budget=1.0),
            vd.FastV(budget=1.0),
        ):
            with method.apply(internvl):
                assert torch.equal(internvl(**batch).logits, reference)
                assert torch.equal(generate(internvl, batch), tokens)


@pytest.mark.parametrize("positions", ["compact", "preserve"])
@pytest.mark.parametrize("budget", [0.25, 0.5, 12])
def test_internvl_cached_decode_equals_recomputation_with_exact_counts(internvl, budget, positions):
    batch = _batch()
    method = vd.VisionDrop(budget=budget, positions=positions)
    before = model_state(internvl)
    with method.apply(internvl) as run:
        cached = generate(internvl, batch, max_new_tokens=8)
        full = generate(internvl, batch, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, full)
    assert model_state(internvl) == before
    assert [len(s.images) for s in run.report.samples] == [1, 2, 0]
    for im, tiles in zip(run.report.images, TILES, strict=True):
        n = PER_TILE * tiles
        assert im.image_tokens == n and im.grids == ((UNITS, UNITS),) * tiles
        schedule = method.schedule(n, LAYERS, im.grids)
        assert im.counts() == schedule.counts()
        assert [st.layer for st in im.stages] == [s.layer for s in schedule.stages]
        want = method.budget_tokens(n)
        assert abs(schedule.layer_average - want) <= 1.5, schedule.describe()
    assert run.report.flops is not None and run.report.flops["ratio"] > 1


def _identifiable(model):
    """A forward hook that replaces the ViT's output by features naming their patch: tile ``t`` (over the whole call),
    patch ``p`` (0-based, [CLS] excluded) carries ``1000 t + p`` in channel 0 and 0.5 elsewhere ([CLS]: -1)."""

    def hook(module, args, kwargs, output):
        hidden = output.last_hidden_state
        tiles, n, _ = hidden.shape
        ids = 1000.0 * torch.arange(tiles)[:, None] + torch.arange(-1, n - 1)[None, :]
        fake = torch.full_like(hidden, 0.5)
        fake[..., 0] = ids
        fake[:, 0, 0] = -1.0
        output.last_hidden_state = fake
        return output

    return model.model.vision_tower.register_forward_hook(hook, with_kwargs=True)


def _projector_inputs(model, calls: list):
    def hook(module, args):
        calls.append(args[0].detach().clone())

    return model.model.multi_modal_projector.register_forward_pre_hook(hook)


@pytest.mark.parametrize("stages", [[(7, 0)], [(5, 3)]], ids=["dominant", "dominant+contextual"])
def test_every_kept_llm_token_carries_the_patches_the_report_names(internvl, stages):
    """The projector's input for each surviving token of each image — captured in the pruned call — holds, in its four
    ``Dv``-wide blocks, exactly the ViT patches that the report's kept position names under the pixel-shuffle rule
    (and a contextual token: its anchor's patches plus the mean over the members the report assigns to it)."""
    batch = _batch()
    dim = internvl.config.vision_config.hidden_size
    calls: list[torch.Tensor] = []
    handles = [_identifiable(internvl), _projector_inputs(internvl, calls)]
    try:
        with torch.no_grad(), vd.VisionDrop(stages=stages).apply(internvl) as run:
            internvl(**batch)
    finally:
        for handle in handles:
            handle.remove()
    kept, contextual = stages[0]
    assert len(calls) == len(TILES) and [c.shape[:2] for c in calls] == [(1, kept + contextual)] * len(TILES)
    first_tile = 0
    for image, (im, rows) in enumerate(zip(run.report.images, calls, strict=True)):
        view = im.stages[0]
        assert view.tokens == kept + contextual and view.contextual == contextual
        blocks = rows[0][:, 0::dim][:, :4]  # channel 0 of each of the 4 concatenated patches: (k, 4)
        assert rows.shape[-1] == 4 * dim
        owner = torch.tensor(view.patch_owner)

        def ids(token: int, first_tile: int = first_tile) -> torch.Tensor:
            tile, patches = _token_patches(token)
            return torch.tensor([1000.0 * (first_tile + tile) + p for p in patches])

        for slot in range(kept + contextual):
            token = view.token_patch[slot]
            expected = ids(token)
            if slot >= kept:  # merged: anchor + mean(members), "reference" merge
                members = [t for t in (owner == slot).nonzero().flatten().tolist() if t != token]
                if members:
                    expected = expected + torch.stack([ids(t) for t in members]).mean(0)
            torch.testing.assert_close(blocks[slot], expected, rtol=0, atol=1e-3)
        assert sorted(view.token_patch[:kept]) == list(view.token_patch[:kept])  # placeholder order
        first_tile += TILES[image]


def test_scores_are_the_sum_of_each_tokens_four_patches_and_select_the_top_tokens():
    """Patch scores computed here from transformers' own eager attention weights of the last ViT layer (patch queries,
    head mean, [CLS] in the softmax), summed per token by the pixel-shuffle rule, are the adapter's token scores; a
    dominant-only VisionDrop keeps exactly the top tokens by them, in every image."""
    from visiondrop.models import get_adapter

    model = _build(attn="eager")
    batch = _batch()
    with torch.no_grad():
        out = model.model.vision_tower(batch["pixel_values"], output_attentions=True, return_dict=True)
        attn = out.attentions[-1].float().mean(1)  # (tiles, 65, 65)
        received = attn[:, 1:, 1:].mean(1)  # (tiles, 64): from the 64 patch queries, to each patch
        groups = get_adapter(model).encode(dict(batch))
    first_tile = 0
    independent = []
    for (_, tokens), tiles in zip(groups, TILES, strict=True):
        expected = torch.tensor(
            [
                float(received[first_tile + tile, patches].sum())
                for tile, patches in (_token_patches(t) for t in range(PER_TILE * tiles))
            ]
        )
        torch.testing.assert_close(tokens.visual_attention()[0], expected, rtol=1e-4, atol=1e-6)
        independent.append(expected)
        first_tile += tiles
    with torch.no_grad(), vd.VisionDrop(stages=[(6, 0)]).apply(model) as run:
        model(**batch)
    for im, scores in zip(run.report.images, independent, strict=True):
        assert sorted(im.stages[0].token_patch) == sorted(scores.topk(6).indices.tolist())


def test_one_pool_per_image_across_tiles(internvl):
    """An int budget is the image's, over all its tiles and the thumbnail: tiles may keep different counts."""
    method = vd.VisionDrop(stages=[(12, 0)])
    with torch.no_grad(), method.apply(internvl) as run:
        internvl(**_batch())
    big = run.report.images[2]  # five tiles
    per_tile = torch.bincount(torch.tensor(big.stages[0].token_patch) // PER_TILE, minlength=5)
    assert int(per_tile.sum()) == 12 and len(set(per_tile.tolist())) > 1


def test_internvl_refusals(internvl):
    before = model_state(internvl)
    for method, needle in (
        (
            vd.VisionDrop(budget=0.5, score="cls"),
            "score='cls' needs a vision encoder with [CLS] and InternVL's",
        ),
        (vd.VisionZip(budget=8), "visionzip ranks patches by [CLS] attention and InternVL's"),
        (vd.build("vispruner", budget=0.5), "vispruner ranks patches by [CLS] attention and InternVL's"),
    ):
        with pytest.raises(ValueError) as err, method.apply(internvl):
            pass
        assert needle in str(err.value) and "\n" not in str(err.value)
    assert model_state(internvl) == before

    cases = []
    short = _batch()
    last = int((short["input_ids"][0] == 99).nonzero().max())
    short["input_ids"][0, last] = 5  # a run of 47 placeholders: not whole tiles
    cases.append((short, "is not a whole number of InternVL tiles (16 tokens each)"))
    extra = _batch()
    extra["pixel_values"] = torch.cat([extra["pixel_values"], extra["pixel_values"][:1]])
    cases.append((extra, "pixel_values holds 10 tiles but the image placeholders of input_ids ask for 9"))
    five = _batch()
    five["pixel_values"] = five["pixel_values"][None]
    cases.append(
        (five, "pixel_values of shape (1, 9, 3, 112, 112): InternVL takes (tiles, channels, height, width)")
    )
    for batch, needle in cases:
        with vd.VisionDrop(budget=0.5).apply(internvl), pytest.raises(ValueError) as err:
            generate(internvl, batch)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert model_state(internvl) == before


def test_internvl_unsupported_configs_are_refused_in_one_line():
    from visiondrop.testing import tiny_internvl

    for field, value, needle in (
        ("vision_feature_layer", -2, "vision_feature_layer=-2: visiondrop supports InternVL's -1"),
        ("vision_feature_select_strategy", "full", "vision_feature_select_strategy='full'"),
    ):
        model = tiny_internvl()
        setattr(model.config, field, value)
        before = model_state(model)
        with pytest.raises(ValueError) as err, vd.VisionDrop(budget=0.5).apply(model):
            pass
        assert str(err.value).startswith(needle) and "\n" not in str(err.value)
        assert model_state(model) == before


def test_internvl_restored_after_an_exception(internvl):
    batch = _batch()
    with torch.no_grad():
        reference = internvl(**batch).logits
    before = model_state(internvl)
    with pytest.raises(RuntimeError, match="boom"), vd.VisionDrop(budget=0.25).apply(internvl):
        generate(internvl, batch)
        raise RuntimeError("boom")
    assert model_state(internvl) == before
    with torch.no_grad():
        assert torch.equal(internvl(**batch).logits, reference)


# --- the family: tiles, FLOPs, the shipped config, the bench ----------------------------------------------------


@pytest.mark.parametrize(
    "size", [(672, 672), (448, 448), (300, 1000), (1000, 300), (2000, 500), (448, 896), (800, 600), (50, 60)]
)
def test_tiles_are_what_the_processor_cuts(size):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from visiondrop import flops
    from visiondrop.models.internvl import internvl_tiles

    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True)
    tiles = processor.get_number_of_image_patches(
        *size
    )  # what InternVL's processor counts, thumbnail included
    cols, rows = internvl_tiles(*size)
    assert tiles == cols * rows + (cols * rows > 1)
    shape = flops.image_shape(flops.load_arch("internvl3-8b"), size)
    assert shape.tokens == 256 * tiles and len(shape.vit_tokens) == tiles


def test_shipped_internvl3_8b_config_is_what_transformers_reads():
    from transformers import InternVLConfig

    from visiondrop import flops

    data, _ = flops.read_config("internvl3-8b")
    config = InternVLConfig(
        **copy.deepcopy({k: v for k, v in data.items() if k not in ("architectures", "model_type")})
    )
    text, vision = config.text_config, config.vision_config
    arch = flops.ArchSpec.from_config(data)
    assert (
        (arch.num_layers, arch.hidden_size, arch.num_heads, arch.kv_width, arch.ffn_size, arch.vocab_size)
        == (
            text.num_hidden_layers,
            text.hidden_size,
            text.num_attention_heads,
            text.num_key_value_heads * (text.hidden_size // text.num_attention_heads),
            text.intermediate_size,
            text.vocab_size,
        )
        == (28, 3584, 28, 512, 18944, 151674)
    )
    assert (arch.vit_layers, arch.vit_hidden, arch.vit_mlp) == (24, 1024, 4096)
    assert tuple(vision.image_size) == (448, 448) and tuple(vision.patch_size) == (14, 14)
    assert (arch.vit_tokens_per_crop, arch.image_features_per_crop, arch.spatial_merge_size) == (
        1025,
        1024,
        2,
    )
    assert (arch.projector_in, arch.projector_hidden, arch.projector_out) == (4096, 3584, 3584)
    assert config.image_seq_length == 256 == 1024 // 4 and config.downsample_ratio == 0.5
    assert flops.read_config("OpenGVLab/InternVL3-8B-hf")[0] == data
    shape = flops.image_shape(arch)  # 672 x 672: 2 x 2 tiles + thumbnail
    assert (shape.tokens, shape.vit_tokens, shape.grids) == (1280, (1025,) * 5, ((16, 16),) * 5)
    assert "1024 ViT patches -> 256 LLM tokens per tile" in shape.description
    one = flops.image_shape(arch, (448, 448))
    assert (one.tokens, one.vit_tokens) == (256, (1025,))  # one tile, no thumbnail
    cost = flops.prefill_flops(arch, visual_tokens_per_layer=1280, vision_tokens=list(shape.vit_tokens))
    assert cost.projector == flops.projector_flops(arch, 5 * 256)  # 1024 patches -> 256 tokens per tile


def test_projector_cost_is_the_models_projector(internvl):
    from visiondrop import flops

    arch = flops.ArchSpec.from_config(internvl.config)
    projector = internvl.model.multi_modal_projector
    weights = projector.linear_1.weight.numel() + projector.linear_2.weight.numel()
    assert flops.projector_flops(arch, 10) == 2 * 10 * weights
    assert arch.vit_layers == 2 and arch.num_layers == LAYERS and arch.vit_tokens_per_crop == SIDE * SIDE + 1


def test_flops_command_costs_internvl3_8b(capsys):
    from visiondrop.tools import cli

    assert cli.main(["flops", "--model", "internvl3-8b", "--budget", "64"]) == 0
    out = capsys.readouterr().out
    assert "1280 visual tokens for a 672x672 image (2x2 tiles + thumbnail: 5 ViT passes of 1025 tokens" in out
    assert "pixel shuffle 2x2: 1024 ViT patches -> 256 LLM tokens per tile" in out
    # the README's InternVL3-8B row
    assert (
        cli.main(["flops", "--model", "internvl3-8b", "--method", "visiondrop", "--budget", "64", "--json"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == [97, 71, 52, 36] and data["vision_tokens"] == [1025] * 5
    assert (round(data["unpruned_tflops"], 2), round(data["tflops"], 2), data["kv_ratio"]) == (
        23.41,
        5.47,
        10.5,
    )


def test_bench_builds_the_family(tmp_path: Path):
    """``visiondrop bench`` on a tiny InternVL config: the family's image, counts exactly as the schedules say."""
    from visiondrop import flops
    from visiondrop.models.family import family_of
    from visiondrop.testing import tiny_internvl_config
    from visiondrop.tools import bench, cli

    layers = 4
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_internvl_config(layers=layers).to_dict()))
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--model",
        str(path),
        "--methods",
        "visiondrop,fastv",
        "--budget",
        "0.3",
        "--budget-mode",
        "input",
    ]
    argv += ["--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--text-tokens", "16", "--device", "cpu"]
    assert cli.main([*argv, "--batch", "2", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    image = family_of("internvl").bench_image(bench.bench_config(str(path)), 1, torch.Generator())
    assert (
        result["image_tokens"] == image.tokens == 10 * PER_TILE
    )  # 672 x 672 at 112 px: 3 x 3 tiles + thumbnail
    for r in result["results"]:
        schedule = vd.build(r["method"], budget=0.3, budget_mode="input").schedule(
            image.tokens, layers, image.grids
        )
        assert r["sequence_per_layer"] == [16 + n for n in schedule.tokens_per_layer()]
        assert r["flops_ratio"] > 1 and math.isfinite(r["ttft_s"])
    base = flops.prefill_flops(
        flops.ArchSpec.from_config(tiny_internvl_config(layers=layers)),
        visual_tokens_per_layer=image.tokens,
        text_tokens=16,
        vision_tokens=[image.vit_tokens] * 10,
        lm_head_tokens=1,
        batch_size=2,
    )
    assert result["unpruned"]["tflops"] == pytest.approx(base.tflops)
