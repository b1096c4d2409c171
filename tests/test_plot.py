"""``visiondrop plot``: one point per method, budget and policy, filled for preserve and hollow for compact."""

from __future__ import annotations

import json

import pytest

from visiondrop.tools.cli import main
from visiondrop.tools.plot import _BOTTOM, _H, _LEFT, _RIGHT, _TOP, _W, draw_accuracy_vs_flops, points

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
