"""Layered-network plotly figure of a traced circuit (x = layer, one column per layer)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import plotly.graph_objects as go

from .layout import labelled_points, padded, titled


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


#: x offset of each node kind inside its layer (attention before the MLP); embed / bias sit left of layer 0
_X_OFFSET = {"attn-value": -0.3, "head": -0.1, "ffn-query": 0.25, "ffn-value": 0.25, "embed": 0.0, "bias": 0.3}
_SYMBOL = {"ffn-value": "circle", "ffn-query": "circle-open", "head": "diamond", "attn-value": "triangle-right",
           "embed": "square", "bias": "x"}


def _position_xy(nodes: list[dict]) -> dict[str, tuple[float, float]]:
    """(x, y) of every node id: x = layer + kind offset, y = position, spread inside a (column, position) cell."""
    cells: dict[tuple[float, int], list[str]] = defaultdict(list)
    for n in nodes:
        x = (n["layer"] if n["layer"] >= 0 else -1) + _X_OFFSET.get(n["kind"], 0.0)
        cells[(x, n["position"])].append(n["id"])
    xy = {}
    for (x, p), ids in cells.items():
        for i, nid in enumerate(sorted(ids)):
            xy[nid] = (x, p + (i - (len(ids) - 1) / 2) * min(0.2, 0.8 / len(ids)))
    return xy


def _node_hover(n: dict) -> str:
    lines = [f"<b>{n['id']}</b> ({n['kind']})", f"position {n['position']}: {n['token']!r}",
             f"value={n['value']:+.4g}  score={n['score']:+.4g}"]
    if "activation" in n:
        lines.append(f"activation={n['activation']:+.4g}")
    if "attention" in n:
        lines.append(f"attention {n['dest']}->{n['position']}: {n['attention']:.4g}")
    if "rest" in n:
        lines.append(f"rest (not drawn)={n['rest']:+.4g}")
    if n.get("top"):
        lines.append("top: " + ", ".join(repr(t) for t in n["top"]))
        lines.append("bottom: " + ", ".join(repr(t) for t in n.get("bottom", [])))
    return "<br>".join(lines)


def circuit_positions_figure(graph: Any, *, title: str | None = None, n_labels: int = 12) -> go.Figure:
    """A :class:`bias_lens.locate.circuit_positions.PositionGraph` (or its ``to_dict()``) as a layered graph:
    x = layer (inside a layer: value neurons, heads, then FFN neurons), y = token position; edge colour by
    sign (red raises the target's coefficient), width by |weight|; hover for each unit's top tokens and scores.

    One line trace per edge (``name`` = ``"source -> target"``), then one marker trace per node kind
    (``customdata`` = node ids). The roots and the ``n_labels`` FFN neurons / heads of largest |score| are
    labelled on the canvas; every node is on hover.
    """
    data = graph.to_dict() if hasattr(graph, "to_dict") else dict(graph)
    nodes, edges = data["nodes"], data["edges"]
    xy = _position_xy(nodes)
    wmax = max((abs(e["weight"]) for e in edges), default=1.0) or 1.0
    fig = go.Figure()
    for e in edges:
        (x0, y0), (x1, y1) = xy[e["source"]], xy[e["target"]]
        fig.add_trace(go.Scatter(
            x=[x0, x1], y=[y0, y1], mode="lines", name=f"{e['source']} -> {e['target']}", showlegend=False,
            hoverinfo="text", text=f"{e['source']} -> {e['target']}: {e['weight']:+.4g} (share "
                 + (f"{e['share']:+.3g})" if e.get("share") is not None else "n/a)"),
            line={"width": 0.5 + 6 * abs(e["weight"]) / wmax, "color": "#c0392b" if e["weight"] > 0 else "#2471a3"},
        ))
    roots = set(data.get("roots") or [data["root"]])
    for kind in [k for k in _SYMBOL if any(n["kind"] == k for n in nodes)]:
        ns = [n for n in nodes if n["kind"] == kind]
        fig.add_trace(go.Scatter(
            x=[xy[n["id"]][0] for n in ns], y=[xy[n["id"]][1] for n in ns], mode="markers", name=kind,
            customdata=[n["id"] for n in ns], hoverinfo="text", hovertext=[_node_hover(n) for n in ns],
            marker={"size": [18 if n["id"] in roots else 11 for n in ns], "symbol": _SYMBOL[kind], "color": "#333"},
        ))
    n_pos = len(data["tokens"][0]) if data.get("tokens") else 1 + max(n["position"] for n in nodes)
    ticks = [f"{p}: {'/'.join(dict.fromkeys(t[p] for t in data['tokens']))!r}" if data.get("tokens") else str(p)
             for p in range(n_pos)]
    fig.update_layout(xaxis={"title": "layer (left of 0: embedding / biases)", "dtick": 1, "showgrid": False},
                      yaxis={"title": "token position", "tickvals": list(range(n_pos)), "ticktext": ticks},
                      plot_bgcolor="white", legend={"orientation": "h", "x": 0, "y": 1.0, "yanchor": "bottom"},
                      margin={"l": 140})
    sub = f"{data.get('variant', '')}; {data.get('model', '')}; edge colour: red raises the target, blue lowers it"
    titled(fig, title or f"Circuit across positions into {', '.join(sorted(roots))}", sub, width=1100,
           height=max(480, 200 + 110 * n_pos))
    ranked = sorted((n for n in nodes if n["kind"] not in ("attn-value", "embed", "bias") and n["id"] not in roots),
                    key=lambda n: -abs(n["score"]))
    shown = [n for n in nodes if n["id"] in roots] + ranked[:n_labels]
    xs = [x for x, _ in xy.values()]
    labelled_points(fig, [xy[n["id"]][0] for n in shown], [xy[n["id"]][1] for n in shown], [n["label"] for n in shown],
                    padded(xs + [min(xs) - 0.5, max(xs) + 0.5]), (n_pos - 0.4, -0.6))  # position 0 at the top
    return fig
