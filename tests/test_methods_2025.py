"""The 2025 methods (VisPruner, HoloV, ...): each paper's mechanism checked against a hand computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import test_families
import visiondrop as vd
from conftest import N_TOKENS, RAGGED, generate, make_batch, model_state, next_batch
from visiondrop.methods.holov import allocate, crop_ids
from visiondrop.methods.vispruner import remove_duplicates

LAYERS = 8
# The family fixtures (tiny LLaVA-NeXT on Llama and Mistral; tiny Qwen2-VL and 2.5-VL).
next_model = test_families.next_model
qwen = test_families.qwen


def _feature_layer(model, pixel_values):
    """The feature-layer states and the hand-computed [CLS] attention of LLaVA's CLIP (I, 1 + P, Dv), (I, P)."""
    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True)
    idx = len(out.hidden_states) - 1 + model.config.vision_feature_layer
    layer = tower.encoder.layers[idx]
    attn = layer.self_attn
    x = layer.layer_norm1(out.hidden_states[idx])
    q = attn.q_proj(x).view(x.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(x.shape[0], -1, attn.num_heads, attn.head_dim).transpose(1, 2)
    cls = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)[:, 0, 1:]
    return out.hidden_states[idx + 1], cls


# --- VisPruner ------------------------------------------------------------------------------------------------


def test_remove_duplicates_drops_the_copies_first():
    base = torch.eye(6)
    features = torch.cat([base, base[:2] + 1e-4])  # 8 tokens: tokens 6 and 7 duplicate 0 and 1
    order = torch.tensor([0, 6, 1, 7, 2, 3, 4, 5])  # pairs adjacent, so A = {0, 1, 2, 4}, B = {6, 7, 3, 5}
    kept = remove_duplicates(features[order], 6)
    assert kept.tolist() == [1, 3, 4, 5, 6, 7]  # positions 0 and 2 (tokens 0 and 1) had an exact twin in B
    assert remove_duplicates(features, 8).tolist() == list(range(8))
    assert remove_duplicates(features, 0).numel() == 0
    with pytest.raises(ValueError, match="cannot keep 9 of 8"):
        remove_duplicates(features, 9)


def test_vispruner_keeps_the_top_cls_patches_plus_diverse_ones(llava):
    batch = make_batch(RAGGED)
    method = vd.build("vispruner", budget=20, important_ratio=0.5)
    with torch.no_grad(), method.apply(llava) as run:
        hidden, cls = _feature_layer(llava, batch["pixel_values"])
        llava(**batch)
    for im, scores, states in zip(run.report.images, cls, hidden, strict=True):
        view = im.stages[0]
        kept = view.kept_patches()
        assert len(kept) == 20 and view.contextual == 0 and -1 not in view.token_patch
        important = scores.argsort(descending=True, stable=True)[:10]
        assert set(important.tolist()) <= set(kept)
        rest = scores.argsort(descending=True, stable=True)[10:].sort().values
        diverse = rest[remove_duplicates(states[1:][rest], 10)]
        assert sorted(kept) == sorted(important.tolist() + diverse.tolist())


def test_vispruner_extremes_are_pure_cls_ranking_and_pure_diversity(llava):
    batch = make_batch([RAGGED[0]])
    with torch.no_grad():
        _, cls = _feature_layer(llava, batch["pixel_values"])
        with vd.build("vispruner", budget=16, important_ratio=1.0).apply(llava) as run:
            llava(**batch)
    assert run.report.images[0].stages[0].kept_patches() == sorted(cls[0].topk(16).indices.tolist())
    with torch.no_grad(), vd.build("vispruner", budget=16, important_ratio=0.0).apply(llava) as run:
        llava(**batch)
    assert len(run.report.images[0].stages[0].kept_patches()) == 16


# --- HoloV ------------------------------------------------------------------------------------------------------


