"""Budgets -> schedules: the rule of SPEC §7, the published schedule, the three conventions, bad schedules."""

from __future__ import annotations

import re

import pytest

import visiondrop as vd
from visiondrop.schedule import (
    PUBLISHED_SCHEDULE,
    Schedule,
    Stage,
    default_boundaries,
    derive_visiondrop_schedule,
    schedule_from_stages,
    split_contextual,
)


@pytest.mark.parametrize(
    ("budget", "counts"),
    [
        (32, [48, 35, 26, 19]),
        (64, [97, 71, 52, 36]),
        (128, [193, 141, 103, 75]),
        (192, [290, 212, 155, 111]),
    ],
)
def test_llava15_budgets_follow_the_rule_and_meet_the_average(budget, counts):
    sched = derive_visiondrop_schedule(budget, 576, 32)
    assert sched.counts() == counts
    assert [s.layer for s in sched.stages] == [0, 8, 16, 24]
    assert sched.layer_average == budget
    assert sched.input_count == counts[0] and sched.final_count == counts[-1]


def test_the_published_budget_32_schedule_comes_out_of_the_rule():
    sched = derive_visiondrop_schedule(32, 576, 32)
    expected = schedule_from_stages(PUBLISHED_SCHEDULE, 576, 32)
    assert sched == expected
    assert [(s.dominant, s.contextual) for s in sched.stages] == [(42, 6), (30, 5), (22, 4), (16, 3)]
    assert vd.VisionDrop.reference(budget=32).schedule(576, 32) == expected


def test_tokens_per_layer_and_conventions():
    sched = Schedule((Stage(0, 8, 2), Stage(2, 5, 1), Stage(3, 3, 0)), image_tokens=20, num_layers=4)
    assert sched.tokens_per_layer() == [10, 10, 6, 3]
    assert sched.input_count == 10 and sched.final_count == 3
    assert sched.layer_average == (10 + 10 + 6 + 3) / 4
    assert "layer-avg 7.2" in sched.describe()


def test_input_mode_starts_at_the_budget_and_decays():
    sched = derive_visiondrop_schedule(64, 576, 32, mode="input")
    assert sched.counts() == [64, 47, 34, 25]
    assert sched.layer_average < 64


def test_budget_equal_to_the_image_keeps_everything_and_a_high_budget_raises_the_decay():
    assert derive_visiondrop_schedule(576, 576, 32).is_identity()
    high = derive_visiondrop_schedule(500, 576, 32)
    assert high.input_count == 576 and high.layer_average == pytest.approx(500, abs=0.5)
    assert high.counts() == sorted(high.counts(), reverse=True)


def test_schedules_scale_with_layers():
    assert default_boundaries(32) == [8, 16, 24]
    assert default_boundaries(8) == [2, 4, 6]
    assert default_boundaries(2) == [1]
    sched = derive_visiondrop_schedule(64, 576, 8)
    assert [s.layer for s in sched.boundaries] == [2, 4, 6] and sched.layer_average == 64


def test_contextual_split_is_one_eighth_rounded_up():
    assert split_contextual(48) == (42, 6)
    assert split_contextual(35) == (30, 5)
    assert split_contextual(1) == (1, 0)
    assert split_contextual(2) == (1, 1)


def test_fraction_budget_is_a_share_of_the_image():
    method = vd.VisionDrop(budget=0.25)
    assert method.schedule(576, 32).layer_average == pytest.approx(144, abs=0.5)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([(10, 2), (2, 12, 2)], "cannot grow"),
        ([(10, 2), (0, 5, 1)], "layer=0 after one at layer=0"),
        ([(10, 2), (4, 5, 1), (2, 3, 0)], "layer=2 after one at layer=4"),
        ([(0, 0)], "at least one token"),
    ],
)
def test_bad_explicit_schedules_are_refused_when_built(stages, message):
    with pytest.raises(ValueError, match=message) as err:
        vd.VisionDrop(stages=stages)
    assert "\n" not in str(err.value)


def test_a_boundary_past_the_last_layer_is_refused_against_the_model_depth():
    method = vd.VisionDrop(stages=[(10, 2), (8, 5, 1)])
    with pytest.raises(ValueError, match="boundary after layer 8 leaves no LLM layer"):
        method.schedule(64, 8)
    with pytest.raises(ValueError, match="boundaries=\\[2, 9\\]"):
        vd.VisionDrop(boundaries=[2, 9]).schedule(64, 8)


@pytest.mark.parametrize(
    ("name", "field", "bad", "error", "needle"),
    [
        ("fastv", "layer", 0, ValueError, "layer must be LLM layers >= 1"),
        ("dart", "layer", -1, ValueError, "layer must be LLM layers >= 1"),
        ("vscan", "layer", 0, ValueError, "layer must be LLM layers >= 1"),
        ("visiondrop", "boundaries", (4, 2), ValueError, "boundaries must increase"),
        ("pyramiddrop", "boundaries", (4, 4), ValueError, "boundaries must increase"),
        ("pyramiddrop", "boundaries", (), ValueError, "boundaries must name at least one LLM layer"),
        ("sparsevlm", "boundaries", (0, 3), ValueError, "boundaries must be LLM layers >= 1"),
    ],
)
def test_one_boundary_rule_for_every_in_llm_method(name, field, bad, error, needle):
    """Issue 16: every method's boundary field is checked by ``schedule.check_boundaries``, one wording for all."""
    with pytest.raises(error, match=needle) as err:
        vd.build(name, **{field: bad})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "settings", "shown"),
    [
        ("fastv", {"layer": 8}, "layer=8"),
        ("dart", {"layer": 9}, "layer=9"),
        ("vscan", {"layer": 8}, "layer=8"),
        ("visiondrop", {"boundaries": (2, 8)}, "boundaries=[2, 8]"),
        ("pyramiddrop", {"boundaries": (2, 8)}, "boundaries=[2, 8]"),
    ],
)
def test_one_depth_rule_for_every_in_llm_method(name, settings, shown):
    with pytest.raises(
        ValueError, match=rf"{name}: {re.escape(shown)} is outside 1\.\.7 for an LLM of 8 layers"
    ):
        vd.build(name, budget=0.5, **settings).schedule(64, 8)
