"""Issue 15's runtime findings, kept fixed: plain batched forward, nothing pruned after exit, the streamer's prompt, no
cache kept alive by ``run``, and overlapping calls from two threads refused in one line."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import visiondrop as vd
from conftest import BOS, IMAGE_TOKEN, RAGGED, make_batch, model_state, next_batch, tiny_llava
from visiondrop.testing import tiny_llava_next


@pytest.fixture(scope="module", params=["llava", "llava-next"])
def family(request):
    """(model, padded batch of 3 rows: one image, two images, text only)."""
    if request.param == "llava":
        model = tiny_llava()
        return model, make_batch(RAGGED)
    model = tiny_llava_next()
    with torch.no_grad():  # install transformers' lazy output-capturing hooks before any state snapshot
        model(**next_batch(model), output_hidden_states=True)
        model.model.vision_tower(torch.randn(1, 3, 56, 56), output_hidden_states=True)
    return model, next_batch(model)


def _prefill_logits(model, batch) -> torch.Tensor:
    """The last prompt token's logits of the pruned generate()'s prefill, (B, V)."""
    out = model.generate(
        **batch,
        max_new_tokens=1,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.logits[0]


@pytest.mark.parametrize(
    "name",
    ["fastv", "pyramiddrop", "dart", "visiondrop", "visionzip", "divprune", "random", "pooling", "none"],
)
def test_plain_forward_in_a_padded_batch_equals_generate_prefill(family, name):
    """Finding 1: ``model(**inputs)`` (lmms-eval's loglikelihood call) in a padded batch under every kind of method.

    A plain forward numbers a left-padded row from the padding on, generate() from its first real token; RoPE only
    sees differences of positions, so the two agree to float rounding, as they do unpruned."""
    model, batch = family
    method = vd.build(name, budget=0.5)
    before = model_state(model)
    with torch.no_grad(), method.apply(model) as run:
        forward = model(**batch).logits[
            :, -1
        ]  # left padding: the last column is every row's last prompt token
        forward_counts = [im.counts() for im in run.report.images]
        prefill = _prefill_logits(model, batch)
        assert [im.counts() for im in run.report.images] == forward_counts
    torch.testing.assert_close(forward, prefill, atol=2e-4, rtol=1e-4)
    assert model_state(model) == before


def test_plain_forward_when_the_vision_stage_keeps_every_token():
    """Finding 1, VisionDrop's form: its vision stage keeps all 64 tokens, the boundary after layer 2 prunes."""
    model = tiny_llava()
    batch = make_batch(RAGGED)
    method = vd.VisionDrop(stages=[(64, 0), (2, 20, 2)])
    with torch.no_grad(), method.apply(model) as run:
        forward = model(**batch).logits[:, -1]
        assert [im.counts()[:3] for im in run.report.images] == [[64, 22]] * 3
        prefill = _prefill_logits(model, batch)
    torch.testing.assert_close(forward, prefill, atol=2e-4, rtol=1e-4)


def test_a_generate_reference_kept_past_the_block_does_not_prune(family):
    """Finding 2: whatever a caller took inside the block behaves as the unpatched model after exit."""
    model, batch = family
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=4, do_sample=False)
        reference_logits = model(**batch).logits
        with vd.build("visiondrop", budget=0.25).apply(model):
            held_generate = model.generate
            held_forward = model.forward
            held_call = model.__call__
            pruned = held_generate(**batch, max_new_tokens=4, do_sample=False)
        assert held_generate is not model.generate
        assert torch.equal(held_generate(**batch, max_new_tokens=4, do_sample=False), reference)
        assert torch.equal(held_forward(**batch).logits, reference_logits)
        assert torch.equal(held_call(**batch).logits, reference_logits)
    assert not torch.equal(pruned, reference)  # the pruned call did prune


class _Recorder:
    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended = True


