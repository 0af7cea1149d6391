"""Figures of local contrastive editing (docs/contrastive.md): the alpha sweep and where the
references' masks differ (figures only; never shown or written here).

The sweep puts the pronoun mass and the perplexity under the renormalised gap: an alpha that
"removes" bias by erasing both pronouns or by breaking the model shows up in the lower panels.
Located edits are solid, their random controls (the same number of entries per matrix) dashed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .layout import titled

PANELS = (("afgb_renorm", "AFGB-r (dev)"), ("mass", "p(he) + p(she) (dev)"), ("perplexity", "perplexity (dev)"))
COLOURS = ("#d1495b", "#00798c", "#edae49", "#66a182", "#2e4057", "#8d96a3")


def alpha_sweep(rows: list[dict[str, Any]], base: dict[str, float], *, title_note: str = "",
                panels: tuple[tuple[str, str], ...] = PANELS) -> go.Figure:
    """Renormalised gap, pronoun mass and perplexity against alpha, one line per series.

    ``rows``: dicts with ``series`` (e.g. ``"mask_diff"``), ``control`` (bool), ``alpha`` and the
    ``panels`` keys (default :data:`PANELS`); ``base``: the unedited model's values of those keys
    (dotted lines)."""
    groups: dict[tuple[str, bool], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["series"], bool(r.get("control", False)))].append(r)
    series = sorted({s for s, _ in groups})
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.05)
    for (name, control), pts in sorted(groups.items()):
        pts = sorted(pts, key=lambda r: r["alpha"])
        colour = COLOURS[series.index(name) % len(COLOURS)]
        label = f"{name} (random control)" if control else name
        for i, (key, _) in enumerate(panels, start=1):
            fig.add_trace(go.Scatter(x=[r["alpha"] for r in pts], y=[r[key] for r in pts], name=label, legendgroup=label,
                                     showlegend=i == 1, mode="lines+markers",
                                     line={"color": colour, "dash": "dash" if control else "solid"}), row=i, col=1)
    for i, (key, axis) in enumerate(panels, start=1):
        if key in base:
            fig.add_hline(y=base[key], line={"color": "#6c7a89", "dash": "dot"}, row=i, col=1)
        fig.update_yaxes(title_text=axis, row=i, col=1, **({"type": "log"} if key == "perplexity" else {}))
    fig.update_xaxes(title_text="alpha (theta + alpha (w_anti - w_stereo))", row=len(panels), col=1)
    # legend under the x axis: 3 series x located / control wrap to two rows, which a top legend row would
    # push into the subtitle
    fig.update_layout(legend={"orientation": "h", "x": 0, "y": -0.35 / len(panels), "yanchor": "top"},
                      margin={"b": 150})
    sub = "Dotted: the unedited model. Dashed: the same number of random entries per matrix, edited the same way."
    names = ", ".join(label.split(" (")[0] for _, label in panels)
    return titled(fig, f"Local contrastive editing against alpha: {names}", f"{sub} {title_note}".strip(),
                  height=380 + 180 * len(panels))


def mask_difference(fractions: dict[tuple[int, str], float], *, model: str = "") -> go.Figure:
    """Heatmap of the share of entries whose IMP masks differ, per block (x) and matrix kind (y).

    ``fractions``: ``(layer, kind) -> share`` (kind e.g. ``attn.q`` ... ``mlp.down``)."""
    layers = sorted({layer for layer, _ in fractions})
    kinds = sorted({k for _, k in fractions})
    z = [[100 * fractions.get((layer, k), 0.0) for layer in layers] for k in kinds]
    fig = go.Figure(go.Heatmap(x=layers, y=kinds, z=z, colorscale="Reds", colorbar={"title": "% differ"},
                               hovertemplate="L%{x} %{y}: %{z:.3f}%<extra></extra>"))
    fig.update_xaxes(title_text="block")
    total = sum(fractions.values()) / max(len(fractions), 1)
    return titled(fig, "Where the stereotypical and anti-stereotypical subnetworks differ",
                  f"share of entries kept by one IMP mask and pruned by the other; {model} (mean over matrices "
                  f"{100 * total:.3f}%)", height=420)
