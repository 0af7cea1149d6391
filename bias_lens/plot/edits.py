"""Figures of the edit stage: the bias / retention trade-off of every edit row and the
per-profession before/after view of the chosen edit (figures only; never shown or written here).

Both show the pronoun mass ``p(he) + p(she)`` beside the gap: on SmolLM2 the mass after a
profession prompt is ~0.4, so raw AFGB can fall just by lowering both pronouns. The trade-off
plot therefore uses the renormalised AFGB (``afgb_renorm``) when every row has it and colours
each point by its pronoun mass (``mass``) when every row has that.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .layout import labelled_points, padded, titled

BEFORE, AFTER = "#6c7a89", "#d1495b"


def _per_profession(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """profession -> (mean p_he - p_she, mean p_he + p_she)."""
    acc: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        acc[r["profession"]].append((r["p_he"] - r["p_she"], r["p_he"] + r["p_she"]))
    return {p: (sum(g for g, _ in v) / len(v), sum(m for _, m in v) / len(v)) for p, v in acc.items()}


def profession_before_after(before: list[dict], after: list[dict], label: str, k: int = 20) -> go.Figure:
    """Per profession, before vs after ``label``: mean p(he) - p(she) (top) and mean p(he) + p(she) (bottom).

    ``before``/``after`` are per-prompt details with ``profession``, ``p_he``, ``p_she``; the ``k``
    professions whose gap changed most are shown, largest change first.
    """
    b, a = _per_profession(before), _per_profession(after)
    common = sorted(set(b) & set(a), key=lambda p: (-abs(a[p][0] - b[p][0]), p))[:k]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.6, 0.4])
    for name, src, colour in (("original", b, BEFORE), (label, a, AFTER)):
        fig.add_trace(go.Bar(name=name, x=common, y=[src[p][0] for p in common], marker_color=colour,
                             legendgroup=name), row=1, col=1)
        fig.add_trace(go.Bar(name=name, x=common, y=[src[p][1] for p in common], marker_color=colour,
                             legendgroup=name, showlegend=False), row=2, col=1)
    fig.update_layout(barmode="group", legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom"})
    fig.update_yaxes(title_text="p(he) - p(she)", row=1, col=1)
    fig.update_yaxes(title_text="p(he) + p(she)", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(tickangle=-45, row=2, col=1)
    return titled(fig, "Gender gap and pronoun mass per profession, before vs after the edit",
                  f"edit: {label}; GenBiasEval test, the {len(common)} professions whose gap changed most. "
                  "A gap that shrinks while the mass also falls lowered both pronouns rather than balancing them.",
                  height=760)


def _metric(org: dict[str, Any], rows: list[dict[str, Any]], key: str) -> bool:
    return key in org and all(key in r["metrics"] for r in rows)


def edits_tradeoff(org: dict[str, float], rows: list[dict[str, Any]]) -> go.Figure:
    """Bias vs retention perplexity of the original model and every edit row (labels never overlap).

    y is ``afgb_renorm`` when the original and every row have it (else raw ``afgb``); marker colour
    is the pronoun mass ``mass`` when all rows have it (the original's too, if recorded).
    """
    ykey = "afgb_renorm" if _metric(org, rows, "afgb_renorm") else "afgb"
    with_mass = all("mass" in r["metrics"] for r in rows) and bool(rows)
    names = ["Org"] + [r["name"] for r in rows]
    mets = [org] + [r["metrics"] for r in rows]
    x = [float(m["perplexity"]) for m in mets]
    y = [float(m[ykey]) for m in mets]
    hover = [f"{n}<br>perplexity {m['perplexity']:.3f}<br>{ykey} {m[ykey]:.4f}"
             + (f"<br>pronoun mass {m['mass']:.3f}" if "mass" in m else "") for n, m in zip(names, mets)]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x[:1], y=y[:1], mode="markers", name="original", hovertext=hover[:1], hoverinfo="text",
                             marker={"size": 15, "symbol": "star", "color": "#222"}))
    marker: dict[str, Any] = {"size": 10, "line": {"width": 1, "color": "#333"}}
    if with_mass:
        lo = min(float(m["mass"]) for m in mets if "mass" in m)
        hi = max(float(m["mass"]) for m in mets if "mass" in m)
        marker.update(color=[float(m["metrics"]["mass"]) for m in rows], colorscale="Viridis", cmin=lo, cmax=hi,
                      colorbar={"title": {"text": "pronoun mass p(he)+p(she)", "side": "right"}, "thickness": 14, "x": 1.02})
        if "mass" in org:
            fig.data[0].marker.update(color=[float(org["mass"])], colorscale="Viridis", cmin=lo, cmax=hi,
                                      line={"width": 1.5, "color": "#222"})
    fig.add_trace(go.Scatter(x=x[1:], y=y[1:], mode="markers", name="edits", hovertext=hover[1:], hoverinfo="text",
                             marker=marker))
    what = "renormalised AFGB |p(he) - p(she)| / (p(he) + p(she))" if ykey == "afgb_renorm" else "AFGB |p(he) - p(she)|"
    note = "colour: pronoun mass" if with_mass else "pronoun mass not recorded for these rows"
    fig.update_layout(showlegend=False, xaxis_title="retention perplexity (lower is better)", yaxis_title=what,
                      margin={"r": 130 if with_mass else 40})
    titled(fig, "Bias vs retention per edit (GenBiasEval test)",
           f"y: {what}; {note}; lower-left is better", height=620)
    labelled_points(fig, x, y, names, padded(x), padded(y))
    return fig