def test_a_streamer_is_shown_the_callers_prompt():
    """Finding 6: generate() puts the prompt first; the streamer must see the caller's ids, not the pruned ones."""
    from transformers import TextStreamer

    model = tiny_llava()
    batch = make_batch([RAGGED[0]])
    recorder = _Recorder()
    with torch.no_grad(), vd.build("visiondrop", budget=8).apply(model):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, streamer=recorder)
    assert torch.equal(recorder.puts[0], batch["input_ids"])
    assert recorder.ended
    assert torch.equal(torch.cat([p.flatten() for p in recorder.puts])[None], out)

    class Tok:  # the least a TextStreamer needs: decode ids to text (one character per id)
        def decode(self, ids, **kwargs):
            return "".join(chr(65 + int(i) % 26) for i in ids)

    printed: list[str] = []
    streamer = TextStreamer(Tok(), skip_prompt=False)
    streamer.on_finalized_text = lambda text, stream_end=False: printed.append(text)
    with torch.no_grad(), vd.build("visiondrop", budget=8).apply(model):
        model.generate(**batch, max_new_tokens=4, do_sample=False, streamer=streamer)
    assert "".join(printed).startswith(Tok().decode(batch["input_ids"][0]))


def test_run_does_not_keep_the_last_calls_cache_alive():
    """Finding 6: after the block, ``run`` (and its report) must not hold the KV cache of the last call."""
    model = tiny_llava()
    batch = make_batch(RAGGED)
    with torch.no_grad(), vd.build("pyramiddrop", budget=0.5).apply(model) as run:
        out = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = weakref.ref(out.past_key_values)
        forward = model(**batch, use_cache=True)
        forward_cache = weakref.ref(forward.past_key_values)
        del out, forward
    gc.collect()
    assert cache() is None and forward_cache() is None
    assert run.report is not None and len(run.report.images) == 3


def test_two_threads_on_one_model_refused_in_one_line():
    """Finding 6: a model is pruned for the whole process while the block is open, and calls on it must not overlap:
    a call from a second thread while one is in flight is refused in one line; the running call is unharmed."""
    model = tiny_llava()
    batch = make_batch(RAGGED)
    other = make_batch([[BOS, 5, *[IMAGE_TOKEN] * 64, 7]])
    with torch.no_grad():
        expected = model.generate(**batch, max_new_tokens=3, do_sample=False)
        with vd.build("dart", budget=0.5).apply(model):
            pruned = model.generate(**batch, max_new_tokens=3, do_sample=False)
    errors: list[BaseException] = []
    started, proceed = threading.Event(), threading.Event()

    def slow_hook(
        module, args, kwargs
    ):  # hold the first layer of the main thread's call until the other has tried
        if threading.current_thread() is threading.main_thread() and not proceed.is_set():
            started.set()
            proceed.wait(30)

    def second() -> None:
        started.wait(30)
        try:
            with torch.no_grad():
                model(**other)
        except RuntimeError as err:
            errors.append(err)
        finally:
            proceed.set()

    handle = model.model.language_model.layers[0].register_forward_pre_hook(slow_hook, with_kwargs=True)
    thread = threading.Thread(target=second)
    try:
        with torch.no_grad(), vd.build("dart", budget=0.5).apply(model):
            thread.start()
            got = model.generate(**batch, max_new_tokens=3, do_sample=False)
            thread.join(30)
            # the streamer pattern: generate in a worker thread while nothing else runs is allowed
            worker_out: list[torch.Tensor] = []
            worker = threading.Thread(
                target=lambda: worker_out.append(model.generate(**batch, max_new_tokens=3, do_sample=False))
            )
            worker.start()
            worker.join(60)
    finally:
        handle.remove()
    assert len(errors) == 1
    message = str(errors[0])
    assert "another thread" in message and "\n" not in message
    assert torch.equal(got, pruned)
    assert torch.equal(worker_out[0], pruned)
    with torch.no_grad():  # and afterwards the model is the unpatched one again
        assert torch.equal(model.generate(**batch, max_new_tokens=3, do_sample=False), expected)