def test_crop_ids_cut_each_grid_into_square_blocks():
    ids = crop_ids(((4, 4),), 16, 4).view(4, 4)
    assert ids.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    two = crop_ids(((2, 2), (2, 4)), 12, 4)
    assert two.tolist() == [0, 1, 2, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert crop_ids((), 6, 2).tolist() == [0, 0, 0, 1, 1, 1]


def test_allocate_is_proportional_capped_and_exact():
    quota = allocate(torch.tensor([0.5, 0.25, 0.25]), torch.tensor([10, 10, 10]), 8)
    assert quota.tolist() == [4, 2, 2]
    capped = allocate(torch.tensor([0.9, 0.05, 0.05]), torch.tensor([3, 10, 10]), 9)
    assert capped.tolist()[0] == 3 and capped.sum() == 9
    assert allocate(torch.tensor([1.0, 0.0]), torch.tensor([2, 2]), 4).tolist() == [2, 2]
    assert allocate(torch.ones(4), torch.tensor([9, 9, 9, 9]), 10).tolist() == [3, 3, 2, 2]  # ties spread
    with pytest.raises(ValueError, match="cannot place 5"):
        allocate(torch.tensor([1.0, 1.0]), torch.tensor([2, 2]), 5)


def _holov_by_hand(states, cls, budget, crops=4, temperature=1.0, weight=1.0):
    crop = crop_ids(((8, 8),), N_TOKENS, crops)
    unit = F.normalize(states[1:], dim=-1)
    sim = unit @ unit.T
    score = torch.empty(N_TOKENS)
    for p in range(N_TOKENS):
        mates = [q for q in range(N_TOKENS) if crop[q] == crop[p] and q != p]
        score[p] = 1 - sim[p, mates].mean()
    score = cls / cls.max() + weight * score / score.abs().max()
    crop_score = torch.stack([score[crop == c].mean() for c in range(crops)])
    z = (crop_score - crop_score.mean()) / crop_score.std()
    quota = allocate(torch.softmax(z / temperature, 0), torch.bincount(crop), budget)
    kept = []
    for c in range(crops):
        members = (crop == c).nonzero().flatten()
        kept += members[score[members].argsort(descending=True, stable=True)[: int(quota[c])]].tolist()
    return sorted(kept), quota


@pytest.mark.parametrize("temperature", [1.0, 0.2])
def test_holov_shares_the_budget_over_crops_as_the_scores_say(llava, temperature):
    batch = make_batch(RAGGED)
    with torch.no_grad(), vd.build("holov", budget=20, temperature=temperature).apply(llava) as run:
        hidden, cls = _feature_layer(llava, batch["pixel_values"])
        llava(**batch)
    crop = crop_ids(((8, 8),), N_TOKENS, 4)
    for im, scores, states in zip(run.report.images, cls, hidden, strict=True):
        expected, quota = _holov_by_hand(states, scores, 20, temperature=temperature)
        kept = im.stages[0].kept_patches()
        assert kept == expected
        assert torch.bincount(crop[kept], minlength=4).tolist() == quota.tolist()
        assert all(q >= 1 for q in quota.tolist()) or temperature < 1  # the even-ish share reaches every crop


def test_holov_runs_without_cls_on_qwen_style_scores():
    assert not vd.method_class("holov").requires_cls
    assert vd.method_class("vispruner").requires_cls


# --- shared ------------------------------------------------------------------------------------------------------

NEW = ["vispruner", "holov"]


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("budget", [24, 0.25])
def test_new_methods_in_a_padded_batch_exact_reversible_decode_consistent(llava, name, budget):
    batch = make_batch(RAGGED)
    method = vd.build(name, budget=budget)
    before = model_state(llava)
    with method.apply(llava) as run:
        first = generate(llava, batch)
        assert torch.equal(generate(llava, batch, use_cache=False), first)
    assert model_state(llava) == before
    expected = method.schedule(N_TOKENS, LAYERS, ((8, 8),)).counts()
    assert [im.counts() for im in run.report.images] == [expected] * 3
    assert expected == [round(N_TOKENS * budget) if isinstance(budget, float) else budget]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"name": "vispruner", "important_ratio": 1.5},
            "important_ratio must be a number in \\[0, 1\\], got 1.5",
        ),
        ({"name": "holov", "crops": 3}, "crops must be a square int >= 1 .* got 3"),
        ({"name": "holov", "temperature": 0}, "temperature must be > 0, got 0"),
        ({"name": "holov", "diversity_weight": -1}, "diversity_weight must be >= 0, got -1"),
    ],
)
def test_bad_fields_are_one_line_errors(fields, message):
    fields = dict(fields)
    with pytest.raises(ValueError, match=message):
        vd.build(fields.pop("name"), **fields)


