"""Bad input: a one-line error naming the value, and the model left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

import visiondrop as vd
from conftest import BOS, N_TOKENS, RAGGED, generate, image, make_batch, model_state


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"budget": 0}, ValueError, "got 0"),
        ({"budget": -5}, ValueError, "got -5"),
        ({"budget": 1.5}, ValueError, "got 1.5"),
        ({"budget": 0.0}, ValueError, "got 0.0"),
        ({"budget": True}, TypeError, "True"),
        ({"budget": "64"}, TypeError, "'64'"),
        ({"budget_mode": "final"}, ValueError, "'final'"),
        ({"score": "text"}, ValueError, "'text'"),
        ({"merge": "sum"}, ValueError, "'sum'"),
        ({"positions": "shifted"}, ValueError, "'shifted'"),
        ({"boundaries": [0, 4]}, ValueError, "[0, 4]"),
        ({"stages": [(10, 2), (4, 20, 2)]}, ValueError, "cannot grow"),
        ({"stages": [(10, 2), (0, 5, 2)]}, ValueError, "layer=0"),
    ],
)
def test_bad_settings_are_refused_when_the_method_is_built(kwargs, error, needle):
    with pytest.raises(error) as err:
        vd.VisionDrop(**kwargs)
    assert needle in _one_line(err)


def test_build_names_unknown_methods_and_fields():
    with pytest.raises(ValueError, match="unknown method 'fastvv'; available: visiondrop, fastv, ") as err:
        vd.build("fastvv")
    _one_line(err)
    with pytest.raises(TypeError, match="visiondrop has no field\\(s\\) budgt") as err:
        vd.build("visiondrop", budgt=64)
    _one_line(err)
    assert vd.build("VisionDrop", budget=8) == vd.VisionDrop(budget=8)
    assert vd.build("visiondrop") is not vd.build("visiondrop")  # a new instance every time


def test_budget_above_the_image_tokens_is_refused_and_the_model_untouched(llava):
    before = model_state(llava)
    with (
        pytest.raises(
            ValueError, match=f"budget={N_TOKENS + 1} is more than the {N_TOKENS} visual tokens"
        ) as err,
        vd.VisionDrop(budget=N_TOKENS + 1).apply(llava),
    ):
        pass
    _one_line(err)
    assert model_state(llava) == before


def test_boundary_past_the_last_layer_is_refused_at_apply(llava):
    before = model_state(llava)
    method = vd.VisionDrop(stages=[(20, 2), (8, 10, 1)])
    with (
        pytest.raises(ValueError, match="boundary after layer 8 leaves no LLM layer") as err,
        method.apply(llava),
    ):
        pass
    _one_line(err)
    assert model_state(llava) == before


def test_unsupported_model_class_names_the_supported_ones():
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=50
    )
    model = LlamaForCausalLM(config)
    before = model_state(model)
    with (
        pytest.raises(
            TypeError, match="unsupported model class LlamaForCausalLM; visiondrop supports"
        ) as err,
        vd.build("none").apply(model),
    ):
        pass
    assert "LlavaForConditionalGeneration" in _one_line(err)
    assert model_state(model) == before


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda m, b: generate(m, b, cache_implementation="static"), "cache_implementation='static'"),
        (lambda m, b: generate(m, b, prefill_chunk_size=16), "prefill_chunk_size=16"),
        (
            lambda m, b: generate(
                m, b, past_key_values=StaticCache(config=m.config.text_config, max_cache_len=400)
            ),
            "past_key_values=StaticCache",
        ),
        (lambda m, b: m(**b, labels=b["input_ids"]), "labels"),
        (
            lambda m, b: m(**{**b, "attention_mask": b["attention_mask"][:, None, None, :]}),
            "2-D padding mask",
        ),
        (
            lambda m, b: m(inputs_embeds=torch.zeros(3, 5, 64), pixel_values=b["pixel_values"]),
            "needs input_ids",
        ),
    ],
)
def test_unsupported_calls_are_refused_with_one_line(llava, call, needle):
    batch = make_batch(RAGGED)
    before = model_state(llava)
    with vd.VisionDrop(budget=16).apply(llava), pytest.raises(ValueError) as err:
        call(llava, batch)
    assert needle in _one_line(err)
    assert model_state(llava) == before


def test_images_and_placeholders_that_do_not_match(llava):
    batch = make_batch([[BOS, 5, *image(), 7]])
    batch["pixel_values"] = torch.cat([batch["pixel_values"]] * 2)  # two images, one placeholder run
    with vd.VisionDrop(budget=16).apply(llava), pytest.raises(ValueError) as err:
        generate(llava, batch)
    assert (
        f"2 image(s) need {2 * N_TOKENS} <image> placeholder tokens in input_ids, found {N_TOKENS}"
        in _one_line(err)
    )
    broken = make_batch([[BOS, *image()[:-3], 7, *image()[:3]]])
    broken["pixel_values"] = batch["pixel_values"][:1]
    with (
        vd.VisionDrop(budget=16).apply(llava),
        pytest.raises(ValueError, match="does not split into whole images"),
    ):
        generate(llava, broken)


def test_a_continuation_with_a_new_image_is_refused(llava):
    batch = make_batch([[BOS, 5, *image(), 7]])
    with vd.VisionDrop(budget=16).apply(llava):
        first = generate(llava, batch, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="new image in a conversation continued") as err:
            generate(llava, {**batch, "input_ids": first.sequences}, past_key_values=first.past_key_values)
        _one_line(err)
        cache = DynamicCache(config=llava.config.text_config)
        with torch.no_grad():
            llava(input_ids=torch.tensor([[BOS, 5]]), past_key_values=cache)
            with pytest.raises(ValueError, match="pre-filled past_key_values"):
                llava(**batch, past_key_values=cache)
