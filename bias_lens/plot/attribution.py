"""Plotly figures for neuron and head attribution results (figures only; never shown here)."""

from __future__ import annotations

import re

import plotly.graph_objects as go
import torch

from ..locate.result import LocateResult
from .layout import titled

_NEURON = re.compile(r"^L(\d+)N(\d+)$")
_HEAD = re.compile(r"^L(\d+)H(\d+)$")


def neuron_heatmap(result: LocateResult, *, n_bins: int = 64, signed: bool = False, title: str | None = None) -> go.Figure:
    """Layer x neuron-bin heatmap: each cell is the largest score (or signed score of largest |.|) in its bin."""
    vals = result.extras.get("signed") if signed else result.scores
    vals = torch.as_tensor(vals, dtype=torch.float64)
    parsed = [_NEURON.match(lab) for lab in result.labels]
    if not all(parsed):
        raise ValueError("neuron_heatmap needs neuron labels L{l}N{k}")
    layers = sorted({int(m.group(1)) for m in parsed})
    d_mlp = max(int(m.group(2)) for m in parsed) + 1
    n_bins = min(n_bins, d_mlp)
    width = -(-d_mlp // n_bins)
    grid = torch.full((len(layers), n_bins), float("nan"), dtype=torch.float64)
    row = {l: i for i, l in enumerate(layers)}
    for m, v in zip(parsed, vals.tolist()):
        i, j = row[int(m.group(1))], int(m.group(2)) // width
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
    parsed = [_HEAD.match(lab) for lab in result.labels]
    if not all(parsed):
        raise ValueError("head_heatmap needs head labels L{l}H{h}")
    L = max(int(m.group(1)) for m in parsed) + 1
    H = max(int(m.group(2)) for m in parsed) + 1
    grid = torch.full((L, H), float("nan"), dtype=torch.float64)
    for m, v in zip(parsed, vals.tolist()):
        grid[int(m.group(1)), int(m.group(2))] = v
    fig = go.Figure(go.Heatmap(
        z=grid.tolist(), x=[f"H{h}" for h in range(H)], y=[f"L{l}" for l in range(L)],
        colorscale="RdBu" if signed else "Viridis", zmid=0 if signed else None,
    ))
    fig.update_layout(xaxis_title="head", yaxis_title="layer")
    sub = result.variant + ("; > 0 pushes towards the second target" if signed else "")
    return titled(fig, title or "Attention-head attribution", sub)