# --- other families ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*NEW, "sparsevlm"])
@pytest.mark.parametrize("policy", ["compact", "preserve"])
def test_new_methods_on_llava_next_exact_counts_and_decode_consistent(next_model, name, policy):
    batch = next_batch(next_model)
    method = vd.build(name, budget=0.25, positions=policy)
    before = model_state(next_model)
    with method.apply(next_model) as run:
        cached = generate(next_model, batch, max_new_tokens=6)
        if method.info.signal != "text-guided":
            assert torch.equal(generate(next_model, batch, max_new_tokens=6, use_cache=False), cached)
    assert model_state(next_model) == before
    for im, n in zip(run.report.images, test_families._counts(next_model), strict=True):
        assert im.counts() == method.schedule(n, LAYERS, im.grids).counts()


def test_holov_on_qwen_and_the_refusals_there(qwen):
    batch = test_families._qwen_batch()
    before = model_state(qwen)
    method = vd.build("holov", budget=0.5)  # auto positions: preserve on M-RoPE
    with method.apply(qwen) as run:
        cached = generate(qwen, batch, max_new_tokens=4)
        assert torch.equal(generate(qwen, batch, max_new_tokens=4, use_cache=False), cached)
    for im in run.report.images:
        assert (
            im.counts()
            == method.schedule(im.image_tokens, qwen.config.text_config.num_hidden_layers).counts()
        )
    sparse = vd.build("sparsevlm", budget=0.5, budget_mode="input")
    with sparse.apply(qwen) as run:
        generate(qwen, batch, max_new_tokens=4)
    layers = qwen.config.text_config.num_hidden_layers
    for im in run.report.images:
        assert im.counts() == sparse.schedule(im.image_tokens, layers).counts()
    for bad, needle in (
        (vd.build("vispruner", budget=0.5), "vispruner ranks patches by [CLS] attention"),
        (vd.build("holov", budget=0.5, positions="compact"), "positions='compact' has no meaning"),
    ):
        with pytest.raises(ValueError) as err, bad.apply(qwen):
            pass
        assert needle in str(err.value) and "\n" not in str(err.value)
    assert model_state(qwen) == before


# --- SparseVLM -----------------------------------------------------------------------------------------------------


def test_sparsevlm_schedule_uses_the_paper_layers_and_recycles_a_few():
    from visiondrop.methods.sparsevlm import paper_layers

    assert paper_layers(32) == [2, 6, 15, 19] and paper_layers(8) == [1, 2, 4, 5]
    schedule = vd.build("sparsevlm", budget=192).schedule(576, 32)
    assert [s.layer for s in schedule.boundaries] == [2, 6, 15, 19]
    assert schedule.layer_average == pytest.approx(192, abs=1)
    previous = 576
    for stage in schedule.boundaries:
        recycled = max(1, round((previous - stage.tokens) * 0.3))
        assert stage.contextual == max(1, round(recycled * 0.1))
        previous = stage.tokens
    plain = vd.build("sparsevlm", budget=192, recycle_ratio=0.0).schedule(576, 32)
    assert all(s.contextual == 0 for s in plain.boundaries) and plain.counts() == schedule.counts()
    with pytest.raises(ValueError, match="sparsevlm: a layer-average budget of 64 is out of reach"):
        vd.build("sparsevlm", budget=64).schedule(576, 8)


