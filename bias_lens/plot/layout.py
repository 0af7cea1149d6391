"""Layout shared by every figure: titles that fit the canvas and point labels that do not overlap.

Text width is estimated as :data:`CHAR_W` x font size per character (a slightly generous
average for plotly's default sans-serif), the same estimate ``tests/test_figures_layout.py``
checks against. :func:`titled` wraps the main title at word boundaries to the plot width and puts
the method variant in ``title.subtitle`` (plotly >= 6), growing the top margin to hold every line.
:func:`place_labels` puts each point's label at the first candidate offset (rings of growing
radius around the point, joined by a thin leader line) whose box stays on the canvas and clears
every marker and every label placed before it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import plotly.graph_objects as go

CHAR_W = 0.6  # estimated glyph width / font size
TITLE_SIZE = 16
SUBTITLE_SIZE = 12
LABEL_SIZE = 11
LINE = 1.3  # line height / font size
WIDTH, HEIGHT = 900, 560  # default canvas (also of the PNG export, before its scale factor)
MARGIN = {"l": 80, "r": 40, "b": 70}


def text_width(text: str, size: float) -> float:
    """Estimated pixel width of one line of plotly text (tags such as ``<b>`` do not count)."""
    return CHAR_W * size * len(re.sub(r"<[^>]+>", "", text))


def wrap(text: str, size: float, width: float) -> list[str]:
    """Greedy word wrap of ``text`` into lines of at most ``width`` px at font ``size``."""
    room = max(1, int(width // (CHAR_W * size)))
    lines: list[str] = []
    for word in text.split():
        while len(word) > room:  # a single over-long token is cut (never happens for our titles)
            lines.append(word[:room])
            word = word[room:]
        if lines and len(lines[-1]) + 1 + len(word) <= room:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def titled(fig: go.Figure, title: str, subtitle: str | None = None, *, width: int | None = None,
           height: int | None = None) -> go.Figure:
    """Set a wrapped title (and subtitle) that fits ``width`` minus the margins; fixes the canvas size."""
    W = int(width or fig.layout.width or WIDTH)
    H = int(height or fig.layout.height or HEIGHT)
    m = {**MARGIN, **{k: v for k, v in (fig.layout.margin.to_plotly_json() or {}).items() if k in ("l", "r", "b")}}
    room = W - m["l"] - m["r"]
    head = wrap(title, TITLE_SIZE, room)
    sub = wrap(subtitle, SUBTITLE_SIZE, room) if subtitle else []
    # 12 px above the title, plotly's ~8 px between title and subtitle, then room for a top legend
    # row or subplot titles (~30 px) before the plot area starts
    top = 12 + LINE * (TITLE_SIZE * len(head) + SUBTITLE_SIZE * len(sub)) + (8 if sub else 0) + 34
    t = {"text": "<br>".join(head), "font": {"size": TITLE_SIZE}, "x": 0, "xref": "paper", "xanchor": "left",
         "y": 1 - 12 / H, "yref": "container", "yanchor": "top"}
    if sub:
        t["subtitle"] = {"text": "<br>".join(sub), "font": {"size": SUBTITLE_SIZE}}
    fig.update_layout(title=t, width=W, height=H, margin={**m, "t": int(math.ceil(top))})
    return fig


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _candidates() -> list[tuple[float, float]]:
    dirs = [(0, -1), (1, 0), (-1, 0), (0, 1), (1, -1), (-1, -1), (1, 1), (-1, 1)]  # up, right, left, down, diagonals
    out = []
    for r in (16, 28, 44, 62, 84, 110, 140, 175):
        for dx, dy in dirs:
            s = 1 / math.sqrt(2) if dx and dy else 1.0
            out.append((dx * r * s, dy * r * s))
    return out


def place_labels(
    px: Sequence[float], py: Sequence[float], texts: Sequence[str], *, bounds: tuple[float, float, float, float],
    marker: float = 7.0, size: int = LABEL_SIZE,
) -> list[tuple[float, float]]:
    """Offsets ``(ax, ay)`` in pixels (y downwards) of each label from its point (points in pixel coords).

    Boxes are estimated with one character of padding; every label keeps clear of all markers
    (radius ``marker``), of the labels placed before it and stays inside ``bounds``
    ``(left, top, right, bottom)`` (the plot area: off the axes, legend and colour bar). Labels are
    placed longest first (they have the fewest free spots). If no candidate fits, the one with
    the least overlap is used (the layout test would then fail loudly rather than hide it).
    """
    left, top, right, bottom = bounds
    pts = [(x - marker, y - marker, x + marker, y + marker) for x, y in zip(px, py)]
    boxes: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(texts)
    for i in sorted(range(len(texts)), key=lambda i: -len(texts[i])):
        w = text_width(texts[i], size) + CHAR_W * size
        h = LINE * size + 4
        best, best_bad = None, math.inf
        for ax, ay in _candidates():
            cx, cy = px[i] + ax, py[i] + ay
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            bad = sum(_overlap(box, b) for b in boxes + pts)
            bad += 100 * (box[0] < left or box[1] < top or box[2] > right or box[3] > bottom)
            if bad < best_bad:
                best, best_bad = ((ax, ay), box), bad
            if bad == 0:
                break
        assert best is not None
        out[i] = best[0]
        boxes.append(best[1])
    return out


def labelled_points(fig: go.Figure, x: Sequence[float], y: Sequence[float], texts: Sequence[str],
                    x_range: tuple[float, float], y_range: tuple[float, float], *, size: int = LABEL_SIZE) -> None:
    """Add non-overlapping annotations for data points of a figure whose canvas and axis ranges are fixed.

    Call after :func:`titled` (which fixes width, height and margins). Sets the axis ranges and
    turns margin auto-expansion off, so the pixel geometry used here is the one plotly draws.
    """
    L = fig.layout
    W, H, m = L.width, L.height, L.margin
    pw, ph = W - m.l - m.r, H - m.t - m.b
    (x0, x1), (y0, y1) = x_range, y_range
    px = [m.l + (v - x0) / (x1 - x0) * pw for v in x]
    py = [m.t + (1 - (v - y0) / (y1 - y0)) * ph for v in y]
    offs = place_labels(px, py, texts, bounds=(m.l, m.t, W - m.r, H - m.b), size=size)
    for xv, yv, t, (ax, ay) in zip(x, y, texts, offs):
        fig.add_annotation(x=xv, y=yv, xref="x", yref="y", text=t, ax=ax, ay=ay, axref="pixel", ayref="pixel",
                           showarrow=True, arrowhead=0, arrowwidth=0.8, arrowcolor="#888", standoff=3,
                           font={"size": size}, xanchor="center", yanchor="middle")
    fig.update_layout(xaxis={"range": list(x_range), "autorange": False}, yaxis={"range": list(y_range), "autorange": False},
                      margin={"autoexpand": False})


def padded(values: Sequence[float], frac: float = 0.1) -> tuple[float, float]:
    """``(min, max)`` widened by ``frac`` of the span on each side (a unit span if all values are equal)."""
    lo, hi = min(values), max(values)
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - frac * span, hi + frac * span

