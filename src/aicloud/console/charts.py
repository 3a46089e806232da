"""Stacked bar charts as plain geometry for an inline SVG: drawn on the server, so the
usage page needs no script, no chart library and nothing from a CDN."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from markupsafe import Markup, escape

# Okabe-Ito: told apart with the common colour-vision deficiencies
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#999999")
WIDTH, HEIGHT = 640, 220
LEFT, BOTTOM, TOP = 64, 24, 8  # room for the axis labels
MAX_SERIES = len(PALETTE) - 1  # the smallest others are drawn together as "other"


@dataclass(slots=True, frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    color: str
    title: str


@dataclass(slots=True, frozen=True)
class Label:
    x: float
    y: float
    text: str


@dataclass(slots=True, frozen=True)
class Chart:
    title: str
    bars: list[Bar]
    legend: list[tuple[str, str]]  # color, series
    x_labels: list[Label]
    y_labels: list[Label]
    width: int = WIDTH
    height: int = HEIGHT

    @property
    def empty(self) -> bool:
        return not self.bars

    def svg(self) -> Markup:
        """The drawing, written here rather than in the template: a month of bars is
        ~1,000 elements, and as template markup they cost most of the usage page's time
        (each attribute escaped). Only the titles are text; everything else is numbers."""
        base = self.height - BOTTOM
        parts = [f'<svg viewBox="0 0 {self.width} {self.height}" role="img" '
                 f'aria-label="{escape(self.title)}" preserveAspectRatio="xMidYMid meet">',
                 f'<line x1="{LEFT}" y1="{base}" x2="{self.width - 8}" y2="{base}" '
                 'class="axis"/>']
        parts += [f'<text x="{t.x}" y="{t.y}" text-anchor="end" class="tick">'
                  f'{escape(t.text)}</text>' for t in self.y_labels]
        parts += [f'<text x="{t.x}" y="{t.y}" text-anchor="middle" class="tick">'
                  f'{escape(t.text)}</text>' for t in self.x_labels]
        parts += [f'<rect x="{b.x}" y="{b.y}" width="{b.width}" height="{b.height}" '
                  f'fill="{b.color}"><title>{escape(b.title)}</title></rect>' for b in self.bars]
        parts.append("</svg>")
        return Markup("".join(parts))


def _series_order(points: list[tuple[str, str, float]]) -> list[str]:
    totals: dict[str, float] = defaultdict(float)
    for _, series, value in points:
        totals[series] += value
    ranked = sorted(totals, key=lambda s: (-totals[s], s))
    return ranked if len(ranked) <= MAX_SERIES + 1 else [*ranked[:MAX_SERIES], "other"]


def stacked_bars(title: str, points: list[tuple[str, str, float]],
                 show: Callable[[float], str], domain: list[str] | None = None) -> Chart:
    """`points`: (x, series, value), x sortable (days as YYYY-MM-DD). One bar per x, its
    series stacked largest first; `show` writes a value for the axis and tooltips.
    `domain`: every x to leave room for (the days of the period), data or not."""
    order = _series_order(points)
    kept = set(order)
    stacks: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for x, series, value in points:
        stacks[x][series if series in kept else "other"] += value
    xs = sorted(set(domain or ()) | set(stacks))
    top = max((sum(s.values()) for s in stacks.values()), default=0.0)
    if not stacks or top <= 0:
        return Chart(title, [], [], [], [])
    plot_w, plot_h = WIDTH - LEFT - 8, HEIGHT - BOTTOM - TOP
    slot = plot_w / len(xs)
    color = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(order)}
    bars = []
    for i, x in enumerate(xs):
        base = float(HEIGHT - BOTTOM)
        for series in order:
            value = stacks[x].get(series, 0.0) if x in stacks else 0.0
            if value <= 0:
                continue
            h = value / top * plot_h
            base -= h
            bars.append(Bar(round(LEFT + i * slot + slot * 0.1, 2), round(base, 2),
                            round(max(slot * 0.8, 1.0), 2), round(max(h, 0.5), 2),
                            color[series], f"{x} · {series}: {show(value)}"))
    every = max(1, len(xs) // 8)  # at most about eight dates under the axis
    x_labels = [Label(round(LEFT + (i + 0.5) * slot, 2), HEIGHT - 6, x[5:] if len(x) == 10
                      else x) for i, x in enumerate(xs) if i % every == 0]
    y_labels = [Label(LEFT - 6, round(HEIGHT - BOTTOM - f * plot_h + 4, 2), show(top * f))
                for f in (0.0, 0.5, 1.0)]
    return Chart(title, bars, [(color[s], s) for s in order], x_labels, y_labels)
