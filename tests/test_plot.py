"""``visiondrop plot``: one point per method, budget and policy, filled for preserve and hollow for compact."""

from __future__ import annotations

import json

import pytest

from visiondrop.tools.cli import main
from visiondrop.tools.plot import (
    _BOTTOM,
    _H,
    _LEFT,
    _RIGHT,
    _TOP,
    _W,
    draw_accuracy_vs_flops,
    points,
    ttft_points,
)

ROWS = [
    {"method": "none", "budget": None, "accuracy": 0.9, "n": 10},
    {
        "method": "a:positions=preserve",
        "positions": "preserve",
        "budget": 64,
        "accuracy": 0.8,
        "flops_ratio": 2.0,
    },
    {
        "method": "a:positions=compact",
        "positions": "compact",
        "budget": 64,
        "accuracy": 0.6,
        "flops_ratio": 2.0,
    },
    {
        "method": "a:positions=preserve",
        "positions": "preserve",
        "budget": 32,
        "accuracy": 0.7,
        "flops_ratio": 4.0,
    },
    {"method": "b", "budget": 32, "error": "out of reach"},
]


def _at(x_percent, accuracy, y_lo=0.55, y_hi=0.92):
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    return (
        round(_LEFT + x_percent / 105 * plot_w),
        round(_TOP + (1 - (accuracy - y_lo) / (y_hi - y_lo)) * plot_h),
    )


def test_points_group_by_method_and_policy():
    assert points(ROWS) == {
        ("a", "preserve"): [(25.0, 0.7, 32), (50.0, 0.8, 64)],
        ("a", "compact"): [(50.0, 0.6, 64)],
    }


def test_preserve_is_filled_and_compact_hollow():
    image = draw_accuracy_vs_flops(ROWS)
    assert image.size == (_W, _H)
    assert image.getpixel(_at(50, 0.8)) != (255, 255, 255)  # filled marker
    assert image.getpixel(_at(50, 0.6)) == (255, 255, 255)  # hollow marker: white centre
    with pytest.raises(ValueError, match="no rows"):
        draw_accuracy_vs_flops(ROWS[:1])


