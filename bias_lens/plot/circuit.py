"""Layered-network plotly figure of a traced circuit (x = layer, one column per layer)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import plotly.graph_objects as go

from .layout import labelled_points, titled


def circuit_figure(graph: Any, *, title: str | None = None) -> go.Figure:
    """Nodes placed by layer (``embed``/``bias`` at the left), edges coloured by sign, width by |weight|.

    ``graph`` is a :class:`bias_lens.locate.circuit.CircuitGraph` or its ``to_dict()``. Node
    labels are annotations placed by :func:`.layout.labelled_points`, so they never overlap.
    """
    data = graph.to_dict() if hasattr(graph, "to_dict") else dict(graph)
    cols: dict[int, list[str]] = defaultdict(list)
    for n in data["nodes"]:
        cols[n["layer"]].append(n["label"])
    pos = {}
    for layer, labels in cols.items():
        for i, lab in enumerate(sorted(labels)):
            pos[lab] = (layer, i - (len(labels) - 1) / 2)
    wmax = max((abs(e["weight"]) for e in data["edges"]), default=1.0) or 1.0
    fig = go.Figure()
    for e in data["edges"]:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        fig.add_trace(go.Scatter(
            x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text", showlegend=False,
            text=f"{e['source']} -> {e['target']}: {e['weight']:+.4g}",
            line={"width": 0.5 + 6 * abs(e["weight"]) / wmax, "color": "#c0392b" if e["weight"] > 0 else "#2471a3"},
        ))
    kinds = {"neuron": "circle", "head": "diamond", "embed": "square", "bias": "x"}
    nodes = data["nodes"]
    xs = [pos[n["label"]][0] for n in nodes]
    ys = [pos[n["label"]][1] for n in nodes]
    fig.add_trace(go.Scatter(
        x=xs, y=ys, mode="markers", showlegend=False, hoverinfo="text", text=[n["label"] for n in nodes],
        marker={"size": [18 if n["label"] == data["root"] else 11 for n in nodes],
                "symbol": [kinds.get(n["kind"], "circle") for n in nodes], "color": "#333"},
        hovertext=[f"{n['label']} ({n['kind']})" + (f" input={n['value']:.4g}" if "value" in n else "") for n in nodes],
    ))
    fig.update_layout(xaxis={"title": "layer (-1 = embedding / biases)", "dtick": 1, "showgrid": False},
                      yaxis={"visible": False}, plot_bgcolor="white")
    titled(fig, title or f"Circuit into {data['root']}",
           "edge colour: red raises the target's input, blue lowers it; width: |weight|; hover for values")
    span_y = max(1.0, max(ys) - min(ys))
    labelled_points(fig, xs, ys, [n["label"] for n in nodes], (min(xs) - 0.7, max(xs) + 0.7),
                    (min(ys) - 0.25 * span_y, max(ys) + 0.25 * span_y))
    return fig
