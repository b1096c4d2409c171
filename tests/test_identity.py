"""Nothing pruned => bit-identical to the unpatched model; after the block => the model exactly as before."""

from __future__ import annotations

import pytest
import torch

import visiondrop as vd
from conftest import N_TOKENS, RAGGED, generate, make_batch, model_state

KEEP_ALL = [
    pytest.param(lambda: vd.build("none"), id="none"),
    pytest.param(lambda: vd.VisionDrop(budget=N_TOKENS), id="visiondrop-full-budget"),
    pytest.param(lambda: vd.VisionDrop(budget=1.0, positions="preserve"), id="visiondrop-fraction-1"),
    pytest.param(
        lambda: vd.VisionDrop(stages=[(N_TOKENS, 0), (2, N_TOKENS, 0), (5, N_TOKENS, 0)]), id="explicit-all"
    ),
]


@pytest.mark.parametrize("make_method", KEEP_ALL)
@pytest.mark.parametrize("side", ["left", "right"])
def test_keeping_every_token_gives_bit_identical_logits(llava_any, make_method, side):
    batch = make_batch(RAGGED, side=side)
    with torch.no_grad():
        reference = llava_any(**batch).logits
        with make_method().apply(llava_any) as run:
            logits = llava_any(**batch).logits
    assert torch.equal(logits, reference)
    assert len(run.report.images) == 3
    assert all(set(im.counts()) == {N_TOKENS} for im in run.report.images)


@pytest.mark.parametrize("make_method", KEEP_ALL)
def test_keeping_every_token_gives_identical_generations(llava_any, make_method):
    batch = make_batch(RAGGED)
    reference = generate(llava_any, batch, output_scores=True, return_dict_in_generate=True)
    with make_method().apply(llava_any):
        out = generate(llava_any, batch, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.scores, reference.scores, strict=True))


def _outputs(model, batch):
    with torch.no_grad():
        return model(**batch).logits, generate(model, batch)


def test_model_is_exactly_restored_after_the_block(llava):
    batch = make_batch(RAGGED)
    before_logits, before_tokens = _outputs(llava, batch)  # also installs transformers' own lazy hooks
    before = model_state(llava)
    with vd.VisionDrop(budget=16).apply(llava):
        assert model_state(llava) != before  # hooks are really installed inside
        pruned_logits, _ = _outputs(llava, batch)
    assert pruned_logits.shape[1] < before_logits.shape[1]
    assert model_state(llava) == before
    assert "generate" not in llava.__dict__ and "forward" not in llava.__dict__
    after_logits, after_tokens = _outputs(llava, batch)
    assert torch.equal(after_logits, before_logits) and torch.equal(after_tokens, before_tokens)


def test_model_is_restored_after_an_exception_inside_the_block(llava):
    batch = make_batch(RAGGED)
    before_logits, _ = _outputs(llava, batch)
    before = model_state(llava)
    with pytest.raises(KeyError, match="boom"), vd.VisionDrop(budget=16).apply(llava):
        generate(llava, batch)
        raise KeyError("boom")
    assert model_state(llava) == before
    assert torch.equal(_outputs(llava, batch)[0], before_logits)


def test_model_is_restored_after_an_error_raised_by_the_method_during_a_call(llava):
    batch = make_batch(RAGGED)
    before = model_state(llava)
    with pytest.raises(ValueError, match="static"), vd.VisionDrop(budget=16).apply(llava):
        generate(llava, batch, cache_implementation="static")
    assert model_state(llava) == before


def test_an_instance_level_generate_set_by_someone_else_is_put_back(llava):
    sentinel = llava.generate  # a bound method stored on the instance, as accelerate-style wrappers do
    llava.__dict__["generate"] = sentinel
    try:
        with vd.build("none").apply(llava):
            assert llava.__dict__["generate"] is not sentinel
        assert llava.__dict__["generate"] is sentinel
    finally:
        del llava.__dict__["generate"]


def test_nesting_two_methods_on_one_model_is_refused(llava):
    before = model_state(llava)
    outer, inner = vd.build("none"), vd.VisionDrop(budget=8)
    with (
        outer.apply(llava),
        pytest.raises(RuntimeError, match="already has a pruning method applied"),
        inner.apply(llava),
    ):
        pass
    assert model_state(llava) == before