def test_the_command_writes_a_small_png(tmp_path, capsys):
    source = tmp_path / "eval.json"
    source.write_text(json.dumps({"meta": {}, "results": ROWS}))
    out = tmp_path / "p.png"
    assert main(["plot", str(source), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 300_000


# --- accuracy against measured time to first token (`plot --ttft`) ---------------------------------------------


def _bench(results, base_rounds=(10.0, 12.0, 11.0)):
    """A `visiondrop bench --json` dict with only what the picture reads; times in seconds."""
    out = []
    for method, budget, policy, fields, rounds in results:
        median = sorted(rounds)[len(rounds) // 2]
        out.append(
            {
                "method": method,
                "budget": budget,
                "budget_mode": "average",
                "positions": policy,
                "fields": fields,
                "ttft_s_rounds": list(rounds),
                "prefill_speedup": sorted(base_rounds)[1] / median,
            }
        )
    unpruned = {"method": "none", "ttft_s_rounds": list(base_rounds), "prefill_speedup": 1.0}
    return {"unpruned": unpruned, "results": out}


EVAL = [
    {"method": "none", "budget": None, "accuracy": 0.9, "n": 10},
    {
        "method": "a:positions=preserve",
        "positions": "preserve",
        "budget": 64,
        "budget_mode": "average",
        "accuracy": 0.8,
    },
    {
        "method": "a:positions=preserve",
        "positions": "preserve",
        "budget": 32,
        "budget_mode": "average",
        "accuracy": 0.7,
    },
    {
        "method": "a:k=v:positions=preserve",
        "positions": "preserve",
        "budget": 64,
        "budget_mode": "average",
        "accuracy": 0.75,
    },
    {
        "method": "a:positions=compact",
        "positions": "compact",
        "budget": 64,
        "budget_mode": "average",
        "accuracy": 0.6,
    },
    {"method": "b:positions=preserve", "budget": 32, "budget_mode": "average", "error": "out of reach"},
]

# two bench runs, one per budget; 'a' once plain and once with k=v given by --set (in fields, not in the label)
BENCHES = [
    _bench(
        [
            ("a", 64, "preserve", {"positions": "preserve"}, (5.0, 6.6, 5.5)),
            ("a", 64, "preserve", {"positions": "preserve", "k": "v"}, (13.0, 13.2, 12.1)),
        ]
    ),
    _bench([("a", 32, "preserve", {"positions": "preserve"}, (2.0, 3.6, 3.3))]),
]


def test_ttft_points_match_method_fields_budget_and_policy():
    series, spread = ttft_points(EVAL, BENCHES, positions=["preserve"])
    # x = 100 x median(method) / median(unpruned) = 100 x 5.5 / 11, 3.3 / 11, 13 / 11
    assert series == {
        ("a", "preserve"): [(pytest.approx(30.0), 0.7, 32), (pytest.approx(50.0), 0.8, 64)],
        ("a:k=v", "preserve"): [(pytest.approx(100 * 13 / 11), 0.75, 64)],
    }
    # per-round ratios: round i of the method over round i of the unpruned model
    assert spread[("a", "preserve", 64)] == (pytest.approx(50.0), pytest.approx(55.0))
    assert spread[("a", "preserve", 32)] == (pytest.approx(20.0), pytest.approx(30.0))


def test_ttft_point_without_a_measurement_is_a_one_line_error():
    # the compact point of 'a' at 64 was never timed
    with pytest.raises(ValueError, match=r"a at budget 64 \(average, positions=compact\)") as info:
        ttft_points(EVAL, BENCHES)
    assert "\n" not in str(info.value)
    # the 32 budget's bench missing: the error names that point
    with pytest.raises(ValueError, match=r"no measured time to first token for a at budget 32"):
        ttft_points(EVAL, BENCHES[:1], positions=["preserve"])
    # a bench of another variant does not stand in for the plain method
    variant_only = [_bench([("a:k=v", 32, "preserve", {"positions": "preserve", "k": "v"}, (1.0, 1.0, 1.0))])]
    with pytest.raises(ValueError, match="for a at budget 32"):
        ttft_points(EVAL[:3], [BENCHES[0], *variant_only], positions=["preserve"])
    with pytest.raises(ValueError, match="in two bench results"):
        ttft_points(EVAL, [BENCHES[0], BENCHES[0]], positions=["preserve"])


def test_the_command_draws_accuracy_vs_ttft(tmp_path, capsys):
    source = tmp_path / "eval.json"
    source.write_text(json.dumps({"meta": {}, "results": EVAL}))
    benches = []
    for i, bench in enumerate(BENCHES):
        benches.append(tmp_path / f"bench{i}.json")
        benches[-1].write_text(json.dumps(bench))
    out = tmp_path / "docs" / "t.png"
    argv = ["plot", str(source), "--ttft", *map(str, benches), "--positions", "preserve", "--out", str(out)]
    assert main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size < 300_000
    from PIL import Image

    image = Image.open(out).convert("RGB")
    assert image.size == (_W, _H)
    # one variant is slower than unpruned (median 118 %, its slowest round 130 %): the x axis widens to 135 %,
    # the filled marker of 'a' at 64 sits at 50 % of that scale, not of the FLOPs picture's 105 %
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    y_lo, y_hi = 0.55, 0.92
    at = (round(_LEFT + 50 / 135 * plot_w), round(_TOP + (1 - (0.8 - y_lo) / (y_hi - y_lo)) * plot_h))
    assert image.getpixel(at) != (255, 255, 255)
    at_flops_scale = (round(_LEFT + 50 / 105 * plot_w), at[1])
    assert image.getpixel(at_flops_scale) == (255, 255, 255)

    # a drawn point without a bench result: exit status 2, one line naming it
    capsys.readouterr()
    assert (
        main(["plot", str(source), "--ttft", str(benches[0]), "--positions", "preserve", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "for a at budget 32" in err
    # --budgets leaves the unmeasured budget out
    assert (
        main([*argv[:3], str(benches[0]), "--positions", "preserve", "--budgets", "64", "--out", str(out)])
        == 0
    )
    # not a bench file; --positions without --ttft
    assert main(["plot", str(source), "--ttft", str(source), "--out", str(out)]) == 2
    assert "not a `visiondrop bench --json` file" in capsys.readouterr().err
    assert main(["plot", str(source), "--positions", "preserve", "--out", str(out)]) == 2
    assert "--positions" in capsys.readouterr().err
