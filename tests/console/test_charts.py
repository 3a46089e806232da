"""The usage charts' geometry: bars stack to their day's total, the tallest day fills the
plot, small series beyond the palette are drawn as one "other", the period's empty days
keep their place."""

from __future__ import annotations

import pytest

from aicloud.console.charts import BOTTOM, HEIGHT, PALETTE, TOP, stacked_bars


def plain(value: float) -> str:
    return f"{value:g}"


def test_bars_stack_to_each_days_total() -> None:
    chart = stacked_bars("t", [("2026-11-01", "a", 30), ("2026-11-01", "b", 10),
                               ("2026-11-02", "a", 20)], plain)
    plot = HEIGHT - BOTTOM - TOP
    first = [b for b in chart.bars if b.title.startswith("2026-11-01")]
    second = [b for b in chart.bars if b.title.startswith("2026-11-02")]
    assert sum(b.height for b in first) == pytest.approx(plot)  # the tallest day
    assert sum(b.height for b in second) == pytest.approx(plot / 2)
    assert first[0].title == "2026-11-01 · a: 30"  # the largest series at the bottom
    assert first[0].y + first[0].height == pytest.approx(HEIGHT - BOTTOM)
    assert first[1].y + first[1].height == pytest.approx(first[0].y)
    assert [name for _, name in chart.legend] == ["a", "b"]
    assert [label.text for label in chart.y_labels] == ["0", "20", "40"]


def test_series_beyond_the_palette_become_other() -> None:
    points = [("2026-11-01", f"s{i}", float(100 - i)) for i in range(12)]
    chart = stacked_bars("t", points, plain)
    names = [name for _, name in chart.legend]
    assert names == [f"s{i}" for i in range(len(PALETTE) - 1)] + ["other"]
    other = next(b for b in chart.bars if "other" in b.title)
    assert other.title.endswith(f": {sum(100 - i for i in range(7, 12)):g}")


def test_empty_days_of_the_period_keep_their_place() -> None:
    days = [f"2026-11-{d:02d}" for d in range(1, 11)]
    chart = stacked_bars("t", [("2026-11-10", "a", 5)], plain, days)
    assert len(chart.bars) == 1
    assert chart.bars[0].x > 500  # the last of ten slots
    assert stacked_bars("t", [], plain, days).empty
    assert stacked_bars("t", [("2026-11-01", "a", 0)], plain).empty
