"""Plotly figures for neuron and head attribution results (figures only; never shown here)."""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from ..labels import HeadLabel, NeuronLabel, parse_all
from ..locate.result import LocateResult
from .layout import titled


def neuron_heatmap(result: LocateResult, *, n_bins: int = 64, signed: bool = False, title: str | None = None) -> go.Figure:
    """Layer x neuron-bin heatmap: each cell is the largest score (or signed score of largest |.|) in its bin."""
    vals = result.extras.get("signed") if signed else result.scores
    vals = torch.as_tensor(vals, dtype=torch.float64)
    parsed = parse_all(result.labels, NeuronLabel)
    if parsed is None:
        raise ValueError("neuron_heatmap needs neuron labels L{l}N{k}")
    layers = sorted({n.layer for n in parsed})
    d_mlp = max(n.index for n in parsed) + 1
    n_bins = min(n_bins, d_mlp)
    width = -(-d_mlp // n_bins)
    grid = torch.full((len(layers), n_bins), float("nan"), dtype=torch.float64)
    row = {l: i for i, l in enumerate(layers)}
    for n, v in zip(parsed, vals.tolist()):
        i, j = row[n.layer], n.index // width
        cur = grid[i, j]
        if torch.isnan(cur) or abs(v) > abs(float(cur)):
            grid[i, j] = v
    fig = go.Figure(go.Heatmap(
        z=grid.tolist(), x=[f"{j * width}-{min(d_mlp, (j + 1) * width) - 1}" for j in range(n_bins)], y=[f"L{l}" for l in layers],
        colorscale="RdBu" if signed else "Viridis", zmid=0 if signed else None,
        colorbar={"title": "signed score" if signed else "score"},
    ))
    fig.update_layout(xaxis_title=f"neuron bin (width {width})", yaxis_title="layer")
    sub = f"{result.variant}; cell = {'signed score' if signed else 'score'} of the largest |score| in its bin"
    return titled(fig, title or "Neuron attribution per layer", sub)


def head_heatmap(result: LocateResult, *, signed: bool = True, title: str | None = None) -> go.Figure:
    """Layer x head heatmap of head attribution (signed by default: > 0 pushes towards the second target)."""
    vals = torch.as_tensor(result.extras.get("signed") if signed else result.scores, dtype=torch.float64)
    parsed = parse_all(result.labels, HeadLabel)
    if parsed is None:
        raise ValueError("head_heatmap needs head labels L{l}H{h}")
    L = max(h.layer for h in parsed) + 1
    H = max(h.head for h in parsed) + 1
    grid = torch.full((L, H), float("nan"), dtype=torch.float64)
    for h, v in zip(parsed, vals.tolist()):
        grid[h.layer, h.head] = v
    fig = go.Figure(go.Heatmap(
        z=grid.tolist(), x=[f"H{h}" for h in range(H)], y=[f"L{l}" for l in range(L)],
        colorscale="RdBu" if signed else "Viridis", zmid=0 if signed else None,
    ))
    fig.update_layout(xaxis_title="head", yaxis_title="layer")
    sub = result.variant + ("; > 0 pushes towards the second target" if signed else "")
    return titled(fig, title or "Attention-head attribution", sub)


def projection_table(tokens: dict[str, dict[str, list[str]]], *, scores: dict[str, float] | None = None,
                     title: str | None = None) -> go.Figure:
    """The interpretable-neuron-editing paper's Table 2 as a plotly table: per neuron (``L{l}N{k}`` or
    ``L{l}H{h}V{d}``) its top and bottom tokens through the unembedding
    (:func:`bias_lens.locate.projection.neuron_vocab_projection`'s output), and its score when given."""
    if not tokens:
        raise ValueError("projection_table needs at least one neuron's tokens")
    labels = list(tokens)
    show = lambda toks: " | ".join(repr(t)[1:-1] for t in toks)  # noqa: E731  (spaces and escapes visible)
    cols = [labels] + ([[f"{scores[lab]:+.4g}" for lab in labels]] if scores else []) + \
        [[show(tokens[lab]["top"]) for lab in labels], [show(tokens[lab]["bottom"]) for lab in labels]]
    head = ["neuron"] + (["score"] if scores else []) + ["top tokens (W_U projection)", "bottom tokens"]
    fig = go.Figure(go.Table(header={"values": head, "align": "left"}, cells={"values": cols, "align": "left"},
                             columnwidth=[1] + ([1] if scores else []) + [4, 4]))
    fig.update_layout(title=title or "Neuron vocabulary projection (top / bottom tokens)",
                      height=140 + 60 * len(labels), margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig
