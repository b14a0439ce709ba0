"""Charts as inline SVG, drawn on the server: no script, no external file, so a page works
air-gapped and under a strict Content-Security-Policy. Each bar carries a ``<title>``, which
browsers show on hover; colours are classes styled by dashboard.css. A chart scales with the
page's width down to a phone's, where it keeps a readable size and scrolls sideways
(``chart-box``).

    bars([Bar("research", 42.5, limit=50)], unit="USD")     # horizontal, with budget lines
    columns([("11-02", 3.1), ("11-03", 0.4)], unit="USD")   # a series over days
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH = 640
ROW = 26
LABEL = 150
RIGHT = 40
"""Room right of a scale for its last tick's label, centred on the scale's end."""
NEAR = 0.8
"""Share of its limit from which a bar is drawn as near it."""


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    limit: float | None = None
    """A budget: drawn as a line across the bar; the bar turns amber near it, red past it."""

    @property
    def tone(self) -> str:
        if self.limit is None or self.limit <= 0:
            return "bar" if self.limit is None or self.value <= 0 else "bar over"
        share = self.value / self.limit
        return "bar over" if share >= 1 else "bar near" if share >= NEAR else "bar"


def amount(value: float) -> str:
    """Money: cents from a dollar up; below, enough decimals for two significant digits
    (a job costs fractions of a cent)."""
    if value == 0 or abs(value) >= 1:
        return f"{value:,.2f}"
    places = max(4, 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{places}f}"


def number(value: float, unit: str) -> str:
    """``value`` as a person reads it in ``unit``."""
    if unit == "USD":
        return "$" + amount(value)
    if float(value).is_integer():
        return f"{int(value):,} {unit}"
    return f"{value:,.2f} {unit}"


def bars(items: Sequence[Bar], *, unit: str, label: str) -> Markup:
    """One horizontal bar per item, on a shared scale whose axis is labelled ``unit``."""
    if not items:
        return Markup('<p class="empty">Nothing yet this period.</p>')
    ticks = _scale(max(max(b.value, b.limit or 0) for b in items), whole=unit != "USD")
    top = ticks[-1]
    span = WIDTH - LABEL - RIGHT
    height = ROW * len(items) + 56
    parts = [_open(WIDTH, height, label)]
    for i, b in enumerate(items):
        y = 10 + i * ROW
        # A value too small for the scale still shows as a sliver, not as nothing.
        w = max(span * b.value / top, 2.0 if b.value > 0 else 0.0)
        tip = number(b.value, unit) + (
            f" of {number(b.limit, unit)} ({b.value / b.limit:.0%})" if b.limit else ""
        )
        parts.append(
            f'<text class="label" x="{LABEL - 6}" y="{y + 15}" text-anchor="end">'
            f"{escape(b.label)}</text>"
            f'<rect class="{b.tone}" x="{LABEL}" y="{y + 3}" width="{w:.1f}" height="{ROW - 8}">'
            f"<title>{escape(b.label)}: {escape(tip)}</title></rect>"
        )
        if b.limit is not None:
            x = LABEL + span * b.limit / top
            parts.append(
                f'<line class="limit" x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + ROW - 2}">'
                f"<title>{escape(b.label)} budget: {escape(number(b.limit, unit))}</title></line>"
            )
    axis_y = 10 + ROW * len(items) + 4
    parts.append(_x_axis(LABEL, span, axis_y, ticks, unit))
    parts.append(_CLOSE)
    return Markup("".join(parts))


def columns(points: Sequence[tuple[str, float]], *, unit: str, label: str) -> Markup:
    """One column per point (a day), oldest first, on a y axis labelled ``unit`` drawn on the
    right, beside the newest: where a phone's narrow screen opens the chart."""
    if not points:
        return Markup('<p class="empty">Nothing yet this period.</p>')
    left, right, bottom, plot_h, head = 10, WIDTH - 80, 30, 180, 24
    height = plot_h + bottom + head
    ticks = _scale(max(v for _, v in points), whole=unit != "USD")
    top = ticks[-1]
    step = (right - left) / len(points)
    parts = [_open(WIDTH, height, label, "chart-box days")]
    for tick in ticks:
        y = head + plot_h - plot_h * tick / top
        parts.append(
            f'<line class="grid" x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{right + 6}" y="{y + 4:.1f}">'
            f"{escape(_short(tick, unit))}</text>"
        )
    parts.append(f'<text class="unit" x="{right + 6}" y="12">{escape(unit)}</text>')
    every = max(1, math.ceil(len(points) / 10))
    for i, (name, value) in enumerate(points):
        h = plot_h * value / top
        x = left + i * step
        parts.append(
            f'<rect class="bar" x="{x + 1:.1f}" y="{head + plot_h - h:.1f}" '
            f'width="{max(step - 2, 1):.1f}" height="{h:.1f}">'
            f"<title>{escape(name)}: {escape(number(value, unit))}</title></rect>"
        )
        if (len(points) - 1 - i) % every == 0:  # the newest day always named
            parts.append(
                f'<text class="tick" x="{x + step / 2:.1f}" y="{height - 8}" '
                f'text-anchor="middle">{escape(name)}</text>'
            )
    parts.append(_CLOSE)
    return Markup("".join(parts))


def _open(width: int, height: int, label: str, box: str = "chart-box") -> str:
    return (
        f'<div class="{box}"><svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}" preserveAspectRatio="xMinYMin meet">'
    )


_CLOSE = "</svg></div>"


def _x_axis(left: float, span: float, y: float, ticks: list[float], unit: str) -> str:
    parts = [f'<line class="axis" x1="{left}" x2="{left + span}" y1="{y}" y2="{y}"/>']
    for tick in ticks:
        x = left + span * tick / ticks[-1]
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{y + 16}" text-anchor="middle">'
            f"{escape(_short(tick, unit))}</text>"
        )
    parts.append(
        f'<text class="unit" x="{left + span / 2:.1f}" y="{y + 34}" text-anchor="middle">'
        f"{escape(unit)}</text>"
    )
    return "".join(parts)


def _scale(value: float, *, whole: bool) -> list[float]:
    """The ticks of a scale from 0 to a round top at or above ``value``: at most four steps of
    1, 2, 2.5 or 5 times a power of ten, and whole ones for whole units (jobs, tokens: no
    tick reads 1.25 jobs)."""
    if value <= 0:
        return [0.0, 1.0] if whole else [0.0, 0.25, 0.5, 0.75, 1.0]
    quarter = value / 4
    magnitude = 10.0 ** math.floor(math.log10(quarter))
    step = 10 * magnitude
    for factor in (1, 2, 2.5, 5):
        candidate = factor * magnitude
        if candidate >= quarter and (not whole or (candidate >= 1 and candidate.is_integer())):
            step = candidate
            break
    step = max(step, 1.0) if whole else step
    return [float(f"{step * i:.12g}") for i in range(math.ceil(value / step - 1e-9) + 1)]


def _short(value: float, unit: str) -> str:
    if unit == "USD":
        return amount(value)
    return f"{value:,.0f}" if value >= 10 or value == 0 else f"{value:.2g}"
