"""Small SVG plots written by hand (no plotting dependency): line plots and TokenFlow's keyframe chart.

Each function returns one self-contained <svg> element as a string, to be inlined in HTML.
"""
from __future__ import annotations

import math
from html import escape

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
WIDTH, HEIGHT = 480, 260
LEFT, RIGHT, TOP, BOTTOM = 72, 12, 24, 40


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str) -> str:
    """One line per entry of `series` (label -> [(x, y), …]), linear axes fitted to the data, a legend."""
    points = [p for line in series.values() for p in line if math.isfinite(p[1])]
    if not points:
        raise ValueError("line_plot needs at least one finite point")
    x0, x1 = _range([x for x, _ in points])
    y0, y1 = _range([y for _, y in points])
    px = lambda x: LEFT + (x - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)
    py = lambda y: HEIGHT - BOTTOM - (y - y0) / (y1 - y0) * (HEIGHT - TOP - BOTTOM)
    legend = 14 * len(series) if len(series) > 1 else 0  # one line per series, under the plot
    parts = [f'<svg width="{WIDTH}" height="{HEIGHT + legend}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT + legend}" role="img" aria-label="{escape(title)}" font-family="sans-serif" '
             'font-size="11">',
             f'<text x="{WIDTH / 2}" y="14" text-anchor="middle" font-size="12">{escape(title)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
             'fill="none" stroke="#999"/>']
    for value, label in ((x0, _tick(x0, x1 - x0)), (x1, _tick(x1, x1 - x0))):
        parts.append(f'<text x="{px(value):.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle">{label}</text>')
    for value in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{LEFT - 4}" y="{py(value) + 4:.1f}" text-anchor="end">{_tick(value, (y1 - y0) / 2)}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{(TOP + HEIGHT - BOTTOM) / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {(TOP + HEIGHT - BOTTOM) / 2})">{escape(y_label)}</text>')
    for i, (label, line) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line if math.isfinite(y))
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        if len(line) == 1:
            parts.append(f'<circle cx="{px(line[0][0]):.1f}" cy="{py(line[0][1]):.1f}" r="2.5" fill="{colour}"/>')
        if legend:
            y = HEIGHT + 4 + 14 * i
            parts.append(f'<line x1="{LEFT}" y1="{y - 4}" x2="{LEFT + 20}" y2="{y - 4}" stroke="{colour}" '
                         f'stroke-width="2"/><text x="{LEFT + 26}" y="{y}">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def keyframe_chart(keyframes: dict[int, list[int]], frames: int, batches: list[range]) -> str:
    """TokenFlow's keyframes: one row per denoising step, one column per frame; a keyframe is a filled square,
    batch boundaries are lines."""
    steps = sorted(keyframes)
    cell = max(4, min(16, 440 // max(frames, 1)))
    left, top = 44, 20
    width, height = max(left + frames * cell + 8, 320), top + len(steps) * cell + 24
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="keyframes per step" font-family="sans-serif" '
             'font-size="10">',
             f'<text x="{left}" y="12">frame 0 … {frames - 1} →</text>']
    for row, step in enumerate(steps):
        y = top + row * cell
        if row % max(1, len(steps) // 10) == 0:
            parts.append(f'<text x="{left - 4}" y="{y + cell - 2}" text-anchor="end">{step}</text>')
        for f in keyframes[step]:
            parts.append(f'<rect x="{left + f * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" fill="#d62728"/>')
    bottom = top + len(steps) * cell
    parts.append(f'<rect x="{left}" y="{top}" width="{frames * cell}" height="{bottom - top}" fill="none" stroke="#999"/>')
    for r in batches[1:]:
        x = left + r.start * cell - 0.5
        parts.append(f'<line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="#555"/>')
    parts.append(f'<text x="{left}" y="{bottom + 14}">rows: denoising step (top: first); red: the keyframe of '
                 f'its batch</text>')
    parts.append("</svg>")
    return "".join(parts)


def _range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-12:
        pad = abs(low) * 0.05 or 1.0
        return low - pad, high + pad
    return low, high


def _tick(value: float, span: float = 1.0) -> str:
    """Enough significant digits to tell ticks `span` apart."""
    digits = max(3, 2 + math.ceil(math.log10(max(abs(value), 1e-12) / max(span, 1e-12))))
    return f"{value:.{min(digits, 8)}g}"
