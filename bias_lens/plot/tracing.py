"""Plotly heatmaps of bias tracing (:mod:`bias_lens.locate.tracing`): token position x layer.

As in ROME's and BiasEdit's figures, rows are the item's tokens (corrupted subject tokens marked
``*``, the attribute term, where the two sentences differ, shown as ``anti/stereo`` in brackets)
and columns the restored layer (the window's centre for MLP / attention).
"""

from __future__ import annotations

import plotly.graph_objects as go

from ..locate.tracing import TraceResult
from .layout import titled

_NAMES = {"resid": "hidden state", "mlp": "MLP output", "attn": "attention output"}
_SCALES = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}


def _component(result: TraceResult, component: str) -> int:
    if component not in result.components:
        raise ValueError(f"component {component!r} was not traced; traced: {', '.join(result.components)}")
    return result.components.index(component)


def token_labels(tokens: list[str], corrupted: list[int], attr: list[int]) -> list[str]:
    """``"3: she*"``-style labels, unique per position so plotly never merges repeated tokens."""
    out = []
    for i, t in enumerate(tokens):
        t = repr(t)[1:-1] if t.strip() else repr(t)
        if i in attr:
            t = f"[{t}]"
        out.append(f"{i}: {t}{'*' if i in corrupted else ''}")
    return out


def trace_heatmap(result: TraceResult, item: int = 0, component: str = "resid", *, value: str = "recovery",
                  title: str | None = None) -> go.Figure:
    """One item's ``restored`` gap or ``recovery`` for one component, token position x layer."""
    if value not in ("recovery", "restored"):
        raise ValueError(f"value must be 'recovery' or 'restored', got {value!r}")
    if not 0 <= item < len(result.items):
        raise ValueError(f"item must be in 0..{len(result.items) - 1}, got {item}")
    c = _component(result, component)
    it = result.items[item]
    z = (it.recovery if value == "recovery" else it.restored)[c].T  # [pos, layer]
    labels = token_labels(it.tokens, it.corrupted_positions, it.attr_positions)
    fig = go.Figure(go.Heatmap(
        z=[[None if v != v else v for v in row] for row in z.tolist()], x=list(range(result.n_layers)), y=labels,
        colorscale=_SCALES[component], colorbar={"title": "recovery" if value == "recovery" else "gap"},
        hovertemplate="layer %{x}<br>%{y}<br>%{z:.4f}<extra></extra>",
    ))
    what = _NAMES[component]
    xlab = "restored layer" if component == "resid" else f"centre of {result.window} restored layers"
    fig.update_layout(xaxis_title=xlab, yaxis={"autorange": "reversed", "title": "token (* corrupted)"},
                      height=max(360, 160 + 22 * len(labels)))
    sub = (f"{it.id}: clean gap {it.clean_gap:.3f}, corrupted {it.corrupted_gap:.3f}; "
           f"{'fraction of the lost gap recovered' if value == 'recovery' else 'gap after restoring'}; {result.variant}")
    return titled(fig, title or f"Bias tracing: restoring the {what} after corrupting {', '.join(it.subject)}", sub)


def trace_role_heatmap(result: TraceResult, component: str = "resid", *, title: str | None = None) -> go.Figure:
    """Recovery averaged over items per token role (subject, before attribute, attribute, last) x layer."""
    c = _component(result, component)
    roles = result.by_role()
    names = [r for r in roles if r != "all"] + (["all"] if "all" in roles else [])
    z = [[float(v) for v in roles[r]["recovery"][c]] for r in names]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(result.n_layers)), y=[f"{r} (n={int(roles[r]['n'])})" for r in names],
        colorscale=_SCALES[component], colorbar={"title": "recovery"},
        hovertemplate="layer %{x}<br>%{y}<br>%{z:.4f}<extra></extra>",
    ))
    xlab = "restored layer" if component == "resid" else f"centre of {result.window} restored layers"
    fig.update_layout(xaxis_title=xlab, yaxis={"autorange": "reversed", "title": "token role"}, height=420)
    sub = f"{len(result.items)} items; recovery of the role-averaged gaps; {result.variant}"
    return titled(fig, title or f"Bias tracing: {_NAMES[component]} recovery by token role", sub)