def test_density_peaks_pick_one_centre_per_blob():
    from visiondrop.methods.sparsevlm import density_peak_centres

    gen = torch.Generator().manual_seed(0)
    blobs = torch.cat([torch.randn(6, 4, generator=gen) * 0.01 + 5 * i for i in range(3)])[
        None
    ]  # 3 tight blobs
    centres = density_peak_centres(blobs, 3)[0]
    assert sorted((centres // 6).tolist()) == [0, 1, 2]


def test_sparsevlm_ranks_by_the_raters_and_merges_recycled_tokens(llava):
    """The kept tokens are the top of the rater score computed by hand from the next layer's q/k."""
    scores = {}

    class Spy(vd.method_class("sparsevlm")):
        def rater_scores(self, tokens):
            out = super().rater_scores(tokens)
            attention, valid = tokens.question_attention()
            q = tokens._queries_at(tokens.columns[:, -1:] + 1)  # the first token after the image
            scores.setdefault(tokens.layer_idx, (out, attention, valid, q))
            return out

    method = Spy(budget=24)
    batch = make_batch([RAGGED[0]])  # [BOS, 5, image, 7, 8]: two prompt tokens after the image
    with method.apply(llava) as run:
        generate(llava, batch)
    schedule = method.schedule(N_TOKENS, LAYERS)
    assert run.report.images[0].counts() == schedule.counts()
    for stage, view in zip(schedule.boundaries, run.report.images[0].stages[1:], strict=True):
        out, attention, valid, _ = scores[stage.layer]
        assert attention.shape[:2] == (1, 2) and bool(valid.all())
        relevance = attention.mean(-1)[0]
        raters = relevance >= relevance.mean()
        torch.testing.assert_close(out[0], attention[0][raters].mean(0))
        assert view.contextual == stage.contextual >= 1
    first = run.report.images[0].stages[1]
    out = scores[schedule.boundaries[0].layer][0][0]
    assert first.kept_patches() == sorted(out.topk(first.tokens - first.contextual).indices.tolist())


def test_question_attention_is_a_causal_softmax_row(llava):
    """Summed over all keys each rater row is 1; over the image it is what the hand computation gives."""
    seen = {}

    class Spy(vd.method_class("sparsevlm")):
        def rater_scores(self, tokens):
            stack = tokens.stack
            attention, _ = tokens.question_attention()
            q, k = stack.query_key(tokens.layer_idx, tokens._seq, tokens._cos, tokens._sin)
            k = stack.expand_kv(k)
            cols = tokens.columns[0]
            after = int(cols[-1]) + 1
            probs = q[0, :, after : after + 2] @ k[0, :, : after + 2].transpose(-1, -2) * q.shape[-1] ** -0.5
            causal = torch.ones(2, after + 2, dtype=torch.bool).tril(after)
            probs = probs.masked_fill(~causal, float("-inf")).softmax(-1).mean(0)
            seen.setdefault("pair", (attention[0], probs[:, cols]))
            return super().rater_scores(tokens)

    with Spy(budget=24).apply(llava):
        generate(llava, make_batch([RAGGED[0]]), max_new_tokens=1)
    got, expected = seen["pair"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_sparsevlm_in_a_padded_batch_is_exact_and_reversible(llava):
    batch = make_batch(RAGGED)
    method = vd.build("sparsevlm", budget=24, positions="preserve")
    before = model_state(llava)
    with method.apply(llava) as run:
        first = generate(llava, batch)
        assert torch.equal(generate(llava, batch), first)
    assert model_state(llava) == before
    assert [im.counts() for im in run.report.images] == [method.schedule(N_TOKENS, LAYERS).counts()] * 3


# --- VScan ---------------------------------------------------------------------------------------------------------


def test_vscan_schedule_meets_the_budget_in_both_modes():
    average = vd.build("vscan", budget=64).schedule(576, 32)
    assert average.counts() == [85, 42] and [s.layer for s in average.stages] == [0, 16]
    assert average.layer_average == pytest.approx(64, abs=1)
    assert vd.build("vscan", budget=64, budget_mode="input").schedule(576, 32).counts() == [64, 32]
    assert vd.build("vscan", budget=64, llm_ratio=1.0).schedule(576, 32).counts() == [64]
    with pytest.raises(ValueError, match=r"vscan: layer=8 is outside 1\.\.7"):
        vd.build("vscan", budget=24, layer=8).schedule(64, 8)


def test_vscan_global_and_local_scans_then_merge_into_the_nearest_selected(llava):
    batch = make_batch(RAGGED)
    method = vd.build("vscan", budget=20, budget_mode="input", global_share=0.5)
    with torch.no_grad(), method.apply(llava) as run:
        _, cls = _feature_layer(llava, batch["pixel_values"])
        llava(**batch)
    window = crop_ids(((8, 8),), N_TOKENS, 4)
    for im, scores in zip(run.report.images, cls, strict=True):
        view = im.stages[0]
        assert view.tokens == view.contextual == 20
        chosen = set(view.token_patch)
        top = set(scores.argsort(descending=True, stable=True)[:10].tolist())
        assert top <= chosen  # the global scan
        local = torch.tensor(sorted(chosen - top))
        # local scans: the rest is an even share per window, each the window's best remaining patches
        assert torch.bincount(window[local], minlength=4).tolist() == [3, 3, 2, 2]
        for w in range(4):
            rest = [p for p in range(N_TOKENS) if window[p] == w and p not in top]
            picked = [p for p in local.tolist() if window[p] == w]
            best = sorted(rest, key=lambda p: -scores[p])[: len(picked)]
            assert sorted(picked) == sorted(best)
        assert all(owner >= 0 for owner in view.patch_owner)  # every patch merged into a selected token
        assert im.counts() == [20, 10]


def test_vscan_runs_on_every_family(llava, next_model, qwen):
    for model, batch in (
        (llava, make_batch(RAGGED)),
        (next_model, next_batch(next_model)),
        (qwen, test_families._qwen_batch()),
    ):
        method = vd.build("vscan", budget=0.5, budget_mode="input")
        before = model_state(model)
        with method.apply(model) as run:
            generate(model, batch, max_new_tokens=4)
        assert model_state(model) == before
        layers = model.config.text_config.num_hidden_layers
        for im in run.report.images:
            assert im.counts() == method.schedule(im.image_tokens, layers, im.grids).counts()


# --- VisionDrop: farthest-point anchors (beyond the paper) -----------------------------------------------------


def test_farthest_anchors_cover_every_cluster_and_avoid_the_covered_one():
    from visiondrop.ops import farthest_anchors

    directions = torch.eye(4)
    points = torch.cat([directions[i].expand(3, -1) + 0.01 * i for i in range(4)])[None]  # 4 clusters of 3
    assert sorted((farthest_anchors(points, 4)[0] // 3).tolist()) == [0, 1, 2, 3]
    covered = directions[:1][None]  # cluster 0 is already represented by a kept token
    picks = farthest_anchors(points, 3, covered=covered)[0]
    assert sorted((picks // 3).tolist()) == [1, 2, 3]
    with pytest.raises(ValueError, match="cannot pick 13 contextual anchors from 12"):
        farthest_anchors(points, 13)


def test_visiondrop_farthest_anchors_run_exact_and_decode_consistent(llava):
    batch = make_batch(RAGGED)
    reports = {}
    for anchors in ("stride", "farthest"):
        method = vd.build("visiondrop", budget=24, anchors=anchors)
        with method.apply(llava) as run:
            cached = generate(llava, batch)
            assert torch.equal(generate(llava, batch, use_cache=False), cached)
        schedule = method.schedule(N_TOKENS, LAYERS, ((8, 8),))
        assert [im.counts() for im in run.report.images] == [schedule.counts()] * 3
        reports[anchors] = run.report.images[0].stages[0]
    stride, farthest = reports["stride"], reports["farthest"]
    assert stride.kept_patches() == farthest.kept_patches()  # the same dominant tokens
    assert stride.token_patch != farthest.token_patch  # different anchors
    assert vd.VisionDrop.reference(budget=24).anchors == "stride"
    with pytest.raises(ValueError, match="anchors must be one of 'stride', 'farthest', got 'grid'"):
        vd.build("visiondrop", anchors="grid")
