"""The tensor functions, checked on cases small enough to work out by hand."""

from __future__ import annotations

import pytest
import torch

from visiondrop import ops


def test_stride_anchors_follow_the_release_rule():
    assert ops.stride_anchors(10, 3).tolist() == [0, 3, 6]  # step = 10 // 3 = 3
    assert ops.stride_anchors(5, 5).tolist() == [0, 1, 2, 3, 4]  # step 1
    assert ops.stride_anchors(7, 2).tolist() == [0, 3]
    with pytest.raises(ValueError, match="3 contextual anchors from 2"):
        ops.stride_anchors(2, 3)


def test_assignment_goes_to_the_most_cosine_similar_anchor():
    metric = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 2.0], [0.2, 0.8], [5.0, 4.0]]])
    slots = ops.assign_to_anchors(metric, torch.tensor([0, 2]))
    # token 4 = (5, 4): cos to (1, 0) = 0.78, to (0, 1) = 0.62 -> anchor slot 0 (magnitude does not matter)
    assert slots.tolist() == [[0, 0, 1, 1, 0]]


def test_merge_reference_is_anchor_plus_mean_of_members_and_mean_is_mean():
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [10.0], [7.0]]])
    anchors = torch.tensor([[0, 4, 5]])
    assign = torch.tensor([[-1, 0, 0, 1, -1, -1]])
    ref = ops.merge_groups(x, anchors, assign, "reference")
    assert ref.flatten().tolist() == [1 + (2 + 3) / 2, 10 + 4, 7]  # the empty anchor stays itself
    mean = ops.merge_groups(x, anchors, assign, "mean")
    assert mean.flatten().tolist() == [(1 + 2 + 3) / 3, (10 + 4) / 2, 7]
    with pytest.raises(ValueError, match="'median'"):
        ops.merge_groups(x, anchors, assign, "median")


def test_top_k_sorted_is_in_original_order_and_ties_go_to_the_lower_index():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.3, 0.5]])
    assert ops.top_k_sorted(scores, 2).tolist() == [[1, 2]]
    assert ops.top_k_sorted(scores, 4).tolist() == [[1, 2, 3, 4]]
    assert ops.top_k_sorted(scores, 0).shape == (1, 0)


def test_release_arithmetic_worked_example():
    """[CLS] + 8 patches, 3 dominant (incl. [CLS]) and 2 contextual, written out by hand."""
    # Patch scores (token t = patch t - 1); [CLS] scores 0 but is forced.
    scores = torch.tensor([[0.0, 0.10, 0.50, 0.05, 0.30, 0.02, 0.01, 0.20, 0.07]])
    # Top-2 patches: tokens 2 (0.50) and 4 (0.30) -> dominant [0, 2, 4].
    # Remaining R = [1, 3, 5, 6, 7, 8], r = 6, c = 2 -> step 3 -> anchors R[0] = 1 and R[3] = 6.
    # Metrics: 3 and 8 point like token 1, 5 and 7 like token 6.
    metric = torch.tensor(
        [[[0, 0], [1, 0], [9, 9], [1, 0.1], [9, 9], [0.1, 1], [0, 1], [0.2, 1], [1, 0.2]]],
        dtype=torch.float32,
    )
    x = torch.arange(9, dtype=torch.float32).view(1, 9, 1) * 10  # token t carries the value 10 t
    sel = ops.contextual_selection(
        scores, metric, 3, 2, candidates=torch.arange(9) > 0, forced=torch.tensor([0]), merge="reference"
    )
    assert sel.keep.tolist() == [[0, 2, 4]]
    assert sel.anchors.tolist() == [[1, 6]]
    assert sel.assign.tolist() == [[-1, 0, -1, 0, -1, 1, 1, 1, 0]]
    out = sel.apply(x).flatten().tolist()
    assert out == [0, 20, 40, 10 + (30 + 80) / 2, 60 + (50 + 70) / 2]
    mean = ops.contextual_selection(
        scores, metric, 3, 2, candidates=torch.arange(9) > 0, forced=torch.tensor([0]), merge="mean"
    )
    assert mean.apply(x).flatten().tolist()[3:] == [(10 + 30 + 80) / 3, (60 + 50 + 70) / 3]


def _brute_force_scores(q, k, valid, cols, causal, debias):
    """Full attention matrix, then the SPEC §4.2 reduction, one image at a time, in float64."""
    out = []
    for i in range(q.shape[0]):
        logits = q[i].double() @ k[i].double().transpose(-1, -2) / q.shape[-1] ** 0.5  # (H, n, T)
        allowed = valid[i][None, None, :].expand_as(logits).clone()
        if causal:
            t = torch.arange(k.shape[2])
            allowed &= t[None, None, :] <= cols[i][None, :, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(-1).mean(0)[:, cols[i]]  # (n queries, n image keys)
        if debias and causal:  # without a causal mask every query sees every key
            seen = torch.tensor([float(len(cols[i]) - j) for j in range(len(cols[i]))], dtype=torch.float64)
            out.append(probs.sum(0) / seen)
        else:
            out.append(probs.mean(0))
    return torch.stack(out).float()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("debias", [False, True])
def test_visual_attention_matches_the_full_attention_matrix(causal, debias, monkeypatch):
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 8)
    k = torch.randn(2, 3, 12, 8)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False  # left padding of the second row
    cols = torch.tensor([[4, 5, 6, 7, 8], [6, 7, 8, 9, 10]])
    expected = _brute_force_scores(q, k, valid, cols, causal, debias)
    got = ops.visual_attention(q, k, valid, cols, causal=causal, debias=debias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Splitting the heads into chunks (as for a 2,880-token image) gives the same numbers.
    monkeypatch.setattr(ops, "_MAX_BLOCK", 1)
    torch.testing.assert_close(ops.visual_attention(q, k, valid, cols, causal=causal, debias=debias), got)


def test_debias_removes_the_early_token_bias_of_causal_scoring():
    # Identical keys: every visible key gets the same share, so only visibility differs between tokens.
    q = torch.zeros(1, 1, 4, 2)
    k = torch.zeros(1, 1, 4, 2)
    cols = torch.arange(4)[None]
    biased = ops.visual_attention(q, k, None, cols, causal=True)
    fair = ops.visual_attention(q, k, None, cols, causal=True, debias=True)
    assert biased[0].tolist() == sorted(biased[0].tolist(), reverse=True) and biased[0, 0] > biased[0, 3]
    # Key j is seen by queries j..3 with weight 1/(i+1); averaged over those queries only it is still
    # decreasing but strictly less so; check the exact values.
    expected_fair = [(1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, (1 / 2 + 1 / 3 + 1 / 4) / 3, (1 / 3 + 1 / 4) / 2, 1 / 4]
    torch.testing.assert_close(fair[0], torch.tensor(expected_fair))


def test_cls_attention_is_the_cls_row_without_its_own_share():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 1, 4)
    k = torch.randn(1, 2, 6, 4)
    probs = (q @ k.transpose(-1, -2) / 2).softmax(-1).mean(1)[0, 0]  # (6,)
    torch.testing.assert_close(ops.cls_attention(q, k)[0], probs[1:])


def test_selection_sources_and_apply_without_merging():
    sel = ops.Selection(keep=torch.tensor([[2, 0]]))
    x = torch.tensor([[[1.0], [2.0], [3.0]]])
    assert sel.sources().tolist() == [[2, 0]]
    assert sel.apply(x).flatten().tolist() == [3.0, 1.0]
    assert sel.num_out == 2 and sel.num_merged == 0
