"""One matrix for every method: runs in a padded batch, exact counts, deterministic, reversible; and each paper's facts."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import visiondrop as vd
from conftest import N_TOKENS, RAGGED, generate, make_batch, model_state
from visiondrop.tools.cli import methods_table

LAYERS = 8
ALL = vd.available_methods()
#: Visual-only methods (and none) must give the same tokens with use_cache=False.
DECODE_CONSISTENT = {
    "visiondrop",
    "visionzip",
    "dart",
    "divprune",
    "vispruner",
    "holov",
    "random",
    "pooling",
    "none",
}


def test_the_registry_has_every_method():
    assert ALL == [
        "visiondrop",
        "fastv",
        "pyramiddrop",
        "visionzip",
        "dart",
        "divprune",
        "vispruner",
        "holov",
        "sparsevlm",
        "vscan",
        "random",
        "pooling",
        "none",
    ]


@pytest.mark.parametrize(("name", "budget"), list(itertools.product(ALL, [24, 40])))
def test_every_method_in_a_padded_batch(llava, name, budget):
    batch = make_batch(RAGGED)
    method = vd.build(name, budget=budget)
    schedule = method.schedule(N_TOKENS, LAYERS, ((8, 8),))
    before = model_state(llava)
    with method.apply(llava) as run:
        first = generate(llava, batch)
        report_first = run.report.to_dict()
        second = generate(llava, batch)
        if name in DECODE_CONSISTENT:
            assert torch.equal(generate(llava, batch, use_cache=False), first)
    assert torch.equal(first, second)  # deterministic
    assert run.report.to_dict() == report_first
    assert model_state(llava) == before  # reversible
    assert [len(s.images) for s in run.report.samples] == [1, 2, 0]
    for im in run.report.images:
        assert im.counts() == schedule.counts()
        assert [st.layer for st in im.stages] == [s.layer for s in schedule.stages]
    if name == "pooling":  # whole grid cells: at most the budget, and what the grid says
        rows, cols = method.pooled_grid(N_TOKENS, (8, 8))
        assert schedule.layer_average == rows * cols <= budget
    elif name != "none":
        assert abs(schedule.layer_average - budget) <= 1.5, schedule.describe()
    assert run.report.method == name and name in str(run.report)


@pytest.mark.parametrize("name", [n for n in ALL if n != "none"])
def test_input_budget_mode_fixes_the_count_at_the_first_pruning_point(name):
    method = vd.build(name, budget=20, budget_mode="input")
    schedule = method.schedule(N_TOKENS, LAYERS, ((8, 8),))
    pruning = next(s for s in schedule.stages if s.tokens < N_TOKENS)
    assert pruning.tokens == 20  # pooling: 4 x 5 cells


def test_fastv_keeps_every_token_before_layer_k(llava):
    method = vd.FastV(budget=32, layer=3)
    with method.apply(llava) as run:
        generate(llava, make_batch(RAGGED))
    for im in run.report.images:
        assert im.tokens_per_layer()[:3] == [N_TOKENS] * 3
        assert [st.layer for st in im.stages] == [0, 3]
        kept = im.counts()[1]
        assert kept == round((32 * LAYERS - N_TOKENS * 3) / (LAYERS - 3))
        assert set(im.stages[1].patch_owner) - {-1} == set(range(kept))  # the rest is dropped outright


def test_fastv_and_dart_rank_with_the_right_signal(llava):
    """FastV's kept tokens are the top of the last prompt token's attention; DART keeps its pivots."""

    class Spy(vd.FastV):
        def select_llm(self, tokens, stage):
            self.scores = tokens.text_attention()
            return super().select_llm(tokens, stage)

    spy = Spy(budget=24)
    batch = make_batch([RAGGED[0]])
    with spy.apply(llava) as run:
        generate(llava, batch)
    kept = run.report.images[0].stages[1].kept_patches()
    assert kept == sorted(spy.scores[0].topk(len(kept)).indices.tolist())

    class DartSpy(vd.DART):
        def select_llm(self, tokens, stage):
            self.norms = tokens.key_heads().norm(dim=-1)
            return super().select_llm(tokens, stage)

    dart = DartSpy(budget=24, pivots=4)
    with dart.apply(llava) as run:
        generate(llava, batch)
    pivots = set(dart.norms[0].topk(4).indices.tolist())
    assert pivots <= set(run.report.images[0].stages[1].kept_patches())


def test_pyramiddrop_keeps_a_ratio_per_stage_and_moves_early_for_small_budgets():
    fixed = vd.PyramidDrop(ratio=0.5).schedule(576, 32)
    assert fixed.counts() == [576, 288, 144, 72]
    assert [s.layer for s in fixed.boundaries] == [8, 16, 24]
    solved = vd.PyramidDrop(budget=192).schedule(576, 32)
    assert solved.layer_average == pytest.approx(192, abs=1)
    small = vd.PyramidDrop(budget=64).schedule(576, 32)  # out of reach with a first boundary at 8 (min 144)
    assert small.boundaries[0].layer < 8 and small.layer_average == pytest.approx(64, abs=1)
    with pytest.raises(ValueError, match="out of reach with boundaries \\[8, 16, 24\\]"):
        vd.PyramidDrop(budget=64, boundaries=[8, 16, 24]).schedule(576, 32)


def _hand_cls_scores(model, pixel_values):
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    idx = len(out.hidden_states) - 1 + model.config.vision_feature_layer
    layer = tower.encoder.layers[idx]
    attn = layer.self_attn
    x = layer.layer_norm1(out.hidden_states[idx])
    q = attn.q_proj(x).view(x.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(x.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)[:, 0, 1:]


def test_visionzip_keeps_the_top_cls_patches_and_merges_the_rest(llava):
    batch = make_batch(RAGGED)
    method = vd.VisionZip(budget=20, dominant=16, contextual=4)
    with torch.no_grad(), method.apply(llava) as run:
        scores = _hand_cls_scores(llava, batch["pixel_values"])
        llava(**batch)
    for im, s in zip(run.report.images, scores, strict=True):
        view = im.stages[0]
        assert view.kept_patches() == sorted(s.topk(16).indices.tolist())
        assert view.contextual == 4 and all(o >= 0 for o in view.patch_owner)
        assert -1 not in view.token_patch  # no [CLS]


def test_visionzip_default_split_follows_the_published_ones():
    for budget, split in ((64, (54, 10)), (128, (108, 20)), (192, (162, 30))):
        stage = vd.VisionZip(budget=budget).schedule(576, 32).vision
        assert (stage.dominant, stage.contextual) == split


def test_divprune_picks_are_farther_apart_than_a_random_subset(llava):
    batch = make_batch(RAGGED)
    with torch.no_grad():
        hidden = llava.model.vision_tower(batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
        projected = llava.model.multi_modal_projector(hidden[:, 1:])
        with vd.DivPrune(budget=12).apply(llava) as run:
            llava(**batch)
    gen = torch.Generator().manual_seed(0)

    def min_distance(unit, idx):
        sub = unit[idx]
        dist = 1 - sub @ sub.T
        return dist[~torch.eye(len(idx), dtype=torch.bool)].min().item()

    for im, feats in zip(run.report.images, projected, strict=True):
        unit = F.normalize(feats, dim=-1)
        picked = min_distance(unit, torch.tensor(im.stages[0].kept_patches()))
        randoms = [min_distance(unit, torch.randperm(N_TOKENS, generator=gen)[:12]) for _ in range(20)]
        assert picked > max(randoms)


def test_random_is_seeded(llava):
    batch = make_batch(RAGGED)

    def picks(seed):
        with vd.RandomPruning(budget=10, seed=seed).apply(llava) as run:
            generate(llava, batch)
        return [im.stages[0].kept_patches() for im in run.report.images]

    assert picks(3) == picks(3)
    assert picks(3) != picks(4)
    assert all(len(p) == 10 for p in picks(3))


def test_pooling_gives_the_grid_it_says(llava):
    method = vd.Pooling(budget=16)
    assert method.pooled_grid(N_TOKENS, (8, 8)) == (4, 4)
    with method.apply(llava) as run:
        generate(llava, make_batch(RAGGED))
    view = run.report.images[0].stages[0]
    assert view.tokens == 16 and view.contextual == 16
    # Every pooled token owns one 2 x 2 block of the 8 x 8 grid.
    for token in range(16):
        cells = [p for p, o in enumerate(view.patch_owner) if o == token]
        rows = {p // 8 for p in cells}
        cols = {p % 8 for p in cells}
        assert len(cells) == 4 and len(rows) == 2 and len(cols) == 2
        assert max(rows) - min(rows) == 1 and max(cols) - min(cols) == 1
    assert vd.Pooling(budget=128).pooled_grid(576) == (11, 11)


@pytest.mark.parametrize(
    ("make", "error", "needle"),
    [
        (lambda: vd.FastV(layer=8).schedule(64, 8), ValueError, "layer=8 is outside 1..7"),
        (lambda: vd.FastV(layer=0), ValueError, "got 0"),
        (lambda: vd.DART(budget=10).schedule(64, 8), ValueError, "lowest: 16.8"),
        (lambda: vd.VisionZip(budget=64, dominant=50, contextual=10), ValueError, "must add up to budget=64"),
        (lambda: vd.VisionZip(budget=64, dominant=54), ValueError, "give both"),
        (lambda: vd.PyramidDrop(ratio=1.5), ValueError, "got 1.5"),
        (lambda: vd.PyramidDrop(boundaries=[16, 8]), ValueError, "must increase"),
        (lambda: vd.build("fastvv"), ValueError, "unknown method 'fastvv'"),
    ],
)
def test_bad_method_settings(make, error, needle):
    with pytest.raises(error) as err:
        make()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_fastv_layer_past_the_end_is_refused_at_apply_and_leaves_the_model(llava):
    before = model_state(llava)
    with (
        pytest.raises(ValueError, match=r"layer=9 is outside 1\.\.7"),
        vd.FastV(budget=40, layer=9).apply(llava),
    ):
        pass
    assert model_state(llava) == before


def test_readme_methods_table_is_the_registry():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- methods-table -->") + len("<!-- methods-table -->")
    end = readme.index("<!-- /methods-table -->")
    assert readme[start:end].strip() == methods_table()
