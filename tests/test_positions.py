"""One position policy for every method: ``preserve`` keeps original positions, ``compact`` renumbers, ``auto`` picks."""

from __future__ import annotations

import pytest
import torch

import visiondrop as vd
from conftest import BOS, image, make_batch, model_state

PRUNING = [n for n in vd.available_methods() if n != "none"]
#: Methods whose scores do not depend on the text query: cached decode must equal use_cache=False.
VISUAL_ONLY = [n for n in PRUNING if vd.method_class(n).info.signal != "text-guided"]
PROMPT = [BOS, 5, *image(), 7, 8]  # 2 text tokens, 64 image tokens, 2 text tokens
IMAGE_START = 2


def _record_layers(model):
    """Forward pre-hooks on every decoder layer (registered after visiondrop's, so they see what it passes on)."""
    calls: list[tuple[int, torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
    handles = []
    for idx, layer in enumerate(model.model.language_model.layers):

        def hook(module, args, kwargs, idx=idx):
            hidden = args[0] if args else kwargs["hidden_states"]
            calls.append((idx, kwargs.get("position_ids"), kwargs["position_embeddings"][0], hidden))

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


def test_every_method_has_the_positions_field_with_one_validation():
    for name in vd.available_methods():
        method = vd.build(name, budget=24)
        assert method.positions == ("preserve" if name == "visiondrop" else "auto")
        assert vd.build(name, budget=24, positions="compact").settings()["positions"] == "compact"
        with pytest.raises(ValueError, match=r"positions must be one of .*got 'shifted'"):
            vd.build(name, budget=24, positions="shifted")
    assert vd.VisionDrop.reference(budget=24).positions == "compact"


@pytest.mark.parametrize("policy", ["preserve", "compact", "auto"])
@pytest.mark.parametrize("name", PRUNING)
def test_every_method_passes_the_positions_its_policy_says(llava, name, policy):
    """At every layer of the prefill: compact = 0..T-1; preserve = the original position of every text token and of
    every visual token's patch (a merged token's anchor). The rotary embedding matches the position ids."""
    method = vd.build(name, budget=24, positions=policy)
    expected_policy = "compact" if policy == "auto" else policy  # LLaVA: 1-D RoPE
    batch = make_batch([PROMPT])
    before = model_state(llava)
    with method.apply(llava) as run:
        calls, handles = _record_layers(llava)
        try:
            with torch.no_grad():
                llava(**batch)
        finally:
            for h in handles:
                h.remove()
    assert model_state(llava) == before
    rotary = llava.model.language_model.rotary_emb
    views = {st.layer: st for st in run.report.images[0].stages}
    view = None
    original = len(PROMPT)
    for idx, positions, cos, hidden in calls:
        view = views.get(idx, view) if idx > 0 else views.get(0)
        length = hidden.shape[1]
        tokens = view.tokens if view is not None else 64
        assert length == original - 64 + tokens, (idx, length)
        assert positions is not None
        got = positions[0].tolist()
        if expected_policy == "compact":
            assert got == list(range(length)), (name, idx)
        else:
            patches = view.token_patch if view is not None else list(range(64))
            text = [0, 1, original - 2, original - 1]
            assert got[:2] + got[-2:] == text
            assert sorted(got[2:-2]) == sorted(IMAGE_START + max(p, 0) for p in patches), (name, idx)
        ref_cos, _ = rotary(hidden, positions)
        torch.testing.assert_close(cos, ref_cos)
    if name != "none":
        assert any(c[3].shape[1] < original for c in calls)  # something was pruned


@pytest.mark.parametrize("policy", ["preserve", "compact"])
@pytest.mark.parametrize("name", VISUAL_ONLY)
def test_visual_only_methods_decode_the_same_with_and_without_cache_under_both_policies(llava, name, policy):
    from conftest import RAGGED, generate

    batch = make_batch(RAGGED)
    with vd.build(name, budget=24, positions=policy).apply(llava):
        cached = generate(llava, batch)
        assert torch.equal(generate(llava, batch, use_cache=False), cached)


def test_policies_differ_where_they_should(llava):
    """The two policies are not the same computation: the logits after pruning differ (LLaVA, 1-D RoPE)."""
    batch = make_batch([PROMPT])
    out = {}
    for policy in ("preserve", "compact"):
        with torch.no_grad(), vd.build("divprune", budget=24, positions=policy).apply(llava):
            out[policy] = llava(**batch).logits[:, -1]
    assert not torch.allclose(out["preserve"], out["compact"])
